"""How a step function is executed: eager, torch.compile, CUDA graphs (DESIGN.md §6)."""
from .backends import BACKENDS, BackendError, available, default_backend

__all__ = ["BACKENDS", "BackendError", "available", "default_backend"]
