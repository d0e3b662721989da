"""`imagegen edit INPUT.png "prompt"`: image-to-image, inpainting or outpainting from the
command line, through the Python SDK, with `imagegen generate`'s progress bar and options.

`--mask` takes THIS API's convention: WHITE = repaint, black = keep (not OpenAI's alpha mask).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from imagegen.cli.generate import ApiKey, BaseUrl, common_fields, run_generation

SIDES = ("left", "right", "top", "bottom")


def register(app: typer.Typer) -> None:
    """Add the `edit` command to the `imagegen` command line."""
    app.command("edit", no_args_is_help=True)(edit)


def parse_outpaint(values: list[str]) -> dict[str, int] | None:
    """`right=32` (repeatable, or comma-separated: `left=16,right=16`) as the API's object."""
    if not values:
        return None
    out: dict[str, int] = {}
    for value in values:
        for part in value.split(","):
            side, _, pixels = part.partition("=")
            side = side.strip().lower()
            if side not in SIDES or not pixels.strip().isdigit():
                raise typer.BadParameter(
                    f"{part!r}: expected SIDE=PIXELS with SIDE one of {', '.join(SIDES)}",
                    param_hint="--outpaint",
                )
            out[side] = int(pixels)
    return out


def edit(
    input_image: Annotated[
        Path,
        typer.Argument(
            exists=True, dir_okay=False, help="PNG, JPEG or WebP to start from.", show_default=False
        ),
    ],
    prompt: Annotated[str, typer.Argument(help="What to draw.", show_default=False)],
    mask: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Inpainting mask of the input's size: WHITE = repaint, black = keep.",
        ),
    ] = None,
    strength: Annotated[
        float | None,
        typer.Option(
            help="0 < S <= 1: how much of the input is re-noised; default 0.8 (1.0 with "
            "--mask or --outpaint)."
        ),
    ] = None,
    outpaint: Annotated[
        list[str] | None,
        typer.Option(help="Grow the canvas: SIDE=PIXELS (multiple of 8), e.g. right=32."),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", dir_okay=False, help="Where to write the PNG.")
    ] = Path("out.png"),
    n: Annotated[int | None, typer.Option("-n", "--n", min=1, help="Images to make.")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed of the first image.")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Denoising steps.")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale, 0..30.")] = None,
    width: Annotated[int | None, typer.Option(help="Output width; default: the input's.")] = None,
    height: Annotated[int | None, typer.Option(help="Output height; default: the input's.")] = None,
    negative: Annotated[str | None, typer.Option(help="Negative prompt.")] = None,
    scheduler: Annotated[str | None, typer.Option(help="A scheduler the model lists.")] = None,
    model: Annotated[str | None, typer.Option(help="A model id the service lists.")] = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="Give up (and cancel) after this many seconds.")
    ] = None,
) -> None:
    """Edit an image with a running imagegen service and save the result as PNG files."""
    fields: dict[str, Any] = {
        **common_fields(negative, width, height, steps, guidance, seed, n, scheduler, model),
        "image": input_image,
        "mask": mask,
        "strength": strength,
        "outpaint": parse_outpaint(outpaint or []),
    }
    run_generation("edit", prompt, fields, output, base_url, api_key, timeout)
