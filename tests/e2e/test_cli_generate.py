"""`imagegen generate` run as a real process against the real stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imagegen.cli.generate import output_paths
from tests.conftest import TINY_MODEL_ID
from tests.stack import ROOT, Gateway, wait_for_job

COMMAND = [sys.executable, "-m", "imagegen"]


def _run(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    return subprocess.run(
        [*COMMAND, "generate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def _parameters(path: Path) -> dict[str, Any]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        parameters: dict[str, Any] = json.loads(image.info["parameters"])
    return parameters


def test_one_image_is_written_where_asked(stack: Gateway, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "circle.png"
    result = _run(
        "a red circle", "-o", str(out), "--seed", "1", "--steps", "2",
        "--model", TINY_MODEL_ID, "--width", "64", "--height", "64",
        "--guidance", "4.5", "--negative", "blurry", "--base-url", stack.base_url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("job gen_") and "(seed 1)" in lines[0], result.stdout
    assert lines[1] == f"wrote {out} (seed 1)", result.stdout
    parameters = _parameters(out)
    assert parameters["seed"] == 1
    assert parameters["prompt"] == "a red circle"
    assert parameters["negative_prompt"] == "blurry"
    assert parameters["guidance_scale"] == 4.5
    assert (parameters["width"], parameters["height"], parameters["steps"]) == (64, 64, 2)


def test_several_images_are_numbered(stack: Gateway, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    result = _run(
        "a blue square", "-o", str(out), "--seed", "1", "-n", "3", "--steps", "2",
        "--model", TINY_MODEL_ID, "--base-url", stack.base_url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    paths = [tmp_path / f"out-{i}.png" for i in range(3)]
    assert [_parameters(p)["seed"] for p in paths] == [1, 2, 3]
    assert not out.exists()
    for path, seed in zip(paths, (1, 2, 3), strict=True):
        assert f"wrote {path} (seed {seed})" in result.stdout


def test_the_servers_message_is_shown_on_a_bad_request(stack: Gateway, tmp_path: Path) -> None:
    result = _run(
        "x", "-o", str(tmp_path / "x.png"), "--width", "65", "--model", TINY_MODEL_ID,
        "--base-url", stack.base_url,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("error: width"), result.stderr
    assert "multiple of 8" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_past_the_timeout_the_job_is_canceled(stack: Gateway, tmp_path: Path) -> None:
    with stack.client() as http:
        # A long job ahead keeps the tiny model's worker busy, so ours can only wait.
        blocker = http.post(
            "/v1/generations",
            json={"prompt": "blocker", "model": TINY_MODEL_ID, "steps": 150, "n": 8},
        ).json()["id"]
        try:
            wait_for_job(http, blocker, until=("running",))
            result = _run(
                "x", "-o", str(tmp_path / "x.png"), "--model", TINY_MODEL_ID,
                "--timeout", "1", "--base-url", stack.base_url,
            )  # fmt: skip
        finally:
            http.delete(f"/v1/generations/{blocker}")
        assert result.returncode == 1, result.stderr
        job_id = result.stdout.split()[1]
        assert f"no result within 1.0 s; job {job_id} canceled" in result.stderr
        assert http.get(f"/v1/generations/{job_id}").json()["status"] == "canceled"
    assert not (tmp_path / "x.png").exists()


def test_no_service_is_a_clear_error(tmp_path: Path) -> None:
    result = _run("x", "-o", str(tmp_path / "x.png"), "--base-url", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("n", "names"),
    [(1, ["a/out.png"]), (2, ["a/out-0.png", "a/out-1.png"]), (1, ["noext"])],
)
def test_output_paths(n: int, names: list[str]) -> None:
    first = Path(names[0]) if n == 1 else Path("a/out.png")
    assert output_paths(first, n) == [Path(name) for name in names]
