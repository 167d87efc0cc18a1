"""Tensor-parallel serving in lock step (docs/parallel.md): rank 0 serves HTTP and runs the worker; before
each batch it sends the batch's requests to the other ranks, which run the same Engine.generate_batch, so
their step collectives meet rank 0's, and drop the results; None ends them. The requests travel pickled
over a gloo group of their own (on the CPU: an NCCL group carries only the steps' collectives), whose
timeout outlasts any idle server."""
from __future__ import annotations

import datetime
import logging
import signal

log = logging.getLogger("dllm")
IDLE = datetime.timedelta(days=365)     # a follower waits for the next batch this long


class Lockstep:
    def __init__(self):
        import torch.distributed as dist
        self._dist = dist
        self.group = dist.new_group(backend="gloo", timeout=IDLE)    # every rank calls this, in the same order

    def send(self, requests: list | None) -> None:
        """Rank 0: the next batch's requests (None: the server stopped)."""
        self._dist.broadcast_object_list([requests], src=0, group=self.group)

    def follow(self, engine) -> None:
        """Ranks 1..N-1: run every batch rank 0 sends until it sends None. Ctrl-C and SIGTERM are rank 0's
        to handle (it drains, then ends the followers); a follower ends early only if rank 0 is gone."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        while True:
            box = [None]
            try:
                self._dist.broadcast_object_list(box, src=0, group=self.group)
            except RuntimeError as e:       # rank 0 exited without a word
                log.warning("rank %d: rank 0 is gone (%s); stopping", self._dist.get_rank(), e)
                return
            if box[0] is None:
                return
            try:
                engine.generate_batch(box[0])
            except Exception as e:          # the same request fails the same way on rank 0, which answers it
                log.warning("rank %d: batch refused: %s", self._dist.get_rank(), e)
