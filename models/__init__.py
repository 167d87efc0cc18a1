"""The network: config, weights, forward building blocks. Knows nothing about caching."""
from .checkpoint import Weights, load_checkpoint, load_weights
from .config import CheckpointError, ModelConfig, load_config, parse_config

__all__ = ["CheckpointError", "ModelConfig", "Weights", "load_checkpoint", "load_config", "load_weights",
           "parse_config"]
