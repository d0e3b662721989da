"""Forked workers (tests/stack.py, fork_process): a child of the fork server runs under its own
environment, from the fork server's imports, in a server that holds no thread, and its exit
status reads as Popen's does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.stack import ROOT, WORKER_MODULES, fork_process, service_env, start_worker


def _report() -> None:
    """Print, as one JSON line, what a forked child sees."""
    preloaded = [name for name in WORKER_MODULES if name in sys.modules]  # before any import
    import torch

    print(
        json.dumps(
            {
                "preloaded": preloaded,
                "pid": os.getpid(),
                "env": dict(os.environ),
                "cwd": os.getcwd(),
                "threads": threading.active_count(),
                "torch_threads": torch.get_num_threads(),
                # The fork server is the child's parent: its threads, Python's or native.
                "server_threads": len(os.listdir(f"/proc/{os.getppid()}/task")),
            }
        )
    )


def _exit_3() -> None:
    sys.exit(3)


def _wait_for_a_signal() -> None:
    signal.pause()


def test_a_forked_child_runs_under_its_environment_from_the_servers_imports(
    tmp_path: Path,
) -> None:
    env = service_env("redis://127.0.0.1:1/0", {"IMAGEGEN_WORKER_NAME": "probe"})
    proc = fork_process(_report, env, tmp_path / "probe.log")
    assert proc.process.wait(timeout=120) == 0, proc.log()
    seen = json.loads(proc.log().splitlines()[-1])
    assert seen["preloaded"] == WORKER_MODULES  # the server imported them all
    assert seen["pid"] == proc.process.pid
    assert seen["env"] == env
    assert seen["cwd"] == str(ROOT)
    assert seen["torch_threads"] == 1  # OMP_NUM_THREADS=1, read when the server imported torch
    assert seen["threads"] == 1
    assert seen["server_threads"] == 1  # nothing a fork could lose


def test_a_forked_childs_exit_status_reads_as_popens(tmp_path: Path) -> None:
    env = service_env("redis://127.0.0.1:1/0")
    exits = fork_process(_exit_3, env, tmp_path / "exit.log")
    assert exits.process.wait(timeout=120) == 3
    assert exits.process.returncode == 3 and exits.stop() == 3
    for sig in (signal.SIGTERM, signal.SIGKILL):
        waits = fork_process(_wait_for_a_signal, env, tmp_path / f"{sig.name}.log")
        with pytest.raises(subprocess.TimeoutExpired):
            waits.process.wait(timeout=0.1)
        assert waits.process.poll() is None
        waits.process.send_signal(sig)
        assert waits.process.wait(timeout=60) == -sig  # killed by a signal: minus its number


def test_a_forked_child_may_not_change_what_imports_read(tmp_path: Path) -> None:
    env = service_env("redis://127.0.0.1:1/0", {"OMP_NUM_THREADS": "2"})
    with pytest.raises(ValueError, match=r"\['OMP_NUM_THREADS'\] differ .* forked=False"):
        fork_process(_exit_3, env, tmp_path / "refused.log")
    with pytest.raises(ValueError, match=r"IMAGEGEN_\* settings only"):
        start_worker("redis://127.0.0.1:1/0", tmp_path, "w", {"HF_HUB_OFFLINE": "1"}, forked=True)
