"""Settings split per process: each reads and validates its own, lists are read once."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from imagegen.core.settings import (
    CommonSettings,
    FaultSettings,
    GatewaySettings,
    Settings,
    WorkerSettings,
)


def test_each_process_ignores_another_process_s_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_MAX_STEPS", "0")  # the gateway's, invalid
    monkeypatch.setenv("IMAGEGEN_DEVICE", "tpu")  # the worker's, invalid
    with pytest.raises(ValidationError, match="max_steps"):
        GatewaySettings(_env_file=None)
    with pytest.raises(ValidationError, match="device"):
        WorkerSettings(_env_file=None)
    monkeypatch.delenv("IMAGEGEN_DEVICE")
    assert WorkerSettings(_env_file=None).device == "auto"
    monkeypatch.setenv("IMAGEGEN_DEVICE", "tpu")
    monkeypatch.delenv("IMAGEGEN_MAX_STEPS")
    assert GatewaySettings(_env_file=None).max_steps == 150


def test_the_classes_hold_disjoint_fields_and_settings_holds_them_all() -> None:
    common = set(CommonSettings.model_fields)
    gateway = set(GatewaySettings.model_fields) - common
    worker = set(WorkerSettings.model_fields) - common
    faults = set(FaultSettings.model_fields)
    assert gateway and worker and not gateway & worker
    assert not faults & (gateway | worker | common), "test switches stay apart"
    assert set(Settings.model_fields) == common | gateway | worker
    assert {"fault_injection", "fault_crash_at"} == faults


def test_list_settings_are_lists_read_from_comma_separated_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IMAGEGEN_MODELS", " a=/models/a , stabilityai/sdxl-turbo,, ")
    monkeypatch.setenv("IMAGEGEN_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("IMAGEGEN_COMPILE_BATCHES", "8, 2,1,2")
    monkeypatch.setenv("IMAGEGEN_WEBHOOK_ALLOWED_HOSTS", "10.0.0.0/8:443,hooks.internal")
    settings = Settings(_env_file=None)
    assert settings.models == ["a=/models/a", "stabilityai/sdxl-turbo"]
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.compile_batches == (1, 2, 8)
    assert settings.webhook_allow_list.names("hooks.internal", 443)
    assert settings.webhook_allow_list.names("10.1.2.3", 443)
    assert not settings.webhook_allow_list.names("10.1.2.3", 80)
    assert Settings(_env_file=None, api_keys=[]).api_keys == []


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("IMAGEGEN_COMPILE_BATCHES", "1,zero", "positive integers"),
        ("IMAGEGEN_COMPILE_BATCHES", "0,4", "positive integers"),
        ("IMAGEGEN_WEBHOOK_ALLOWED_HOSTS", "127.0.0.1:99999", "port must be 1..65535"),
    ],
)
def test_a_bad_list_entry_is_refused_when_the_settings_are_read(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings(_env_file=None)
