"""The base model: loading it, the adapter-aware layers wrapped around it, and the runner's forward."""
