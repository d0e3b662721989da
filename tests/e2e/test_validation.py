"""Every validation rule of API.md, each broken once: 422, the envelope, the field named."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import TINY_MODEL_ID
from tests.stack import Gateway

BASE = {"prompt": "a red circle", "model": TINY_MODEL_ID}

# (case name, body changes, field the error must name)
BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("prompt missing", {"prompt": None}, "prompt"),
    ("prompt empty", {"prompt": ""}, "prompt"),
    ("prompt only spaces", {"prompt": "   \n\t "}, "prompt"),
    ("prompt too long", {"prompt": "x" * 2001}, "prompt"),
    ("prompt not a string", {"prompt": 42}, "prompt"),
    ("prompt with NUL", {"prompt": "a\x00b"}, "prompt"),
    ("negative prompt too long", {"negative_prompt": "x" * 2001}, "negative_prompt"),
    ("width not a multiple of 8", {"width": 100}, "width"),
    ("width below 64", {"width": 56}, "width"),
    ("width 7", {"width": 7}, "width"),
    ("width -1", {"width": -1}, "width"),
    ("width 65536", {"width": 65536}, "width"),
    ("width zero", {"width": 0}, "width"),
    ("width negative", {"width": -8}, "width"),
    ("height not a multiple of 8", {"height": 65}, "height"),
    ("width as a string", {"width": "64"}, "width"),
    ("pixels over the cap", {"width": 2048, "height": 1024}, "width"),
    ("steps zero", {"steps": 0}, "steps"),
    ("steps over the cap", {"steps": 151}, "steps"),
    ("steps a float", {"steps": 2.5}, "steps"),
    ("guidance negative", {"guidance_scale": -0.1}, "guidance_scale"),
    ("guidance over 30", {"guidance_scale": 30.5}, "guidance_scale"),
    ("guidance a string", {"guidance_scale": "7"}, "guidance_scale"),
    ("seed negative", {"seed": -1}, "seed"),
    ("seed 2^32", {"seed": 2**32}, "seed"),
    ("seed 2^64", {"seed": 2**64}, "seed"),
    ("seed a bool", {"seed": True}, "seed"),
    ("n zero", {"n": 0}, "n"),
    ("n over the cap", {"n": 9}, "n"),
    ("scheduler unknown", {"scheduler": "lms_magic"}, "scheduler"),
    ("model unknown", {"model": "no-such-model"}, "model"),
    ("unknown field", {"job_timeout": 5}, "job_timeout"),
    ("unknown field at_front", {"at_front": True}, "at_front"),
    ("unknown field depends_on", {"depends_on": "gen_x"}, "depends_on"),
    ("unknown field result_ttl", {"result_ttl": -1}, "result_ttl"),
]


def _post(client: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    payload = {k: v for k, v in {**BASE, **body}.items() if v is not None}
    return client.post("/v1/generations", json=payload)


def _assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in response.text
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("case", "changes", "field"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_body_is_rejected_naming_the_field(
    stack: Gateway, case: str, changes: dict[str, Any], field: str
) -> None:
    with stack.client() as client:
        error = _assert_envelope(_post(client, changes), 422, "invalid_request")
    assert error["message"].startswith(field), error
    if "details" in error:
        assert error["details"][0]["field"] == field


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e309"])
def test_non_finite_guidance_is_rejected(stack: Gateway, raw: str) -> None:
    body = f'{{"prompt": "a red circle", "model": "{TINY_MODEL_ID}", "guidance_scale": {raw}}}'
    with stack.client() as client:
        response = client.post(
            "/v1/generations", content=body, headers={"content-type": "application/json"}
        )
    error = _assert_envelope(response, 422, "invalid_request")
    assert error["message"].startswith("guidance_scale")


def test_lone_surrogate_in_prompt_is_rejected(stack: Gateway) -> None:
    body = f'{{"prompt": "a \\ud800 circle", "model": "{TINY_MODEL_ID}"}}'
    with stack.client() as client:
        response = client.post(
            "/v1/generations", content=body, headers={"content-type": "application/json"}
        )
    error = _assert_envelope(response, 422, "invalid_request")
    assert error["message"].startswith("prompt")


@pytest.mark.parametrize("body", ["{", "not json", "[1, 2]", '"a string"', ""])
def test_malformed_json_gets_the_envelope(stack: Gateway, body: str) -> None:
    with stack.client() as client:
        response = client.post(
            "/v1/generations", content=body, headers={"content-type": "application/json"}
        )
    _assert_envelope(response, 422, "invalid_request")


def test_limits_at_the_edge_are_accepted(stack: Gateway) -> None:
    """The boundaries themselves are valid: 64 px, 2000 chars, seed 2^32-1, 30 guidance."""
    body = {
        "prompt": "x" * 2000,
        "negative_prompt": "y" * 2000,
        "width": 64,
        "height": 64,
        "steps": 1,
        "guidance_scale": 30,
        "seed": 2**32 - 1,
        "n": 1,
    }
    with stack.client() as client:
        response = _post(client, body)
        assert response.status_code == 202, response.text
        doc = response.json()
    assert doc["request"]["seed"] == 2**32 - 1
    assert doc["request"]["guidance_scale"] == 30


@pytest.mark.parametrize(
    "path",
    [
        "/v1/generations/gen_doesnotexist0000000000",
        "/v1/generations/../../etc/passwd",
        "/v1/generations/%2e%2e%2f",
        "/v1/generations/a:b",
        "/v1/generations/" + "a" * 10_000,
        "/v1/generations/gen_doesnotexist0000000000/images/0",
        "/v1/nothing-here",
    ],
)
def test_unknown_ids_and_routes_are_404_envelopes(stack: Gateway, path: str) -> None:
    with stack.client() as client:
        response = client.get(path)
    _assert_envelope(response, 404, "not_found")
