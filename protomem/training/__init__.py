"""The training loop behind ``python -m protomem.train``: options, builders, the Trainer."""
from .config import OPTIONS, resolve
from .trainer import FORMAT, Trainer

__all__ = ["FORMAT", "OPTIONS", "Trainer", "resolve"]
