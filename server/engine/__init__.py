"""The engine: requests, the continuous-batching step loop, sampling, detokenization and merging."""
