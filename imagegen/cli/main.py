"""The `imagegen` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from imagegen.cli.compose import register as register_compose
from imagegen.cli.edit import register as register_edit
from imagegen.cli.generate import register as register_generate
from imagegen.cli.startup import load_settings
from imagegen.cli.train import register as register_train
from imagegen.cli.usage import register as register_usage
from imagegen.core.settings import GatewaySettings, Settings, WorkerSettings

app = typer.Typer(help="imagegen: text-to-image over HTTP.", no_args_is_help=True)


@app.command()
def serve(
    data_dir: Annotated[Path, typer.Option(help="Where the local Redis keeps its data.")] = Path(
        ".run"
    ),
    workers: Annotated[int, typer.Option(min=1, help="Worker processes to start.")] = 1,
) -> None:
    """Run everything locally: Redis, the gateway on IMAGEGEN_HOST:IMAGEGEN_PORT, the webhook
    delivery process, a worker."""
    settings = load_settings(Settings)
    from imagegen.cli.localrun import serve as run_local

    raise typer.Exit(run_local(settings, data_dir.resolve(), workers))


@app.command()
def api() -> None:
    """Run the gateway alone (Redis must be reachable at IMAGEGEN_REDIS_URL)."""
    settings = load_settings(GatewaySettings)
    import uvicorn

    from app.http_guard import guarded_protocol
    from imagegen.core.logs import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=30,
        # h11 with a head size cap and read deadlines (app/http_guard.py); h11's own cap on
        # an incomplete head sits just above ours, which answers first.
        http=guarded_protocol(
            settings.max_header_bytes, settings.header_read_timeout_s, settings.body_read_timeout_s
        ),
        h11_max_incomplete_event_size=settings.max_header_bytes + 1,
    )


@app.command()
def worker() -> None:
    """Run one worker: load the model once, warm it, take jobs until SIGTERM."""
    settings = load_settings(WorkerSettings)
    from worker.main import run_worker

    raise typer.Exit(run_worker(settings))


@app.command()
def webhooks() -> None:
    """Run the webhook delivery process: post the jobs' webhook deliveries, signed, with
    retries (Redis must be reachable at IMAGEGEN_REDIS_URL)."""
    settings = load_settings(GatewaySettings)
    from app.delivery import run_deliverer

    raise typer.Exit(run_deliverer(settings))


@app.command()
def prefetch() -> None:
    """Download the hub models of IMAGEGEN_MODEL / IMAGEGEN_MODELS into the Hugging Face cache,
    then exit 0; a model that cannot be fetched is reported and skipped."""
    settings = load_settings(WorkerSettings)
    from worker.catalog import CatalogError
    from worker.prefetch import prefetch_model

    try:
        lines = prefetch_model(settings)
    except CatalogError as exc:
        for problem in exc.problems:
            typer.echo(f"invalid catalog: {problem}", err=True)
        raise typer.Exit(2) from None
    for line in lines:
        typer.echo(line, err=line.startswith("could not fetch"))


@app.command()
def convert(
    checkpoint: Annotated[
        Path, typer.Argument(help="A single-file checkpoint (.safetensors/.ckpt).")
    ],
    out: Annotated[Path, typer.Argument(help="The diffusers directory to write.")],
    config: Annotated[
        str | None, typer.Option(help="A diffusers directory or hub id of its family's configs.")
    ] = None,
    family: Annotated[str | None, typer.Option(help="sd15, sd2 or sdxl.")] = None,
) -> None:
    """Write a diffusers directory from a single-file checkpoint, so prefetch and an image can
    ship it (its configs: --config, else --family's, else the family its weights show)."""
    import torch

    from worker.single_file import config_source, load_single_file
    from worker.sources import read_json

    try:
        configs = config_source(checkpoint, config, family)
        index = read_json(configs, "model_index.json")
        pipe = load_single_file(checkpoint, configs, str(index["_class_name"]), torch.float32)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        typer.echo(f"imagegen convert: cannot read {checkpoint}: {first}", err=True)
        raise typer.Exit(2) from None
    pipe.save_pretrained(out, safe_serialization=True)
    typer.echo(f"wrote {out} ({type(pipe).__name__}, configs of {configs})")


@app.command("check-worker")
def check_worker() -> None:
    """Exit 0 if this host's worker wrote a fresh heartbeat (for container healthchecks)."""
    settings = load_settings(WorkerSettings)
    from worker.heartbeat import check_heartbeat_file

    if settings.heartbeat_file is None:
        typer.echo("IMAGEGEN_HEARTBEAT_FILE is not set", err=True)
        raise typer.Exit(2)
    healthy, line = check_heartbeat_file(settings.heartbeat_file, settings.worker_stale_s)
    typer.echo(line, err=not healthy)
    raise typer.Exit(0 if healthy else 1)


@app.command()
def openapi(
    output: Annotated[Path, typer.Option(help="Where to write the document.")] = Path(
        "openapi/openapi.json"
    ),
) -> None:
    """Write the gateway's OpenAPI document (checked for drift by the tests)."""
    from app.main import create_app

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(create_app().openapi(), indent=2, sort_keys=True) + "\n")
    typer.echo(f"wrote {output}")


@app.command("new-key")
def new_key(name: str) -> None:
    """Make an API key called NAME: prints the key (once) and the line for IMAGEGEN_API_KEYS."""
    import hashlib
    import secrets

    key = "ig_" + secrets.token_urlsafe(32)
    typer.echo(f"key (give it to the client; it is not stored): {key}")
    digest = hashlib.sha256(key.encode()).hexdigest()
    typer.echo(f"entry (IMAGEGEN_API_KEYS or the keys file): {name}:{digest}")


@app.command("settings-table")
def settings_table(
    readme: Annotated[
        Path | None, typer.Option(help="Rewrite the table between the markers in this file.")
    ] = None,
) -> None:
    """Print the settings as a Markdown table (or refresh it in the README)."""
    from imagegen.core.settings import markdown_table

    table = markdown_table()
    if readme is None:
        typer.echo(table)
        return
    start, end = "<!-- settings:start -->", "<!-- settings:end -->"
    text = readme.read_text()
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table}\n{end}{tail}")
    typer.echo(f"updated {readme}")


@app.command("tiny-model")
def tiny_model(directory: Path) -> None:
    """Save a tiny random Stable Diffusion pipeline to DIRECTORY (for tests and smoke runs)."""
    from builtin_model.tiny import save_tiny_pipeline

    save_tiny_pipeline(directory)
    typer.echo(f"wrote {directory}")


register_generate(app)
register_train(app)
register_edit(app)
register_compose(app)
register_usage(app)


def main() -> None:
    app()
