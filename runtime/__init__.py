"""Generation: what a step computes, which steps a policy runs, and in what order (docs/ARCHITECTURE.md)."""
from .decoding import DecodeConfig, DecodeStructure, DecodeValues
from .engine import Engine, Generation
from .errors import RequestError
from .observe import BlockEvent, ProgressBar, StepEvent
from .options import parse_policy
from .policy import POLICIES, D2Cache, DllmCache, DualCache, NoCache, Policy, make_policy
from .request import Bucket, GenerationDefaults, Request

__all__ = ["BlockEvent", "Bucket", "DecodeConfig", "DecodeStructure", "DecodeValues", "Engine", "Generation",
           "GenerationDefaults", "ProgressBar", "Request", "StepEvent", "D2Cache", "DllmCache", "DualCache", "NoCache",
           "POLICIES", "Policy", "RequestError", "make_policy", "parse_policy"]
