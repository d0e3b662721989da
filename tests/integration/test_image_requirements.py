"""Each image's pins resolve with pip against every package's own requirements.

The images cannot be built here (no Docker engine), but what pip would do in them can be
checked: for each image, pip's resolver takes the image's torch (the worker's base image),
the lock (requirements.lock, the versions both images install) and the ranges of
pyproject.toml, and must find them compatible —
e.g. transformers[torch] 5 needs torch >= 2.6, which a torch 2.5 base cannot give. Only
metadata is fetched from PyPI (`--dry-run`); without PyPI the test is skipped, saying why.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.stack import ROOT

DOCKER = ROOT / "docker"
INDEX = "https://pypi.org/simple"


def _project() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {
        "gateway": project["dependencies"],
        "worker": project["optional-dependencies"]["worker"],
    }


def _base_torch() -> str:
    dockerfile = (DOCKER / "worker.Dockerfile").read_text()
    match = re.search(r"pytorch/pytorch:(\d+\.\d+\.\d+)-", dockerfile)
    assert match, "the worker image names no pytorch/pytorch:<version>-... base"
    return match.group(1)


def _images() -> dict[str, list[str]]:
    project = _project()
    return {
        "gateway": ["-c", str(ROOT / "requirements.lock"), *project["gateway"]],
        "worker": [
            f"torch=={_base_torch()}",  # what the base image holds
            "-c",
            str(ROOT / "requirements.lock"),
            *project["gateway"],
            *project["worker"],
            # The worker runs both on torch: what their [torch] extras ask of it applies
            # whether or not the files above spell the extras.
            "diffusers[torch]",
            "transformers[torch]",
        ],
    }


def _pip(requirements: list[str], report: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "install",
        # No local constraints, indexes or wheel folders: PyPI, as the image build sees it.
        "--isolated",
        "--dry-run",
        "--ignore-installed",
        "--only-binary=:all:",
        "--quiet",
        "--index-url",
        INDEX,
        "--report",
        str(report),
        *requirements,
    ]


# pip's resolver spends its ~30 s waiting on PyPI. When a session collects this test,
# tests/conftest.py starts it at once (`start_resolving`), so it runs beside the other tests
# and the test only reads what it found.
_RUNNING: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}


def start_resolving(folder: Path) -> None:
    """Start pip's resolver for every image (once), its reports in `folder`."""
    if _RUNNING:
        return
    for name, requirements in _images().items():
        report = folder / f"{name}.json"
        # Its messages go to a file: a pipe nobody reads yet could fill and stall it.
        with (folder / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                _pip(requirements, report), stdout=subprocess.DEVNULL, stderr=log
            )
        _RUNNING[name] = (process, report)


def stop_resolving() -> None:
    for process, _ in _RUNNING.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def _resolved(folder: Path) -> dict[str, tuple[int, str, Path]]:
    """Each image's (pip's exit status, its stderr, its report)."""
    start_resolving(folder)
    out = {}
    for name, (process, report) in _RUNNING.items():
        try:
            process.wait(timeout=240)
            said = ""
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            said = "pip did not finish in 240 s\n"
        said += report.with_suffix(".log").read_text(errors="replace")
        out[name] = (process.returncode, said, report)
    return out


@pytest.fixture(scope="module")
def pypi() -> None:
    try:
        httpx.get(f"{INDEX}/pip/", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.skip(f"PyPI ({INDEX}) cannot be reached, so pip cannot resolve: {exc}")


@pytest.mark.slow
@pytest.mark.usefixtures("pypi")
def test_every_image_resolves_with_its_torch_and_pins(tmp_path: Path) -> None:
    results = _resolved(tmp_path)
    problems = {name: err[-3000:] for name, (code, err, _) in results.items() if code != 0}
    assert not problems, "\n\n".join(f"{name} image:\n{text}" for name, text in problems.items())
    worker = json.loads(results["worker"][2].read_text())
    versions = {item["metadata"]["name"]: item["metadata"]["version"] for item in worker["install"]}
    assert versions["torch"] == _base_torch()  # pip kept the base's torch, did not swap it
