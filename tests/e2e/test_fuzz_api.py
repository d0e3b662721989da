"""Schemathesis against the gateway's own OpenAPI document, over real HTTP to the real stack.

Every operation of `create_app().openapi()` (the document `openapi/openapi.json` is generated
from) gets schema-valid and schema-breaking requests: boundary values and each constraint
broken once (the coverage phase), then derandomized Hypothesis examples. Every answer must be:
no 5xx, a documented status code, a body that matches the declared model (the error envelope
for 4XX/5XX), the declared content type and headers, a 4xx for a schema-breaking request and
no 422 for a request that keeps the schema and API.md's rules.

Jobs the fuzzer creates are canceled as soon as they are made (a queued job leaves its queue),
and `fuzz_target` cancels any a failing example left behind, so the rest of the session, which
shares these workers, finds empty queues and idle workers. The OpenAI-compatible endpoint
waits for its job, so its accepted bodies are steered to one tiny image.

What it found (SSE description, 405 Allow, 400→422, schema limits, integral floats, an empty
scheduler, pndm with too few steps) is fixed and kept as regression tests at the end.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import pytest
import redis
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import (
    CheckContext,
    CheckFunction,
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.a1111 import A1111Request
from app.main import EVENT_SCHEMA, create_app
from imagegen.core.contract import (
    SCHEDULER_MIN_STEPS,
    SCHEDULER_NAMES,
    SEED_MAX,
    Keys,
    WorkerHeartbeat,
)
from imagegen.core.settings import Settings
from tests.conftest import TINY_MODEL_ID
from tests.stack import Gateway, wait_for_job

# One fuzzing session: its generated cases name the two jobs `fuzz_target` seeds.
pytestmark = pytest.mark.shares_redis_state

SEED = 20240611
# Hypothesis examples per operation (both generation modes together), on top of the
# coverage-phase cases. 100 sent 3790 requests in 107 s (half of it generating and checking
# cases); the seed fixes them, so a CI run repeats the same ones. FUZZ_EXAMPLES=500 goes
# deeper by hand.
MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))
REQUEST_TIMEOUT_S = 20
SUBMIT = "POST /v1/generations"
# OpenAI's images.generate: answers once the job is done, so its accepted bodies are kept small.
OPENAI = "POST /v1/images/generations"
# The control preview answers once its small job is done; a model with controls makes it.
PREPROCESS = "POST /v1/control/preprocess"
# Trainings: accepted ones are canceled at once (no worker of this stack trains).
TRAINING = "POST /v1/trainings"
A1111 = {
    "txt2img": "POST /sdapi/v1/txt2img",
    "img2img": "POST /sdapi/v1/img2img",
    "options": "POST /sdapi/v1/options",
    "png-info": "POST /sdapi/v1/png-info",
}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# Valid inputs for schema-valid bodies: a generated string is no image, which the schema
# cannot say (the content is checked by decoding it).
INPUT_PNG = _png(Image.new("RGB", (64, 64), (200, 30, 30)))
MASK_PNG = _png(Image.new("L", (64, 64), 255))

# The test gateway runs with default settings; the served models are the `stack` fixture's.
LIMITS = {name: info.default for name, info in Settings.model_fields.items()}
SERVED_MODELS = sorted({TINY_MODEL_ID, LIMITS["default_model"]})

CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "generation": {
            "mode": "all",
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",
        },
        "phases": {
            "examples": {"enabled": True},
            "coverage": {"enabled": True},
            "fuzzing": {"enabled": True},
            "stateful": {"enabled": False},
        },
        "request-timeout": REQUEST_TIMEOUT_S,
        # The event stream of a finished job ends by itself; this bounds any other.
        "max-stream-events": 20,
    }
)


APP_SPEC = create_app().openapi()
# /v1/images/edits is multipart: schemathesis sends its file fields (OpenAPI 3.1
# `contentMediaType`, no `format: binary`) as plain form fields, which no upload can be. Its
# rules are tested with the openai client and raw multipart in tests/e2e/test_openai_edits.py; the
# JSON fields of images in (`image`, `mask`, `strength`, `outpaint`) are fuzzed here.
SCHEMA = schemathesis.openapi.from_dict(APP_SPEC, config=CONFIG).exclude(path="/v1/images/edits")


def no_rate_limiting(ctx: CheckContext, response: Any, case: schemathesis.Case) -> bool | None:
    """A 429 `rate_limited` conforms, but from then on the run would only test the limiter."""
    if response.status_code == 429 and b"rate_limited" in response.content:
        raise AssertionError(
            "the fuzz run used up the gateway's request budget: raise "
            "IMAGEGEN_RATE_LIMIT_PER_MINUTE for the test gateway or lower MAX_EXAMPLES"
        )
    return None


CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    no_rate_limiting,
]


@dataclass
class FuzzState:
    """Real jobs for generated path parameters to name, and jobs made but not yet canceled."""

    job_ids: list[str] = field(default_factory=list)
    pending: set[str] = field(default_factory=set)


STATE = FuzzState()


@pytest.fixture(scope="module")
def api_headers(request: pytest.FixtureRequest) -> dict[str, str]:
    """Headers every request carries: where auth goes once the test gateway needs a key.

    The key comes from IMAGEGEN_TEST_API_KEY, else from an `api_key` fixture if conftest grows
    one. The `stack` gateway is open today, so neither is set and no header is sent.
    """
    key = os.environ.get("IMAGEGEN_TEST_API_KEY")
    if key is None:
        try:
            key = request.getfixturevalue("api_key")
        except pytest.FixtureLookupError:
            key = None
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.fixture(scope="module")
def fuzz_target(
    stack: Gateway, redis_conn: redis.Redis, api_headers: dict[str, str]
) -> Iterator[Gateway]:
    """The stack, with a succeeded and a canceled job for generated path parameters to name;
    at the end, nothing of the fuzzer's is left queued or running."""
    with stack.client(headers=api_headers) as client:
        small = {"model": TINY_MODEL_ID, "width": 64, "height": 64, "steps": 2, "seed": 7}
        done = client.post("/v1/generations", json={"prompt": "fuzz target", "n": 2, **small})
        assert done.status_code == 202, done.text
        gone = client.post("/v1/generations", json={"prompt": "fuzz canceled", **small})
        assert gone.status_code == 202, gone.text
        assert client.delete(f"/v1/generations/{gone.json()['id']}").status_code == 200
        assert wait_for_job(client, done.json()["id"], timeout_s=60)["status"] == "succeeded"
        STATE.job_ids = [done.json()["id"], gone.json()["id"]]
    yield stack
    with stack.client(headers=api_headers) as client:
        for job_id in sorted(STATE.pending):
            client.delete(f"/v1/generations/{job_id}")
    STATE.pending.clear()
    _wait_for_idle_workers(redis_conn)


def _wait_for_idle_workers(connection: redis.Redis, timeout_s: float = 30) -> None:
    # A canceled job that a worker had already started stops at its next denoising step.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        beats = [connection.get(key) for key in connection.scan_iter(match=Keys.worker("*"))]
        workers = [WorkerHeartbeat.model_validate_json(b) for b in beats if b is not None]
        if all(worker.state != "busy" for worker in workers):
            return
        time.sleep(0.2)


@SCHEMA.hook
def flatmap_path_parameters(
    context: schemathesis.HookContext, path_parameters: dict[str, Any] | None
) -> st.SearchStrategy[dict[str, Any] | None]:
    """Aim a share of requests at real jobs (and their images), so 200s get checked too."""
    if not STATE.job_ids or not path_parameters or "job_id" not in path_parameters:
        return st.just(path_parameters)
    job = st.sampled_from([path_parameters["job_id"], *STATE.job_ids])
    if "index" not in path_parameters:
        return job.map(lambda job_id: {**path_parameters, "job_id": job_id})
    index = st.sampled_from([path_parameters["index"], 0, 1])
    return st.tuples(job, index).map(
        lambda pair: {**path_parameters, "job_id": pair[0], "index": pair[1]}
    )


@SCHEMA.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    """Make a schema-valid submission also keep the rules that the schema cannot state.

    Served models and schedulers are whatever workers announce; the limits are settings
    (finding 4 asks for them in the schema); `64.0` is an integer to JSON Schema but not to
    the server (finding 5). With these kept, `positive_data_acceptance` can demand a 2xx.
    """
    body = case.body
    meta = case.meta
    if case.operation.label in A1111.values() and isinstance(body, dict) and meta is not None:
        if meta.generation.mode.is_positive:
            _keep_a1111_rules(body, case.operation.label)
        return case
    if case.operation.label == PREPROCESS and isinstance(body, dict) and meta is not None:
        if meta.generation.mode.is_positive:
            _keep_preprocess_rules(body)
        return case
    if case.operation.label == TRAINING and isinstance(body, dict) and meta is not None:
        if meta.generation.mode.is_positive:
            _keep_training_rules(body, case)
        return case
    if (
        case.operation.label not in (SUBMIT, OPENAI)
        or not isinstance(body, dict)
        or meta is None
        or not meta.generation.mode.is_positive
    ):
        return case
    key = (case.headers or {}).get("Idempotency-Key")
    if isinstance(key, str):
        # One key per body: the same key with another body is a 409 that would stand in for
        # the 202 under test (the replay of an identical body, a 200, still happens).
        case.headers = {**(case.headers or {}), "Idempotency-Key": f"{key[:240]}-{_digest(body)}"}
    for name, value in list(body.items()):
        if isinstance(value, float) and value.is_integer() and name != "guidance_scale":
            body[name] = int(value)
    _keep_generation_rules(body)
    if case.operation.label == OPENAI:
        _keep_openai_answer_quick(body)
    return case


A1111_FIELDS = set(A1111Request.model_fields)


def _keep_preprocess_rules(body: dict[str, Any]) -> None:
    """A served model with controls (the built-in one), a real picture, one of its
    preprocessors, options only for canny, a small size."""
    body["model"] = "shapes-64" if body.get("model") is not None else None
    body["image"] = base64.b64encode(INPUT_PNG).decode()
    if body.get("preprocess") not in ("none", "canny", "scribble"):
        body["preprocess"] = _pick(["none", "canny", "scribble"], body.get("preprocess"))
    if body.get("preprocess") != "canny":
        body.pop("options", None)
    elif isinstance(body.get("options"), dict):
        body["options"] = {"low_threshold": 40, "high_threshold": 120}
    for name in ("width", "height"):
        if isinstance(body.get(name), int | float):
            body[name] = 64


def _keep_training_rules(body: dict[str, Any], case: schemathesis.Case) -> None:
    """A served model, a name and a new trigger word as the API states them, real pictures
    with short captions, a cost under the cap; one Idempotency-Key per body."""
    if body.get("model") is not None:
        body["model"] = _pick(SERVED_MODELS, body["model"])
    body["name"] = "fuzz"
    body["trigger_word"] = "zxq"
    if case.media_type == "multipart/form-data":
        # The pictures as a zip (the schema can only say "a file"), the options as text.
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as pictures:
            pictures.writestr("00.png", INPUT_PNG)
            pictures.writestr("00.txt", "a zxq")
        body["images"] = archive.getvalue()
        body.pop("images[]", None)
        body.pop("captions[]", None)
        if isinstance(body.get("webhook"), str):
            body["webhook"] = "https://hooks.example.com/imagegen"
    elif isinstance(body.get("images"), list):
        body["images"] = [
            {"image": base64.b64encode(INPUT_PNG).decode(), "caption": "a zxq"}
            for _ in body["images"][:2]
        ] or [{"image": base64.b64encode(INPUT_PNG).decode()}]
    if isinstance(body.get("steps"), int):
        body["steps"] = min(body["steps"], 100)
    if isinstance(body.get("webhook"), dict):
        body["webhook"]["url"] = "https://hooks.example.com/imagegen"
    key = (case.headers or {}).get("Idempotency-Key")
    if isinstance(key, str):
        case.headers = {**(case.headers or {}), "Idempotency-Key": f"{key[:240]}-{_digest(body)}"}


def _keep_a1111_rules(body: dict[str, Any], label: str) -> None:
    """An A1111 request as its clients send it, small and within the native rules (the
    translation itself is tested with webuiapi in tests/e2e/test_a1111.py)."""
    if label == A1111["options"]:
        if "sd_model_checkpoint" in body:
            body["sd_model_checkpoint"] = _pick(SERVED_MODELS, body["sd_model_checkpoint"])
        return
    if label == A1111["png-info"]:
        body["image"] = base64.b64encode(INPUT_PNG).decode()  # a PNG, as the schema cannot say
        return
    for name in [k for k in body if k not in A1111_FIELDS]:
        del body[name]
    prompt = str(body.get("prompt") or "").replace("\x00", "").replace("<", "").strip()
    body["prompt"] = prompt[: LIMITS["max_prompt_chars"]] or "a prompt"
    body["negative_prompt"] = str(body.get("negative_prompt") or "").replace("\x00", "")[:100]
    body.update(width=64, height=64, batch_size=1, n_iter=1, steps=2, override_settings={})
    body["sampler_name"] = _pick(["Euler", "Euler a", "DDIM"], body.get("sampler_name"))
    body["sampler_index"] = None
    body["scheduler"] = None
    if label == A1111["img2img"]:
        body["init_images"] = [base64.b64encode(INPUT_PNG).decode()]
        body["mask"] = base64.b64encode(MASK_PNG).decode() if body.get("mask") else None
        body["denoising_strength"] = 1.0
    else:
        for name in ("init_images", "mask", "denoising_strength"):
            body.pop(name, None)


def _keep_generation_rules(body: dict[str, Any]) -> None:
    if body.get("model") is not None and body["model"] not in SERVED_MODELS:
        body["model"] = _pick(SERVED_MODELS, body["model"])
    if body.get("scheduler") is not None and body["scheduler"] not in SCHEDULER_NAMES:
        body["scheduler"] = _pick(list(SCHEDULER_NAMES), body["scheduler"])
    chars = LIMITS["max_prompt_chars"]
    if isinstance(body.get("prompt"), str):
        prompt = body["prompt"].replace("\x00", "").strip()[:chars]
        body["prompt"] = prompt if prompt else "a prompt"
    if isinstance(body.get("negative_prompt"), str):
        body["negative_prompt"] = body["negative_prompt"].replace("\x00", "")[:chars]
    if isinstance(body.get("steps"), int):
        body["steps"] = 1 + (body["steps"] - 1) % LIMITS["max_steps"]
    if isinstance(body.get("n"), int):
        body["n"] = 1 + (body["n"] - 1) % LIMITS["max_n"]
    if isinstance(body.get("seed"), int):
        body["seed"] %= SEED_MAX + 1
    if isinstance(body.get("guidance_scale"), float | int):
        body["guidance_scale"] = min(max(body["guidance_scale"], 0), 30)
    width, height = body.get("width"), body.get("height")
    native = 64  # both served models' native size, used where the body leaves one out
    if isinstance(width, int) and width * (height or native) > LIMITS["max_pixels"]:
        body["width"] = 64
    if isinstance(height, int) and height * (body.get("width") or native) > LIMITS["max_pixels"]:
        body["height"] = 64
    # Accepted jobs are canceled at once, but one may already be running on a 2-core CPU,
    # where a 1024x1024 step of the tiny model takes minutes: keep the work small.
    for name in ("width", "height"):
        if isinstance(body.get(name), int) and body[name] > 128 and body[name] % 8 == 0:
            body[name] = 128
    if isinstance(body.get("steps"), int):
        body["steps"] = min(body["steps"], 4)
    if isinstance(body.get("n"), int):
        body["n"] = min(body["n"], 2)
    _keep_scheduler_minimum(body)
    _keep_image_rules(body)
    _drop_adapters(body)
    if isinstance(body.get("webhook"), dict):
        # A public https destination (whether or not the name resolves here, it is accepted).
        body["webhook"]["url"] = "https://hooks.example.com/imagegen"


def _keep_image_rules(body: dict[str, Any]) -> None:
    """Images in: real images, and the cross-field rules (mask/outpaint/strength need an image,
    mask_blur/padding_mask_crop a mask, outpaint excludes mask, not all sides 0, steps ×
    strength leaves a step)."""
    inpainting = ("mask_blur", "padding_mask_crop")
    present = {
        k for k in ("image", "mask", "outpaint", "strength", *inpainting) if body.get(k) is not None
    }
    if not present:
        return
    if present & set(inpainting):
        body["mask"] = "a mask"  # replaced by a real one below
        body.pop("outpaint", None)
    body["image"] = base64.b64encode(INPUT_PNG).decode()
    if isinstance(body.get("outpaint"), dict):
        body.pop("mask", None)
        sides = {k: (v % 5) * 8 for k, v in body["outpaint"].items() if isinstance(v, int)}
        body["outpaint"] = sides if any(sides.values()) else {"right": 8}
    if body.get("mask") is not None:
        body["mask"] = base64.b64encode(MASK_PNG).decode()
    if isinstance(body.get("width"), int) or isinstance(body.get("height"), int):
        body.pop("outpaint", None)  # an explicit size with margins may leave no room
    strength = body.get("strength")
    if not isinstance(strength, float | int):
        strength = 0.8  # image-to-image's default
    minimum = SCHEDULER_MIN_STEPS.get(str(body.get("scheduler")), 1)
    if int((body.get("steps") or 4) * strength) < minimum:
        body["strength"] = 1.0


def _keep_scheduler_minimum(body: dict[str, Any]) -> None:
    # A cross-field rule the schema cannot state: some schedulers need a few steps.
    minimum = SCHEDULER_MIN_STEPS.get(str(body.get("scheduler")), 1)
    if isinstance(body.get("steps"), int) and body["steps"] < minimum:
        body["steps"] = minimum


def _keep_openai_answer_quick(body: dict[str, Any]) -> None:
    # The OpenAI endpoint answers only once the images exist: keep each job small.
    body["model"] = TINY_MODEL_ID
    body["n"] = 1
    body["steps"] = min(body.get("steps") or 2, 2)
    if body.get("size") not in (None, "auto"):
        body["size"] = "64x64"
    _keep_scheduler_minimum(body)
    _keep_image_rules(body)  # again: fewer steps may leave strength x steps below one step
    _drop_adapters(body)


def _drop_adapters(body: dict[str, Any]) -> None:
    # `loras` / `control(s)` name a model's own adapters, which the schema cannot list (the
    # served tiny model has none): their rules are tested in tests/e2e/test_adapters_http.py.
    body.pop("loras", None)
    body.pop("control", None)
    body.pop("controls", None)


def _digest(value: object) -> str:
    """A stable digest of a generated value (`hash()` is salted per process)."""
    return f"{zlib.crc32(repr(value).encode()):08x}"


def _pick(options: list[str], generated: object) -> str:
    """A stable choice from `options` for a generated value."""
    return options[int(_digest(generated), 16) % len(options)]


@SCHEMA.parametrize()
def test_every_operation_conforms(
    case: schemathesis.Case, fuzz_target: Gateway, api_headers: dict[str, str]
) -> None:
    """No 5xx; status, body, content type and headers as documented; bad input rejected."""

    def call(checked: schemathesis.Case) -> Any:
        return checked.call_and_validate(
            base_url=fuzz_target.base_url,
            headers=api_headers,
            checks=CHECKS,
            timeout=REQUEST_TIMEOUT_S,
        )

    response = call(case)
    if case.operation.label == TRAINING and response.status_code in (200, 202):
        training = response.json()["id"]
        call(SCHEMA["/v1/trainings/{training_id}"]["DELETE"].Case(
            path_parameters={"training_id": training}
        ))  # fmt: skip
    if case.operation.label == SUBMIT and response.status_code in (200, 202):
        job_id = response.json()["id"]
        STATE.pending.add(job_id)
        # Canceled at once: the shared queues stay empty, and DELETE's answer is checked on a
        # job in whatever state this fuzzed request put it.
        call(SCHEMA["/v1/generations/{job_id}"]["DELETE"].Case(path_parameters={"job_id": job_id}))
        STATE.pending.discard(job_id)


# -- regressions of what the fuzzer found ------------------------------------------------------


def test_event_streams_are_described_as_sent() -> None:
    """Finding 1: one event per 2xx schema; a stream's errors are JSON envelopes."""
    operation = APP_SPEC["paths"]["/v1/generations/{job_id}/events"]["get"]
    for status, response in operation["responses"].items():
        if str(status).startswith("2"):
            assert response["content"]["text/event-stream"]["schema"] == EVENT_SCHEMA
        elif "content" in response:
            assert set(response["content"]) == {"application/json"}, status


@pytest.mark.parametrize(("method", "path"), [("PUT", "/v1/models"), ("PATCH", "/v1/generations")])
def test_method_not_allowed_names_the_allowed_methods(
    fuzz_target: Gateway, api_headers: dict[str, str], method: str, path: str
) -> None:
    with fuzz_target.client(headers=api_headers) as client:
        response = client.request(method, path)
    assert response.status_code == 405, response.text
    assert response.headers.get("allow"), dict(response.headers)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "\xff\xfe"}',
        b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}",
    ],
    ids=["invalid utf-8", "deep nesting", "huge integer"],
)
def test_unparseable_body_is_422(
    fuzz_target: Gateway, api_headers: dict[str, str], raw: bytes
) -> None:
    with fuzz_target.client(headers=api_headers) as client:
        response = client.post(
            "/v1/generations", content=raw, headers={"content-type": "application/json"}
        )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    "changes",
    [
        {"prompt": ""},
        {"prompt": " \t"},
        {"prompt": "x" * 2001},
        {"prompt": "a\x00b"},
        {"negative_prompt": "x" * 2001},
        {"steps": 151},
        {"n": 9},
        {"width": 64.0},
        {"seed": 5.0},
    ],
    ids=["empty", "blank", "long prompt", "NUL", "long negative", "steps", "n", "64.0", "seed 5.0"],
)
def test_a_body_the_schema_accepts_is_accepted(
    fuzz_target: Gateway, api_headers: dict[str, str], changes: dict[str, Any]
) -> None:
    body = {"prompt": "x", "model": TINY_MODEL_ID, "width": 64, "height": 64, **changes}
    request_schema = APP_SPEC["components"]["schemas"]["GenerationRequest"]
    if not jsonschema.Draft202012Validator(request_schema).is_valid(body):
        return  # the schema states the rule, so a 422 is what the document promises
    with fuzz_target.client(headers=api_headers) as client:
        response = client.post("/v1/generations", json=body)
        if response.status_code in (200, 202):
            client.delete(f"/v1/generations/{response.json()['id']}")
    assert response.status_code == 202, response.text


HUGE = [2**31, 2**40, 2**63, 10**30]
# Every route that takes images, each with sizes and margins past any cap (every size is
# checked before pixel work, so none of them may cost more than a small refused request) and
# nesting past any parser's depth: a 422 naming the field, never a 5xx or a reset connection.
IMAGE_ROUTE_CASES = [
    *[("native", {"width": v, "height": 64}, "width") for v in HUGE],
    *[("native", {"height": v}, "height") for v in HUGE],
    *[("native", {"outpaint": {"left": v}}, "outpaint") for v in HUGE],
    *[("native", {"outpaint": {"right": 8, "bottom": v}}, "outpaint") for v in HUGE],
    *[("native", {"control": {"id": "x", "image": "", "scale": v}}, "control.scale") for v in HUGE],
    ("native", {"outpaint": {"left": [[[[8]]]]}}, "outpaint.left"),
    *[("edits", {"size": f"{v}x64"}, "size") for v in HUGE],
    *[("edits", {"outpaint": json.dumps({"left": v})}, "outpaint") for v in HUGE],
    ("edits", {"outpaint": "[" * 50000}, "outpaint"),
    ("edits", {"outpaint": "[" * 2000 + "]" * 2000}, "outpaint"),
    ("edits", {"steps": str(2**63)}, "steps"),
    *[("openai", {"size": f"{v}x{v}"}, "size") for v in HUGE],
    ("openai", {"prompt": "(" * 995 + "x"}, "prompt"),
]


@pytest.mark.parametrize(("route", "changes", "field"), IMAGE_ROUTE_CASES)
def test_integer_and_nesting_cases_on_every_image_route(
    fuzz_target: Gateway,
    api_headers: dict[str, str],
    route: str,
    changes: dict[str, Any],
    field: str,
) -> None:
    image = _png(Image.new("RGB", (64, 64), (10, 200, 10)))
    with fuzz_target.client(headers=api_headers) as client:
        if route == "native":
            body = {
                "prompt": "x",
                "model": TINY_MODEL_ID,
                "image": base64.b64encode(image).decode(),
            }
            response = client.post("/v1/generations", json={**body, **changes})
        elif route == "edits":
            form = {"prompt": "x", "model": TINY_MODEL_ID, **changes}
            files = {"image": ("in.png", image, "image/png")}
            response = client.post("/v1/images/edits", data=form, files=files)
        else:
            body = {"prompt": "x", "model": TINY_MODEL_ID, **changes}
            response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 422, response.text
    fields = [d.get("field", "") for d in response.json()["error"].get("details", [])]
    assert any(f == field or f.startswith(field) for f in fields), (fields, response.text)
