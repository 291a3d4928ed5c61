"""SIGINT/SIGTERM during training: the loop finishes its step, saves a checkpoint and stops,
every process after the same step."""

from __future__ import annotations

import signal


class RunStopped(Exception):
    """A signal stopped a run that a job needed finished (a preparation stage); the message says
    which stage and how to go on. The CLI exits with 128 + the signal's number."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return 128 + signal.Signals[self.signal_name].value


class StopSignal:
    """SIGINT/SIGTERM ask the loop to save a checkpoint and stop after the current step."""

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def agreed_signal(received: int | None, accelerator) -> int | None:
    """Every process stops after the same step: a signal one process got before the others is
    shared (the largest number wins), so none starts a step whose collectives the others skip."""
    if accelerator.num_processes == 1:
        return received
    import torch  # here: the CLI imports this module for RunStopped, and stays light

    flag = torch.tensor([float(received or 0)], device=accelerator.device)
    agreed = int(accelerator.gather(flag).max().item())
    return agreed or None
