"""Trained example adapters for the embedded model, their tasks, training script and demo (see README.md)."""
