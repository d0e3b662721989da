"""Fault injection for the reliability test suite. Off unless IMAGEGEN_FAULT_INJECTION=true.

With it on, a prompt that starts with `__fault__:<kind>` makes the worker misbehave at the
first denoising step in one of the ways a real deployment sees: `oom` (the device runs out of
memory), `crash` (the process dies as if OOM-killed), `hang` (a step blocks in native code
where no signal can interrupt it), `error` (an unexpected exception). Never enable it in
production.
"""

from __future__ import annotations

import ctypes
import os
import signal

import torch

PREFIX = "__fault__:"


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


def _hang_in_native_code() -> None:
    # Locking a held, non-recursive mutex from C blocks forever; ctypes has released the GIL,
    # so the heartbeat thread runs on, but no Python signal handler (RQ's SIGALRM timeout)
    # can run in this thread again — exactly like a wedged CUDA call.
    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # zeroed = PTHREAD_MUTEX_INITIALIZER on Linux
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)
