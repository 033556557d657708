"""Mixed-adapter LoRA kernels: the pure-torch grouped path (the reference) and Triton's per-token kernels."""
