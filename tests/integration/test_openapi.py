"""openapi/openapi.json is generated from the app (`imagegen openapi`) and must not drift."""

from __future__ import annotations

import json

from openapi_spec_validator import validate

from app.main import create_app
from tests.stack import ROOT

CHECKED_IN = ROOT / "openapi" / "openapi.json"


def test_openapi_document_matches_the_app() -> None:
    generated = json.loads(json.dumps(create_app().openapi(), sort_keys=True))
    checked_in = json.loads(CHECKED_IN.read_text())
    assert generated == checked_in, "openapi/openapi.json is stale: run `make openapi`"


def test_openapi_document_is_valid() -> None:
    validate(json.loads(CHECKED_IN.read_text()))


def test_every_route_declares_the_error_envelope() -> None:
    spec = json.loads(CHECKED_IN.read_text())
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert "4XX" in operation["responses"], (method, path)
            assert "5XX" in operation["responses"], (method, path)
