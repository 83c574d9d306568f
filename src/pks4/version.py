"""The package version: one leaf module, so any layer (checkpoints, model cards) can record it."""
__version__ = "0.1.0"
