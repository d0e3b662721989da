"""Fault injection for the reliability test suite. Off unless IMAGEGEN_FAULT_INJECTION=true.

Two kinds, both for tests only (never enable them in production):

- A prompt that starts with `__fault__:<kind>` makes the worker misbehave at the first
  denoising step in one of the ways a real deployment sees: `oom` (the device runs out of
  memory), `crash` (the process dies as if OOM-killed), `hang` (a step blocks in native code
  where no signal can interrupt it), `error` (an unexpected exception), `oom_over:<rows>`
  (any denoising step of a loop that holds more than <rows> images runs out of memory, as a
  batch too large for the device does).
- `IMAGEGEN_FAULT_CRASH_AT=<point>` makes the process die (`os._exit`) the first time it
  reaches that named point of a job's lifecycle (`CRASH_POINTS`), whatever the prompt.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

import torch

from imagegen.core.contract import JobSpec

PREFIX = "__fault__:"

# The named points of a job's lifecycle where a worker can be told to die.
CRASH_POINTS = (
    "after_claim",  # the batch's jobs are claimed: running, in the running set
    "mid_loop",  # after the second denoising step
    "after_encode",  # the PNGs are encoded, nothing is stored yet
    "after_store",  # object storage only: the images are stored, the job is not succeeded yet
    "after_finish",  # images stored and the job succeeded (one step)
    "before_next_claim",  # the batch is closed; the loop has not claimed again
)
# And of a training's.
TRAINING_CRASH_POINTS = (
    "after_checkpoint",  # a checkpoint is stored and its step recorded; training goes on
)


def fault_of(prompt: str) -> str | None:
    return prompt[len(PREFIX) :].split()[0] if prompt.startswith(PREFIX) else None


def trigger(kind: str) -> None:
    if kind == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        _hang_in_native_code()
    if kind == "error":
        raise RuntimeError("injected failure")


def memory_limited(
    on_loop_step: Callable[[int, int], None], specs: list[JobSpec]
) -> Callable[[int, int], None]:
    """`on_loop_step`, raising out-of-memory past the rows an `oom_over:<rows>` job allows."""
    limits = [
        int(fault.split(":", 1)[1])
        for fault in (fault_of(spec.prompt) for spec in specs)
        if fault is not None and fault.startswith("oom_over:")
    ]
    if not limits:
        return on_loop_step
    limit = min(limits)

    def limited(step: int, rows: int) -> None:
        if rows > limit:
            raise torch.OutOfMemoryError(f"{rows} images do not fit (injected: at most {limit})")
        on_loop_step(step, rows)

    return limited


class CrashPoint:
    """Dies at the configured point, once (a process that died is a new process after)."""

    def __init__(self, point: str | None) -> None:
        known = (*CRASH_POINTS, *TRAINING_CRASH_POINTS)
        if point is not None and point not in known:
            raise ValueError(f"unknown crash point {point!r}; one of {', '.join(known)}")
        self.point = point

    def reached(self, point: str) -> None:
        if point == self.point:
            os._exit(70)


def _hang_in_native_code() -> None:
    # Locking a held, non-recursive mutex from C blocks forever; ctypes has released the GIL,
    # so the heartbeat thread runs on, but no Python signal handler (the worker's SIGALRM
    # timeout) can run in this thread again — exactly like a wedged CUDA call.
    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # zeroed = PTHREAD_MUTEX_INITIALIZER on Linux
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)
