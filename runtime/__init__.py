"""Generation: what a step computes and in what order steps run."""
from .decoding import DecodeConfig, RequestError
from .engine import Engine, Generation
from .policies import DllmCache, NoCache, make_policy

__all__ = ["DecodeConfig", "Engine", "Generation", "DllmCache", "NoCache", "RequestError", "make_policy"]
