"""Properties of the request edge: `GenerationRequest` and `app.resolve.resolve_request`, both
in process (resolution is a pure function of the request, the settings and the model record).

Bodies go through `json.dumps` then `json.loads` before validation, as FastAPI hands them to
pydantic, so NaN, lone surrogates and big integers arrive exactly as a client can send them.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from app.errors import InvalidRequest, Unavailable
from app.resolve import Target, resolve_request
from app.schemas import GenerationRequest
from imagegen.core.contract import SCHEDULER_NAMES, SEED_MAX, JobSpec, ModelInfo
from imagegen.core.settings import Settings

# Derandomized and bounded: the same examples on every run, the whole module in seconds.
PROPERTY = settings(max_examples=200, derandomize=True, deadline=None)

FIELDS = frozenset(GenerationRequest.model_fields)
INT_FIELDS = ("width", "height", "steps", "seed", "n")
TEXT_FIELDS = ("prompt", "negative_prompt")
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")

# Text a client may send: no NUL, no lone surrogates (category Cs).
clean_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
prompts = clean_text.filter(lambda s: bool(s.strip()))
dimensions = st.integers(8, 128).map(lambda k: 8 * k)
finite_guidance = st.floats(0, 30, allow_nan=False) | st.integers(0, 30)
optional_fields: dict[str, st.SearchStrategy[Any]] = {
    "negative_prompt": clean_text,
    "width": st.none() | dimensions,
    "height": st.none() | dimensions,
    "steps": st.none() | st.integers(1, 10**6),
    "guidance_scale": st.none() | finite_guidance,
    "seed": st.none() | st.integers(0, SEED_MAX),
    "n": st.integers(1, 10**6),
    "scheduler": st.none() | st.text(min_size=1, max_size=64),
    "model": st.none() | st.from_regex(MODEL_ID, fullmatch=True),
    # Images in: absent here (their content is checked by decoding, in app.images_in).
    "image": st.none(),
    "strength": st.none(),
    "mask": st.none(),
    "outpaint": st.none(),
    "mask_blur": st.none(),
    "padding_mask_crop": st.none(),
    # Adapters: absent here (their ids are checked against the model's, at resolve).
    "loras": st.none(),
    "control": st.none(),
    "controls": st.none(),
    # Webhooks: absent here (their URLs are resolved and checked, in tests/e2e/test_webhooks.py).
    "webhook": st.none(),
    "output_format": st.none() | st.sampled_from(["png", "jpeg", "webp"]),
    "output_compression": st.none() | st.integers(0, 100),
}
valid_bodies = st.fixed_dictionaries({"prompt": prompts}, optional=optional_fields)


def parse(body: dict[str, Any]) -> GenerationRequest:
    """Validate `body` as the gateway does: from the JSON a client would send."""
    return GenerationRequest.model_validate(json.loads(json.dumps(body)))


def rejection(body: dict[str, Any]) -> list[ErrorDetails]:
    """The pydantic errors of `body` (fails the test if it is accepted)."""
    with pytest.raises(ValidationError) as caught:
        parse(body)
    return caught.value.errors()


def assert_rejected_naming(body: dict[str, Any], field: str) -> None:
    """Rejected, and every error names `field` first in its location, as clients read it."""
    errors = rejection(body)
    assert errors
    assert {error["loc"][:1] for error in errors} == {(field,)}, errors


# -- GenerationRequest ----------------------------------------------------------------------------


@PROPERTY
@given(valid_bodies)
def test_every_valid_body_round_trips(body: dict[str, Any]) -> None:
    request = parse(body)
    assert request.model_dump(exclude_unset=True) == body
    assert GenerationRequest.model_validate_json(request.model_dump_json()) == request


@PROPERTY
@given(valid_bodies, st.text(min_size=1).filter(lambda key: key not in FIELDS), st.integers())
@example({"prompt": "x"}, "job_timeout", 5)
@example({"prompt": "x"}, "Prompt", 5)
def test_an_unknown_key_is_rejected_by_name(body: dict[str, Any], key: str, value: int) -> None:
    errors = rejection({**body, key: value})
    assert [(e["type"], e["loc"]) for e in errors] == [("extra_forbidden", (key,))]


def test_an_unknown_key_that_is_not_unicode_is_rejected() -> None:
    # A lone surrogate cannot be a field name, so pydantic rejects the body as a whole.
    assert rejection({"prompt": "x", "\ud800": 1})


@PROPERTY
@given(
    valid_bodies,
    st.sampled_from(["width", "height"]),
    st.integers().filter(lambda v: v % 8 != 0 or v < 64),
)
@example({"prompt": "x"}, "width", 56)
@example({"prompt": "x"}, "height", 65)
@example({"prompt": "x"}, "width", 0)
@example({"prompt": "x"}, "width", -8)
@example({"prompt": "x"}, "width", 2**64 + 4)
def test_a_width_or_height_off_the_grid_is_rejected(
    body: dict[str, Any], field: str, value: int
) -> None:
    assert_rejected_naming({**body, field: value}, field)


@PROPERTY
@given(
    valid_bodies,
    st.sampled_from([math.nan, math.inf, -math.inf])
    | st.floats().filter(lambda g: not 0 <= g <= 30),
)
def test_guidance_must_be_finite_and_within_0_to_30(body: dict[str, Any], value: float) -> None:
    assert_rejected_naming({**body, "guidance_scale": value}, "guidance_scale")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e309", "-1e309"])
def test_non_finite_guidance_literals_are_rejected(literal: str) -> None:
    raw = f'{{"prompt": "x", "guidance_scale": {literal}}}'
    with pytest.raises(ValidationError) as caught:
        GenerationRequest.model_validate(json.loads(raw))
    assert [e["loc"] for e in caught.value.errors()] == [("guidance_scale",)]


@PROPERTY
@given(valid_bodies, st.integers(max_value=-1) | st.integers(min_value=SEED_MAX + 1))
@example({"prompt": "x"}, -1)
@example({"prompt": "x"}, 2**32)
@example({"prompt": "x"}, 2**64)
def test_a_seed_outside_32_bits_is_rejected(body: dict[str, Any], seed: int) -> None:
    assert_rejected_naming({**body, "seed": seed}, "seed")


@st.composite
def text_with_bad_character(draw: st.DrawFn) -> str:
    """Text holding a NUL or a lone surrogate somewhere."""
    text = draw(clean_text)
    bad = draw(st.just("\x00") | st.characters(categories=["Cs"]))
    at = draw(st.integers(0, len(text)))
    return text[:at] + bad + text[at:] + draw(st.sampled_from(["", "x"]))


@PROPERTY
@given(valid_bodies, st.sampled_from(TEXT_FIELDS), text_with_bad_character())
def test_text_with_nul_or_lone_surrogate_is_rejected(
    body: dict[str, Any], field: str, text: str
) -> None:
    assert_rejected_naming({**body, field: text}, field)


@PROPERTY
@given(valid_bodies, st.sampled_from([*INT_FIELDS, "guidance_scale"]), st.booleans())
def test_a_boolean_is_never_a_number(body: dict[str, Any], field: str, value: bool) -> None:
    assert_rejected_naming({**body, field: value}, field)


@PROPERTY
@given(
    valid_bodies,
    st.sampled_from(INT_FIELDS),
    st.integers(64, 512).map(lambda v: 8 * (v // 8)).map(str) | st.just(2.5) | st.just([64]),
)
def test_an_int_field_takes_only_integers(body: dict[str, Any], field: str, value: Any) -> None:
    # Strict: "64" is not a width; 2.5 steps and [64] are nothing.
    assert_rejected_naming({**body, field: value}, field)


@PROPERTY
@given(
    valid_bodies,
    st.text(max_size=140)
    | st.from_regex(MODEL_ID, fullmatch=True)
    | st.from_regex(MODEL_ID, fullmatch=True).map(lambda m: m + "\n"),
)
@example({"prompt": "x"}, "tiny\n")
@example({"prompt": "x"}, "../etc")
@example({"prompt": "x"}, "a:b")
@example({"prompt": "x"}, "a" * 129)
def test_model_accepts_exactly_the_id_pattern(body: dict[str, Any], model: str) -> None:
    body = {**body, "model": model}
    if MODEL_ID.fullmatch(model):
        assert parse(body).model == model
    else:
        assert_rejected_naming(body, "model")


@PROPERTY
@given(valid_bodies, st.sampled_from(sorted(FIELDS)), st.data())
def test_each_rejection_names_the_one_field_that_is_wrong(
    body: dict[str, Any], field: str, data: st.DataObject
) -> None:
    """Whatever single field is broken, and however, the errors name that field only."""
    # Integral floats (64.0) are integers in JSON, so only fractional ones are bad ints.
    fraction = st.floats().filter(lambda f: not f.is_integer())
    bad_values: dict[str, st.SearchStrategy[Any]] = {
        "prompt": st.just("   ") | text_with_bad_character() | st.integers() | st.none(),
        "negative_prompt": text_with_bad_character() | st.integers() | st.none(),
        "width": st.integers(max_value=63) | st.booleans() | fraction | st.text(),
        "height": st.integers(max_value=63) | st.booleans() | fraction | st.text(),
        "steps": st.integers(max_value=0) | st.booleans() | st.text(),
        "guidance_scale": st.floats(min_value=30.001) | st.booleans() | st.text(),
        "seed": st.integers(min_value=SEED_MAX + 1) | st.booleans() | fraction,
        "n": st.integers(max_value=0) | st.none() | st.booleans(),
        "scheduler": st.just("")
        | st.text(min_size=65)
        | st.integers()
        | st.lists(st.text(), max_size=2),
        "model": st.just("") | st.just("-x") | st.integers() | st.booleans(),
        "image": st.integers() | st.booleans() | st.lists(st.text(), max_size=2),
        "mask": st.integers() | st.booleans() | st.lists(st.text(), max_size=2),
        "strength": st.floats(min_value=1.001)
        | st.just(0.0)
        | st.sampled_from([math.nan, math.inf])
        | st.booleans()
        | st.text(),
        "mask_blur": st.integers(min_value=65)
        | st.integers(max_value=-1)
        | st.booleans()
        | fraction
        | st.text(),
        "padding_mask_crop": st.integers(min_value=1025)
        | st.integers(max_value=-1)
        | st.booleans()
        | st.text(),
        "outpaint": st.integers()
        | st.text()
        | st.just({"left": 7})
        | st.just({"left": 0})
        | st.just({"up": 8}),
        "loras": st.integers()
        | st.text()
        | st.just([{"id": "x"}] * 5)
        | st.just([{"id": "x", "scale": 2.5}])
        | st.just([{"scale": 1.0}]),
        "control": st.integers()
        | st.text()
        | st.just({"id": "x"})
        | st.just({"id": "x", "image": "x", "start": 0.5, "end": 0.5})
        | st.just({"id": "x", "image": "x", "scale": -1}),
        "controls": st.integers()
        | st.just([{"id": "x", "image": "x"}] * 4)
        | st.just([{"id": "x", "image": "x", "preprocess": "hed"}])
        | st.just([{"id": "x", "image": "x", "preprocess": "none", "options": {}}])
        | st.just(
            [{"id": "x", "image": "x", "preprocess": "canny", "options": {"low_threshold": 300}}]
        )
        | st.just([{"id": "x"}]),
        "webhook": st.integers()
        | st.text()
        | st.just({"url": "https://example.com/hook", "events": ["done"]})
        | st.just({"url": "https://example.com/hook", "events": []}),
        "output_format": st.just("PNG") | st.just("jpg") | st.integers() | st.booleans(),
        "output_compression": st.integers(min_value=101)
        | st.integers(max_value=-1)
        | st.booleans()
        | fraction
        | st.text(),
    }
    value = data.draw(bad_values[field], label=field)
    assert_rejected_naming({**body, field: value}, field)


def test_every_field_has_a_bad_value_in_the_property_above() -> None:
    # A new field must be added to `bad_values` (and to `optional_fields`) too.
    assert set(optional_fields) | {"prompt"} == FIELDS


# -- resolve_request ------------------------------------------------------------------------

DEFAULT = ModelInfo(
    id="props-default",
    width=64,
    height=64,
    steps=30,
    guidance_scale=7.5,
    scheduler="euler",
    schedulers=["euler", "ddim"],
)
OTHER = ModelInfo(
    id="props-other",
    width=128,
    height=96,
    steps=8,
    guidance_scale=3.0,
    scheduler="ddim",
    schedulers=list(SCHEDULER_NAMES),
)
MODELS = {m.id: m for m in (DEFAULT, OTHER)}
# Small caps, so that generated requests cross each of them often.
CAPS = {"max_pixels": 128 * 128, "max_steps": 40, "max_n": 4, "max_prompt_chars": 100}


class Resolver:
    """Resolves a request as the gateway does, against the two model records above: the pure
    `resolve_request`, no Redis."""

    def __init__(self, default_model: str = DEFAULT.id) -> None:
        self.settings = Settings(_env_file=None, default_model=default_model, **CAPS)

    def resolve(self, request: GenerationRequest) -> JobSpec:
        model_id = request.model or self.settings.default_model
        target = Target(model_id, MODELS.get(model_id), tuple(MODELS))
        return resolve_request(request, self.settings, target)[0]


def make_service(default_model: str = DEFAULT.id) -> Resolver:
    return Resolver(default_model)


@pytest.fixture(scope="module")
def service() -> Resolver:
    return make_service()


served_bodies = st.fixed_dictionaries(
    {"prompt": clean_text.filter(lambda s: bool(s.strip())).map(lambda s: s[:150])},
    optional={
        **optional_fields,
        "negative_prompt": clean_text.map(lambda s: s[:150]) | st.just("y" * 101),
        "width": st.none() | st.integers(8, 32).map(lambda k: 8 * k),
        "height": st.none() | st.integers(8, 32).map(lambda k: 8 * k),
        "steps": st.none() | st.integers(1, 60),
        "n": st.integers(1, 6),
        "scheduler": st.none() | st.sampled_from(SCHEDULER_NAMES),
        "model": st.sampled_from([None, *MODELS]),
    },
)


def broken_rules(request: GenerationRequest) -> set[str]:
    """The fields whose configured limits `request` breaks, by API.md's rules (the oracle)."""
    info = MODELS[request.model or DEFAULT.id]
    broken = set()
    if len(request.prompt.strip()) > CAPS["max_prompt_chars"]:
        broken.add("prompt")
    if len(request.negative_prompt) > CAPS["max_prompt_chars"]:
        broken.add("negative_prompt")
    width = request.width if request.width is not None else info.width
    height = request.height if request.height is not None else info.height
    if width * height > CAPS["max_pixels"]:
        sent = {f for f in ("width", "height") if getattr(request, f) is not None}
        broken |= sent or {"width", "height"}
    if (request.steps if request.steps is not None else info.steps) > CAPS["max_steps"]:
        broken.add("steps")
    if request.n > CAPS["max_n"]:
        broken.add("n")
    scheduler = request.scheduler if request.scheduler is not None else info.scheduler
    if scheduler not in info.schedulers:
        broken.add("scheduler")
    return broken


@PROPERTY
@given(served_bodies)
def test_resolve_fills_every_default_or_names_a_broken_limit(
    service: Resolver, body: dict[str, Any]
) -> None:
    request = parse(body)
    before = request.model_copy(deep=True)
    broken = broken_rules(request)
    event(f"limits broken: {', '.join(sorted(broken)) or 'none'}")
    if broken:
        with pytest.raises(InvalidRequest) as caught:
            service.resolve(request)
        (detail,) = caught.value.details
        assert detail["field"] in broken, (detail, broken)
        assert caught.value.message.startswith(f"{detail['field']}: ")
        return
    spec = service.resolve(request)
    info = MODELS[request.model or DEFAULT.id]
    assert spec.model == info.id
    assert (spec.width, spec.height) == (request.width or info.width, request.height or info.height)
    assert spec.steps == (request.steps or info.steps)
    expected_guidance = info.guidance_scale
    if request.guidance_scale is not None:
        expected_guidance = request.guidance_scale
    assert spec.guidance_scale == expected_guidance
    assert spec.scheduler == (
        request.scheduler if request.scheduler is not None else info.scheduler
    )
    assert (spec.prompt, spec.negative_prompt, spec.n) == (
        request.prompt,
        request.negative_prompt,
        request.n,
    )
    if request.seed is not None:
        assert spec.seed == request.seed
    assert 0 <= spec.seed <= SEED_MAX
    assert all(0 <= spec.image_seed(i) <= SEED_MAX for i in range(spec.n))
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec
    assert request == before  # resolve fills a new spec; the request is left as it came


@PROPERTY
@given(
    st.from_regex(MODEL_ID, fullmatch=True).filter(lambda m: m not in MODELS),
    st.sampled_from([None, "euler", "\x00", "x" * 64]),
)
def test_an_unknown_model_is_named_whatever_else_is_sent(
    service: Resolver, model: str, scheduler: str | None
) -> None:
    request = GenerationRequest(prompt="x", model=model, scheduler=scheduler)
    with pytest.raises(InvalidRequest) as caught:
        service.resolve(request)
    assert caught.value.details[0]["field"] == "model"
    assert all(m in caught.value.message for m in MODELS)  # the message lists the known ids


@PROPERTY
@given(st.text(min_size=1, max_size=64).filter(lambda s: s not in SCHEDULER_NAMES))
@example("\x00")
@example("EULER")
@example("euler ")
def test_a_scheduler_the_model_lacks_is_named(service: Resolver, scheduler: str) -> None:
    request = GenerationRequest(prompt="x", scheduler=scheduler, model=OTHER.id)
    with pytest.raises(InvalidRequest) as caught:
        service.resolve(request)
    assert caught.value.details[0]["field"] == "scheduler"


def test_an_empty_scheduler_is_named_not_replaced() -> None:
    """Finding 6: "" is rejected naming `scheduler`, never silently made the default."""
    with pytest.raises(ValidationError) as caught:
        GenerationRequest(prompt="x", scheduler="", model=OTHER.id)
    assert caught.value.errors()[0]["loc"] == ("scheduler",)


def test_a_default_model_without_workers_is_unavailable() -> None:
    service = make_service(default_model="props-not-served")
    with pytest.raises(Unavailable):
        service.resolve(GenerationRequest(prompt="x"))
    with pytest.raises(InvalidRequest) as caught:
        service.resolve(GenerationRequest(prompt="x", model="props-not-served-either"))
    assert caught.value.details[0]["field"] == "model"
