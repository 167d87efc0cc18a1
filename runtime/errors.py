"""The runtime's one error type for requests (checkpoint problems are models.config.CheckpointError)."""
from __future__ import annotations


class RequestError(ValueError):
    """A generation request that cannot run as given; the message says what to change. `param`, when
    set, names the Request field (or policy option) at fault, so a face can point at its own spelling."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
