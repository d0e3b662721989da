"""The GPU machine's wheel set (bench/gpu_wheels.py): everything the service imports at run
time that the device image lacks, at this venv's (the lock's) versions."""

from __future__ import annotations

import importlib.metadata as metadata
import sys

from tests.stack import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from gpu_wheels import DEVICE_HAS, canonical, wheels


def test_the_set_carries_what_the_gateway_needs_and_nothing_retired() -> None:
    pins = dict(pin.split("==") for pin in wheels())
    names = {canonical(name) for name in pins}
    # FastAPI refuses to build the gateway's form routes without python-multipart.
    assert {"python-multipart", "fastapi", "redis", "diffusers", "compel", "uvicorn"} <= names
    assert "rq" not in names and "torch" not in names
    assert pins["fastapi"] == metadata.version("fastapi")
    assert not (names & DEVICE_HAS)
