"""`imagegen generate`: one generation job from the command line, through the Python SDK.

It talks to a running service over HTTP like any other client, so it imports only the SDK
(`imagegen_client`, which needs httpx) and never the gateway or the worker. The SDK is imported
when the command runs: the service's container images do not install it, and every other
`imagegen` command must keep working there.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from imagegen_client import AsyncClient, Job
    from rich.progress import Progress, TaskID

# The service and the key, as every command that talks to a running service takes them.
BaseUrl = Annotated[
    str | None,
    typer.Option(envvar="IMAGEGEN_BASE_URL", help="The service; default http://127.0.0.1:8000."),
]
ApiKey = Annotated[
    str | None,
    typer.Option(envvar="IMAGEGEN_API_KEY", help="API key, if the service needs one."),
]

# Exit statuses: 0 images written, 1 the job or the service failed, 2 bad usage (typer's own).
EXIT_FAILED = 1


def register(app: typer.Typer) -> None:
    """Add the `generate` command to the `imagegen` command line."""
    app.command("generate", no_args_is_help=True)(generate)


def output_paths(output: Path, n: int) -> list[Path]:
    """Where the images go: OUTPUT itself for one image; OUTPUT-0, OUTPUT-1, ... for several."""
    if n == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(n)]


def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.", show_default=False)],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            dir_okay=False,
            help="Where to write the PNG. With -n above 1, `out.png` becomes `out-0.png`, "
            "`out-1.png`, ... (image i is made with seed + i).",
        ),
    ] = Path("out.png"),
    n: Annotated[
        int | None, typer.Option("-n", "--n", min=1, help="Images to make; default 1.")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(min=0, help="Seed of the first image; default: the server picks one."),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Denoising steps; default: the model's.")
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(help="Guidance scale, 0..30; default: the model's.")
    ] = None,
    width: Annotated[
        int | None, typer.Option(help="Multiple of 8, at least 64; default: the model's.")
    ] = None,
    height: Annotated[
        int | None, typer.Option(help="Multiple of 8, at least 64; default: the model's.")
    ] = None,
    negative: Annotated[
        str | None, typer.Option(help="Negative prompt: what to keep out of the image.")
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="A scheduler the model lists; default: the model's.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="A model id the service lists; default: its default.")
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            help="A LoRA the model lists, as ID or ID:SCALE (scale -2..2, default 1); "
            "repeat for several (at most 4).",
        ),
    ] = None,
    control: Annotated[
        str | None,
        typer.Option(
            help="A ControlNet the model lists and its image file, as ID:PATH (the image is "
            "resized to the output size)."
        ),
    ] = None,
    control_scale: Annotated[
        float | None, typer.Option(help="ControlNet conditioning scale, 0..2; default 1.")
    ] = None,
    control_start: Annotated[
        float | None, typer.Option(help="Fraction of the steps where control starts; default 0.")
    ] = None,
    control_end: Annotated[
        float | None, typer.Option(help="Fraction of the steps where control ends; default 1.")
    ] = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Give up after this many seconds, canceling the job; default: no limit.",
        ),
    ] = None,
    previews: Annotated[
        Path | None,
        typer.Option(
            file_okay=False,
            help="Write the job's live previews (small JPEGs of the image as it forms) into "
            "this directory, as JOB-step-NNN.jpg.",
        ),
    ] = None,
) -> None:
    """Generate images with a running imagegen service and save them as PNG files.

    Prints the job id, then each file written. A progress bar (on stderr) follows the job.
    Interrupting the command, or reaching --timeout, cancels the job.
    """
    fields: dict[str, Any] = {
        **common_fields(negative, width, height, steps, guidance, seed, n, scheduler, model),
        "loras": [parse_lora(value) for value in lora] if lora else None,
        "control": parse_control(control, control_scale, control_start, control_end),
    }
    run_generation("generate", prompt, fields, output, base_url, api_key, timeout, previews)


def common_fields(
    negative: str | None,
    width: int | None,
    height: int | None,
    steps: int | None,
    guidance: float | None,
    seed: int | None,
    n: int | None,
    scheduler: str | None,
    model: str | None,
) -> dict[str, Any]:
    """The request fields `imagegen generate` and `imagegen edit` share."""
    return {
        "negative_prompt": negative,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance_scale": guidance,
        "seed": seed,
        "n": n,
        "scheduler": scheduler,
        "model": model,
    }


def run_generation(
    command: str,
    prompt: str,
    fields: dict[str, Any],
    output: Path,
    base_url: str | None,
    api_key: str | None,
    timeout: float | None,
    previews: Path | None = None,
) -> None:
    """Submit through the SDK, follow, save; a server's refusal is one line and exit status 1."""
    try:
        import imagegen_client
    except ImportError:
        typer.echo(
            f"imagegen {command} needs the Python SDK: pip install ./client (from the repository)",
            err=True,
        )
        raise typer.Exit(EXIT_FAILED) from None
    import anyio

    try:
        anyio.run(_generate, prompt, fields, output, base_url, api_key, timeout, previews)
    except imagegen_client.ImagegenError as exc:
        # The server's message names the field and the limit; that is all the user needs.
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(EXIT_FAILED) from None


def parse_lora(value: str) -> dict[str, Any]:
    """`ID` or `ID:SCALE` → `{"id", "scale"}` (the server checks the id and the range)."""
    name, sep, scale = value.rpartition(":")
    if not sep:
        return {"id": value, "scale": 1.0}
    try:
        return {"id": name, "scale": float(scale)}
    except ValueError:
        raise typer.BadParameter(f"{value!r}: the scale after ':' must be a number") from None


def parse_control(
    value: str | None, scale: float | None, start: float | None, end: float | None
) -> dict[str, Any] | None:
    """`ID:PATH` (and the options) → the request's `control`, with the file's bytes."""
    if value is None:
        return None
    name, sep, path = value.partition(":")
    if not sep or not name or not path:
        raise typer.BadParameter(f"{value!r}: --control takes ID:PATH")
    try:
        image = Path(path).read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read control image {path}: {exc.strerror}") from None
    out: dict[str, Any] = {"id": name, "image": image}
    for key, option in (("scale", scale), ("start", start), ("end", end)):
        if option is not None:
            out[key] = option
    return out


async def _generate(
    prompt: str,
    fields: dict[str, Any],
    output: Path,
    base_url: str | None,
    api_key: str | None,
    timeout: float | None,
    previews: Path | None = None,
) -> None:
    """Submit, follow with a progress bar, save; the job is canceled if this is abandoned."""
    import anyio
    from imagegen_client import AsyncClient, ImagegenError

    async with AsyncClient(api_key=api_key, base_url=base_url) as client:
        job = await client.submit(prompt, **fields)
        typer.echo(f"job {job.id} (seed {job.request.seed})")
        try:
            with anyio.fail_after(timeout):
                done = await _follow(client, job, previews)
        except BaseException as exc:
            # Ctrl-C, --timeout or a lost connection: nobody will collect the images.
            with anyio.CancelScope(shield=True), contextlib.suppress(ImagegenError):
                await client.cancel(job)
            if isinstance(exc, TimeoutError):
                typer.echo(f"error: no result within {timeout} s; job {job.id} canceled", err=True)
                raise typer.Exit(EXIT_FAILED) from None
            if not isinstance(exc, Exception):  # Ctrl-C
                typer.echo(f"interrupted; job {job.id} canceled", err=True)
            raise
        if done.status != "succeeded":
            reason = f"{done.error.code}: {done.error.message}" if done.error else done.status
            typer.echo(f"error: job {done.id} {done.status} ({reason})", err=True)
            raise typer.Exit(EXIT_FAILED)
        paths = output_paths(output, len(done.images))
        for image, path in zip(done.images, paths, strict=True):
            data = await client.download(done, image.index)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            typer.echo(f"wrote {path} (seed {image.seed})")


async def _follow(client: AsyncClient, job: Job, previews: Path | None = None) -> Job:
    """The job's final document, with a progress bar fed by its event stream (and its live
    previews written to `previews`, each named on stderr)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    # On stderr, so that stdout carries only the job id and the files, for scripts.
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("queued", total=job.progress.total_steps)
        if previews is not None:
            previews.mkdir(parents=True, exist_ok=True)
        async with contextlib.aclosing(client.stream(job, previews=previews is not None)) as events:
            async for event in events:
                if event.preview is not None and previews is not None:
                    path = event.preview.save(
                        previews / f"{job.id}-step-{event.preview.step:03d}.jpg"
                    )
                    bar.console.print(f"preview {path}", soft_wrap=True, highlight=False)
                    continue
                _show(bar, task, event.job)
                if event.job.is_terminal:
                    return event.job
    # The stream ended without a terminal event (it should not): wait for the outcome.
    return await client.wait(job)


def _show(bar: Progress, task: TaskID, job: Job) -> None:
    description: str = job.status
    if job.status == "queued" and job.queue_position:
        description = f"queued ({job.queue_position} ahead)"
    bar.update(
        task,
        description=description,
        completed=job.progress.step,
        total=job.progress.total_steps,
    )
