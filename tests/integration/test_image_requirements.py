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
from concurrent.futures import ThreadPoolExecutor
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


def _resolve(requirements: list[str], report: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
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
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture(scope="module")
def pypi() -> None:
    try:
        httpx.get(f"{INDEX}/pip/", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.skip(f"PyPI ({INDEX}) cannot be reached, so pip cannot resolve: {exc}")


@pytest.mark.slow
@pytest.mark.usefixtures("pypi")
def test_every_image_resolves_with_its_torch_and_pins(tmp_path: Path) -> None:
    images = _images()
    with ThreadPoolExecutor(len(images)) as pool:
        results = dict(
            zip(
                images,
                pool.map(lambda name: _resolve(images[name], tmp_path / f"{name}.json"), images),
                strict=True,
            )
        )
    problems = {name: r.stderr[-3000:] for name, r in results.items() if r.returncode != 0}
    assert not problems, "\n\n".join(f"{name} image:\n{text}" for name, text in problems.items())
    worker = json.loads((tmp_path / "worker.json").read_text())
    versions = {item["metadata"]["name"]: item["metadata"]["version"] for item in worker["install"]}
    assert versions["torch"] == _base_torch()  # pip kept the base's torch, did not swap it
