"""deltaserve on Ray Serve: replicas, adapter-affine routing and the cluster's front doors."""
