"""`imagegen train`: fine-tune a model on a zip or folder of pictures, through the Python SDK,
with a progress bar that shows the loss; prints the adapter id to use in `--lora`.

Like `imagegen generate`, it talks to a running service over HTTP and imports only the SDK,
when the command runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from imagegen.cli.generate import ApiKey, BaseUrl

if TYPE_CHECKING:
    from imagegen_client import Client, Training
    from rich.progress import Progress, TaskID

EXIT_FAILED = 1


def register(app: typer.Typer) -> None:
    """Add the `train` command to the `imagegen` command line."""
    app.command("train", no_args_is_help=True)(train)


def train(
    pictures: Annotated[
        Path,
        typer.Argument(
            exists=True,
            help="A zip of PNG/JPEG/WebP pictures, or a folder of them, each with an optional "
            "same-name .txt caption.",
            show_default=False,
        ),
    ],
    trigger: Annotated[
        str,
        typer.Option(
            "--trigger", help="The new word prompts will use for what the pictures show (zxq)."
        ),
    ],
    name: Annotated[str | None, typer.Option(help="Names the adapter; default `lora`.")] = None,
    model: Annotated[
        str | None, typer.Option(help="A trainable model id; default: the service's default.")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Training steps; default: the model's.")
    ] = None,
    rank: Annotated[
        int | None, typer.Option(min=1, help="LoRA rank; default: the model's.")
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Learning rate; default: the model's.")
    ] = None,
    text_encoder: Annotated[
        bool, typer.Option(help="Also put a LoRA on the text encoder.")
    ] = False,
    seed: Annotated[int | None, typer.Option(min=0, help="Default: the server picks.")] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", dir_okay=False, help="Also download the adapter's .safetensors here."
        ),
    ] = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Train a LoRA on your pictures with a running imagegen service.

    Prints the training id, then the adapter id once it succeeded (use it with
    `imagegen generate --lora ID`). A progress bar (on stderr) shows the step and the loss.
    Interrupting the command cancels the training.
    """
    try:
        import imagegen_client
    except ImportError:
        typer.echo("imagegen train needs the Python SDK: pip install ./client", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    with imagegen_client.Client(api_key=api_key, base_url=base_url) as client:
        try:
            training = client.trainings.create(
                pictures,
                trigger_word=trigger,
                model=model,
                name=name,
                steps=steps,
                rank=rank,
                learning_rate=lr,
                train_text_encoder=text_encoder or None,
                seed=seed,
            )
            typer.echo(f"training {training.id} ({training.images} pictures)")
            try:
                done = _follow(client, training)
            except KeyboardInterrupt:
                client.trainings.cancel(training)
                typer.echo(f"interrupted; training {training.id} canceled", err=True)
                raise typer.Exit(EXIT_FAILED) from None
            assert done.adapter is not None
            typer.echo(f"adapter {done.adapter.id} (trigger word {done.adapter.trigger_word!r})")
            if output is not None:
                output.write_bytes(client.trainings.weights(done.adapter))
                typer.echo(f"wrote {output}")
        except imagegen_client.ImagegenError as exc:
            typer.echo(f"error: {exc.message}", err=True)
            raise typer.Exit(EXIT_FAILED) from None


def _follow(client: Client, training: Training) -> Training:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        "{task.fields[loss]}",
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("queued", total=training.progress.total_steps, loss="")
        return client.trainings.wait(training, on_progress=lambda t: _show(bar, task, t))


def _show(bar: Progress, task: TaskID, training: Training) -> None:
    loss = training.progress.loss
    bar.update(
        task,
        description=training.status,
        completed=training.progress.step,
        total=training.progress.total_steps,
        loss=f"loss {loss:.4f}" if loss is not None else "",
    )
