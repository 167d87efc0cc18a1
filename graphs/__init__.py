"""How a step function is executed: eager, torch.compile, CUDA graphs. Depends on torch only."""
from .backends import BACKENDS, BackendError, available, default_backend

__all__ = ["BACKENDS", "BackendError", "available", "default_backend"]
