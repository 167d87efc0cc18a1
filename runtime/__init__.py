"""Generation: what a step computes, which steps a policy runs, and in what order (docs/ARCHITECTURE.md)."""
from .decoding import DecodeConfig, RequestError
from .engine import Bucket, Engine, Generation, StepEvent
from .policy import POLICIES, D2Cache, DllmCache, DualCache, NoCache, Policy, make_policy

__all__ = ["Bucket", "DecodeConfig", "Engine", "Generation", "StepEvent", "D2Cache", "DllmCache", "DualCache",
           "NoCache", "POLICIES", "Policy", "RequestError", "make_policy"]
