"""The old implementations, kept importable for code and checkpoints built on them."""
