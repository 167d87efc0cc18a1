"""Generation: what a step computes and in what order steps run."""
from .decoding import DecodeConfig, RequestError
from .engine import Engine, Generation
from .policies import NoCache

__all__ = ["DecodeConfig", "Engine", "Generation", "NoCache", "RequestError"]
