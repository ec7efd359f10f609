"""Ctrl-C during training: finish the step, save, say how to resume (instead of a traceback)."""
import signal
import sys
import threading

import torch
import torch.distributed as dist


class StopRequest:
    """A context in which the first SIGINT (Ctrl-C) or SIGTERM asks the run to stop after the
    current step; a second SIGINT interrupts at once. Outside the main thread it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested, self._old = False, {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nprotomem-train: stopping after this step to save a checkpoint (Ctrl-C again to abort "
              "without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
        return False

    def agreed(self, world, device):
        """Whether any rank was asked to stop (every rank must stop at the same step: saving a
        sharded head is a collective)."""
        if world == 1:
            return self.requested
        flag = torch.tensor([int(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def ignore_sigint_in_worker(_worker_id):
    """DataLoader ``worker_init_fn``: workers leave Ctrl-C to the main process, which still needs
    their batches to finish its step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
