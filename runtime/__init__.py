"""Generation: what a step computes and in what order steps run."""
from .decoding import DecodeConfig, RequestError
from .engine import Engine, Generation
from .policies import D2Cache, DllmCache, DualCache, NoCache, make_policy

__all__ = ["DecodeConfig", "Engine", "Generation", "D2Cache", "DllmCache", "DualCache", "NoCache", "RequestError", "make_policy"]
