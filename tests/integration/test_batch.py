"""Batched denoising (worker/batch_loop.py) on the tiny pipeline: a job's images do not depend on
what shares its batch, and a job that stops mid-batch leaves the others untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline

from imagegen.core.contract import SCHEDULER_NAMES, JobSpec
from imagegen.core.settings import Settings
from tests.stack import batch_job
from worker.batch_loop import BatchItem, BatchResult, run_batch
from worker.errors import JobStopped, JobTimedOut
from worker.families import supports_batching
from worker.inference import Inference
from worker.pipeline import LoadedModel, load_model
from worker.schedulers import build_scheduler

STEPS = 4  # PNDM without skip_prk_steps (the tiny config) needs at least 4
# Greatest pixel difference (of 255) between a job alone and batched when the batch is one
# UNet call (invariant=False). Measured on this CPU with the tiny model: 1.
FAST_TOLERANCE = 2


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LoadedModel:
    # On the CPU, as the worker there: float32 and batch-invariant.
    return load_model(Settings(model=str(tiny_model_dir), model_id="tiny", device="cpu"))


def job(**changes: Any) -> JobSpec:
    return batch_job(**changes)


def mixed_jobs(scheduler: str) -> list[JobSpec]:
    """Three jobs of one shape: prompts, negatives, guidance (with and without CFG) and n vary."""
    return [
        job(scheduler=scheduler, n=2),
        job(scheduler=scheduler, prompt="a green sphere", negative_prompt="", guidance_scale=1.0),
        # Its prompt is the first job's negative prompt: one text, both roles.
        job(scheduler=scheduler, prompt="blurry", guidance_scale=0.0, n=2, seed=2**32 - 1),
    ]


def stock_images(model: LoadedModel, spec: JobSpec) -> list[np.ndarray]:
    """What the worker produces for `spec` without batching (Inference._call, batch-invariant
    mode): one stock pipeline call per image."""
    pipe = model.pipe
    images = []
    for i in range(spec.n):
        pipe.scheduler = build_scheduler(spec.scheduler, model.scheduler_config)
        with torch.inference_mode():
            result = pipe(
                prompt=[spec.prompt],
                negative_prompt=[spec.negative_prompt],
                width=spec.width,
                height=spec.height,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(spec.image_seed(i))],
                output_type="pil",
                callback_on_step_end=lambda _p, _i, _t, kwargs: kwargs,
            )
        images += result.images
    return [np.asarray(image) for image in images]


def pixels(result: BatchResult) -> list[np.ndarray]:
    assert not isinstance(result, BaseException), result
    return [np.asarray(image) for image in result]


def assert_identical(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape and np.array_equal(a, b), f"max diff {max_diff([a], [b])}"


def max_diff(got: list[np.ndarray], expected: list[np.ndarray]) -> int:
    return max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(got, expected, strict=True))


def stop_at(step: int, seen: list[int]) -> Any:
    def on_step(k: int, _total: int) -> None:
        seen.append(k)
        if k == step:
            raise JobStopped("canceled")

    return on_step


@pytest.mark.parametrize(
    ("scheduler", "guidance"),
    [(name, 7.5) for name in SCHEDULER_NAMES] + [("euler", 1.0), ("euler_a", 0.0)],
)
def test_a_job_alone_matches_the_stock_pipeline(
    model: LoadedModel, scheduler: str, guidance: float
) -> None:
    spec = job(scheduler=scheduler, guidance_scale=guidance, n=2)
    (result,) = run_batch(model, [BatchItem(spec)], invariant=True)
    assert_identical(pixels(result), stock_images(model, spec))


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_batched_jobs_match_their_solo_runs_byte_for_byte(
    model: LoadedModel, scheduler: str
) -> None:
    specs = mixed_jobs(scheduler)
    batched = run_batch(model, [BatchItem(spec) for spec in specs], invariant=True)
    for spec, result in zip(specs, batched, strict=True):
        (alone,) = run_batch(model, [BatchItem(spec)], invariant=True)
        assert_identical(pixels(result), pixels(alone))


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m", "unipc"])
def test_one_unet_call_per_step_stays_within_tolerance(model: LoadedModel, scheduler: str) -> None:
    specs = mixed_jobs(scheduler)
    batched = run_batch(model, [BatchItem(spec) for spec in specs], invariant=False)
    for spec, result in zip(specs, batched, strict=True):
        (alone,) = run_batch(model, [BatchItem(spec)], invariant=False)
        assert max_diff(pixels(result), pixels(alone)) <= FAST_TOLERANCE


@pytest.mark.parametrize(
    ("scheduler", "stopped"),
    [("euler_a", 0), ("dpmpp_2m", 1), ("dpmpp_2m_karras", 2), ("unipc", 0), ("pndm", 1)],
)
def test_a_job_stopped_mid_batch_leaves_the_others_untouched(
    model: LoadedModel, scheduler: str, stopped: int
) -> None:
    # Multistep schedulers keep a history per row; the stopped job's rows leave it too.
    specs = mixed_jobs(scheduler)
    uninterrupted = run_batch(model, [BatchItem(spec) for spec in specs], invariant=True)
    seen: list[list[int]] = [[] for _ in specs]
    items = [
        BatchItem(spec, stop_at(2 if j == stopped else -1, seen[j])) for j, spec in enumerate(specs)
    ]
    results = run_batch(model, items, invariant=True)
    assert isinstance(results[stopped], JobStopped)
    assert seen[stopped] == [1, 2]
    for j, result in enumerate(results):
        if j != stopped:
            assert_identical(pixels(result), pixels(uninterrupted[j]))
            assert seen[j] == list(range(1, len(seen[j]) + 1)) and len(seen[j]) >= STEPS


def test_a_stop_without_invariance_keeps_the_others_within_tolerance(model: LoadedModel) -> None:
    specs = mixed_jobs("dpmpp_2m")
    uninterrupted = run_batch(model, [BatchItem(spec) for spec in specs], invariant=False)
    items = [BatchItem(specs[0], stop_at(1, [])), *(BatchItem(spec) for spec in specs[1:])]
    results = run_batch(model, items, invariant=False)
    assert isinstance(results[0], JobStopped)
    for j in (1, 2):
        assert max_diff(pixels(results[j]), pixels(uninterrupted[j])) <= FAST_TOLERANCE


def test_a_failing_or_overdue_job_fails_alone_and_the_batch_goes_on(
    model: LoadedModel,
) -> None:
    def boom(_step: int, _total: int) -> None:
        raise RuntimeError("injected failure")

    def overdue(_step: int, _total: int) -> None:
        raise JobTimedOut("past its own deadline")

    a, b = job(), job(prompt="another", seed=3)
    results = run_batch(model, [BatchItem(a, boom), BatchItem(b)], invariant=True)
    assert isinstance(results[0], RuntimeError)
    assert_identical(pixels(results[1]), stock_images(model, b))
    results = run_batch(model, [BatchItem(a), BatchItem(b, overdue)], invariant=True)
    assert isinstance(results[1], JobTimedOut)
    assert_identical(pixels(results[0]), stock_images(model, a))


def test_when_every_job_stops_nothing_is_decoded(model: LoadedModel) -> None:
    specs = mixed_jobs("unipc")
    results = run_batch(model, [BatchItem(s, stop_at(1, [])) for s in specs], invariant=False)
    assert all(isinstance(result, JobStopped) for result in results)


def test_a_batch_needs_one_shape_key(model: LoadedModel) -> None:
    with pytest.raises(ValueError, match="one \\(width, height, steps, scheduler\\)"):
        run_batch(model, [BatchItem(job()), BatchItem(job(steps=STEPS + 1))], invariant=True)
    assert run_batch(model, [], invariant=True) == []


def test_only_the_stable_diffusion_pipeline_is_batched(model: LoadedModel) -> None:
    assert supports_batching(model.pipe)
    assert not supports_batching(StableDiffusionImg2ImgPipeline(**model.pipe.components))


def test_compiled_batches_are_padded_to_warmed_sizes_and_never_compile_mid_job(
    model: LoadedModel,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # torch.compile as the worker calls it (fullgraph, static shapes), with a backend that
    # records each graph dynamo hands it and runs it eagerly: inductor's code generation is
    # minutes on this CPU, and dynamo's guards decide when a graph is recompiled anyway.
    graphs: list[list[tuple[int, ...]]] = []
    real_compile = torch.compile

    def record(gm: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        graphs.append([tuple(i.shape) for i in inputs if isinstance(i, torch.Tensor)])
        return gm.forward

    def compile_recorded(module: Any, **options: Any) -> Any:
        assert options["dynamic"] is False
        return real_compile(
            module, backend=record, fullgraph=options.get("fullgraph", False), dynamic=False
        )

    monkeypatch.setattr(torch, "compile", compile_recorded)
    torch._dynamo.reset()
    settings = Settings(
        model=str(tiny_model_dir),
        model_id="tiny",
        device="cpu",
        compile=True,
        compile_batches="1,2,4",
        max_n=4,
        batch_invariant="off",
    )
    try:
        compiled = load_model(settings)
        assert compiled.compiled_batches == (1, 2, 4)
        Inference(compiled).warm_up()
        assert graphs, "the UNet and the VAE decoder were compiled at warm-up"
        warmed = len(graphs)
        # Row counts and timestep dtypes that were never warmed up: 3 guided images (6 rows),
        # guided and unguided together (3 rows), DDIM's integer timesteps, a job that leaves.
        batches = [
            [job(n=3)],
            [job(), job(prompt="another", guidance_scale=1.0)],
            [job(scheduler="ddim", n=2), job(scheduler="ddim", guidance_scale=0.0)],
        ]
        for specs in batches:
            results = run_batch(compiled, [BatchItem(s) for s in specs], invariant=False)
            for spec, result in zip(specs, results, strict=True):
                # The padded rows change nothing but rounding (the fixture is not compiled).
                assert max_diff(pixels(result), stock_images(model, spec)) <= FAST_TOLERANCE
        stopping = [BatchItem(job(n=2), stop_at(2, [])), BatchItem(job(seed=5))]
        results = run_batch(compiled, stopping, invariant=False)
        assert isinstance(results[0], JobStopped)
        assert max_diff(pixels(results[1]), stock_images(model, job(seed=5))) <= FAST_TOLERANCE
        assert graphs[warmed:] == [], "a batch was compiled while jobs waited"
        # A resolution that was not warmed up runs eagerly instead of compiling mid-job.
        other_size = job(width=48, height=40)
        (result,) = run_batch(compiled, [BatchItem(other_size)], invariant=False)
        assert max_diff(pixels(result), stock_images(model, other_size)) <= FAST_TOLERANCE
        assert graphs[warmed:] == []
    finally:
        torch.compiler.set_stance("default")
        torch._dynamo.reset()


# -- long and weighted prompts (worker/prompts.py) ------------------------------------------------
# The tiny model's tokenizer is the built-in word-level one: a 32-token window, 30 words each.
LONG_PROMPT = (
    "a large (red:1.3) circle at the top left on a blue background, "
    + ", ".join(["a small green square in the middle"] * 5)
    + ", [white] edge"
)


def test_a_long_weighted_prompt_matches_the_stock_pipeline_given_the_same_embeddings(
    model: LoadedModel,
) -> None:
    """Past one window the prompt is encoded window by window (here two) and weighted; the
    batch loop's images are byte-identical to the stock pipeline's given the same
    `prompt_embeds` / `negative_prompt_embeds` (the worker's stock path, `Inference.generate`)."""
    assert model.prompts is not None
    prepared = model.prompts.prepare(LONG_PROMPT)
    assert prepared.fragments is not None
    assert model.prompts.count(LONG_PROMPT) > model.prompts.window - 2
    embeds = model.prompts.encode(prepared, model.device).embeds
    assert embeds.shape[1] == 2 * model.prompts.window
    spec = job(prompt=LONG_PROMPT, negative_prompt="blurry", n=2)
    (result,) = run_batch(model, [BatchItem(spec)], invariant=True)
    stock = Inference(model).generate(spec)
    assert_identical(pixels(result), pixels(stock))
    # And a long negative prompt with a short prompt: the prompt is the one padded.
    spec = job(prompt="a red cube", negative_prompt=LONG_PROMPT, scheduler="dpmpp_2m")
    (result,) = run_batch(model, [BatchItem(spec)], invariant=True)
    assert_identical(pixels(result), pixels(Inference(model).generate(spec)))


def test_long_and_short_prompts_share_a_batch(model: LoadedModel) -> None:
    """A long prompt's job and short ones in one batch: byte-identical to their solo runs when
    invariant; with one UNet call per context length otherwise, within the batching
    tolerance."""
    specs = [job(prompt=LONG_PROMPT, n=2), job(prompt="a green sphere", guidance_scale=1.0), job()]
    for invariant in (True, False):
        batched = run_batch(model, [BatchItem(s) for s in specs], invariant=invariant)
        for spec, result in zip(specs, batched, strict=True):
            (alone,) = run_batch(model, [BatchItem(spec)], invariant=True)
            if invariant:
                assert_identical(pixels(result), pixels(alone))
            else:
                assert max_diff(pixels(result), pixels(alone)) <= FAST_TOLERANCE


def test_a_plain_prompt_reaches_the_stock_pipeline_as_text(model: LoadedModel) -> None:
    """No weighting syntax and one window: the stock pipeline gets the strings, as before
    weighting existed (so its images are today's, byte for byte), and the batch loop the
    pipeline's own `encode_prompt` of them (the byte-identity tests above)."""
    assert model.prompts is not None
    spec = job(prompt="a red cube, (tiny) world", negative_prompt="blurry")
    assert "prompt_embeds" in model.prompts.stock_inputs(spec, 1, model.device)
    spec = job(prompt="a red cube: the tiny world!", negative_prompt="")
    text = model.prompts.stock_inputs(spec, 2, model.device)
    assert text == {"prompt": [spec.prompt] * 2, "negative_prompt": None}
