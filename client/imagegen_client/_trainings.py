"""Trainings (`client.trainings`): fine-tune a model on your pictures into a LoRA only your API
key can use, follow it, and use, download or delete the adapter it makes."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

from ._base import Deadline, poll_delays
from ._errors import ImagegenError
from ._types import ErrorInfo

TRAININGS = "/v1/trainings"
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# A picture given as a path, bytes, or (picture, caption).
PictureInput = str | Path | bytes
Pictures = str | Path | bytes | Sequence[PictureInput | tuple[PictureInput, str | None]]


@dataclass(frozen=True)
class TrainingProgress:
    step: int
    total_steps: int
    loss: float | None
    eta_s: float | None


@dataclass(frozen=True)
class TrainedAdapter:
    """The LoRA a succeeded training made: put its `id` in a generation's `loras` and write
    `trigger_word` in the prompt."""

    id: str
    model: str
    trigger_word: str


@dataclass(frozen=True)
class Training:
    """A training's document (`GET /v1/trainings/{id}`)."""

    id: str
    status: str
    model: str
    name: str
    trigger_word: str
    images: int
    progress: TrainingProgress
    adapter: TrainedAdapter | None
    error: ErrorInfo | None
    checkpoint_step: int
    resumed_from_step: int
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def is_terminal(self) -> bool:
        return self.status in ("succeeded", "failed", "canceled")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Training:
        progress = data.get("progress") or {}
        adapter = data.get("adapter")
        error = data.get("error")
        return cls(
            id=str(data["id"]),
            status=str(data["status"]),
            model=str(data.get("model", "")),
            name=str(data.get("name", "")),
            trigger_word=str(data.get("trigger_word", "")),
            images=int(data.get("images", 0)),
            progress=TrainingProgress(
                step=int(progress.get("step", 0)),
                total_steps=int(progress.get("total_steps", 0)),
                loss=progress.get("loss"),
                eta_s=progress.get("eta_s"),
            ),
            adapter=TrainedAdapter(**adapter) if isinstance(adapter, dict) else None,
            error=ErrorInfo(code=error["code"], message=error["message"]) if error else None,
            checkpoint_step=int(data.get("checkpoint_step", 0)),
            resumed_from_step=int(data.get("resumed_from_step", 0)),
            raw=data,
        )


class TrainingError(ImagegenError):
    """A training did not make an adapter (failed, canceled, or `wait` ran out of time);
    `training` is its last known document."""

    def __init__(self, message: str, training: Training, *, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.training = training


def pictures_zip(pictures: Pictures) -> bytes:
    """The pictures as the zip the API takes: a zip file or a folder (pictures with optional
    same-name `.txt` captions), or a list of pictures (paths or bytes, or (picture, caption))."""
    if isinstance(pictures, bytes):
        return pictures  # a zip already
    if isinstance(pictures, str | Path):
        path = Path(pictures)
        if path.is_file():
            return path.read_bytes()
        items: list[tuple[PictureInput, str | None]] = []
        for file in sorted(path.iterdir()):
            if file.suffix.lower() in PICTURE_SUFFIXES:
                text = file.with_suffix(".txt")
                items.append((file, text.read_text() if text.is_file() else None))
    else:
        items = [p if isinstance(p, tuple) else (p, None) for p in pictures]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, (picture, caption) in enumerate(items):
            data = picture if isinstance(picture, bytes) else Path(picture).read_bytes()
            suffix = Path(picture).suffix.lower() if not isinstance(picture, bytes) else ".png"
            archive.writestr(f"{i:04d}{suffix}", data)
            if caption:
                archive.writestr(f"{i:04d}.txt", caption)
    return buffer.getvalue()


def _create_request(
    http: httpx.Client | httpx.AsyncClient,
    pictures: Pictures,
    fields: Mapping[str, object],
    idempotency_key: str | None,
) -> httpx.Request:
    """`POST /v1/trainings` as multipart: the pictures' zip and the fields that were given."""
    data = {k: str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in fields.items() if v is not None}  # fmt: skip
    files = {"images": ("pictures.zip", pictures_zip(pictures), "application/zip")}
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    return http.build_request("POST", TRAININGS, data=data, files=files, headers=headers)


def _finished(current: Training, deadline: Deadline | None) -> bool:
    """Whether `wait` is over with `current`: True once it succeeded; raises TrainingError when
    it failed or was canceled, or the deadline passed; False to poll again."""
    if current.is_terminal:
        if current.status == "succeeded":
            return True
        error = current.error
        message = error.message if error else f"the training was {current.status}"
        raise TrainingError(message, current, code=error.code if error else None)
    if deadline is not None and deadline.expired:
        raise TrainingError(f"the training is still {current.status}", current)
    return False


class Trainings:
    """`client.trainings`: create, read, follow, list and cancel trainings; use their adapters
    by id (`client.generate(..., loras=[adapter.id])`), download or delete them."""

    def __init__(self, http: httpx.Client, send: Callable[[httpx.Request], httpx.Response]) -> None:
        # The client's connection pool and its send (with the retry policy and typed errors).
        self._http = http
        self._send = send

    def _request(self, method: str, path: str) -> httpx.Response:
        return self._send(self._http.build_request(method, path))

    def create(
        self,
        pictures: Pictures,
        *,
        trigger_word: str,
        model: str | None = None,
        name: str | None = None,
        steps: int | None = None,
        rank: int | None = None,
        learning_rate: float | None = None,
        train_text_encoder: bool | None = None,
        seed: int | None = None,
        webhook: str | None = None,
        idempotency_key: str | None = None,
    ) -> Training:
        """Queue a training of `pictures` (a zip, a folder, or a list); returns its document."""
        fields = {
            "trigger_word": trigger_word,
            "model": model,
            "name": name,
            "steps": steps,
            "rank": rank,
            "learning_rate": learning_rate,
            "train_text_encoder": train_text_encoder,
            "seed": seed,
            "webhook": webhook,
        }
        request = _create_request(self._http, pictures, fields, idempotency_key)
        return Training.from_dict(self._send(request).json())

    def get(self, training: str | Training) -> Training:
        return Training.from_dict(self._request("GET", _path(training)).json())

    def list(self) -> list[Training]:
        """This API key's trainings, newest first."""
        data = self._request("GET", TRAININGS).json()["data"]
        return [Training.from_dict(entry) for entry in data]

    def cancel(self, training: str | Training) -> Training:
        """Cancel a queued training at once, a running one at its next step."""
        return Training.from_dict(self._request("DELETE", _path(training)).json())

    def wait(
        self,
        training: str | Training,
        *,
        timeout: float | None = None,
        on_progress: Callable[[Training], None] | None = None,
    ) -> Training:
        """Poll until the training ends; its document, with `adapter`, once it succeeded.
        `on_progress` sees every document read. Raises `TrainingError` when it failed or was
        canceled, or after `timeout` seconds (the training goes on)."""
        deadline = Deadline.after(timeout)
        delays = poll_delays(deadline)
        while True:
            current = self.get(training)
            if on_progress is not None:
                on_progress(current)
            if _finished(current, deadline):
                return current
            time.sleep(min(next(delays), 1.0))

    def weights(self, adapter: str | TrainedAdapter) -> bytes:
        """A trained adapter as one `.safetensors` (kohya naming, trigger embedding bundled)."""
        return self._request("GET", _weights_path(adapter)).content

    def delete_adapter(self, adapter: str | TrainedAdapter) -> None:
        """Delete a trained adapter: jobs naming it are refused from now on."""
        self._request("DELETE", _adapter_path(adapter))


class AsyncTrainings:
    """`AsyncClient.trainings`: `client.trainings` (`Trainings`) with every call awaited."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        send: Callable[[httpx.Request], Awaitable[httpx.Response]],
    ) -> None:
        self._http = http
        self._send = send

    async def _request(self, method: str, path: str) -> httpx.Response:
        return await self._send(self._http.build_request(method, path))

    async def create(
        self,
        pictures: Pictures,
        *,
        trigger_word: str,
        model: str | None = None,
        name: str | None = None,
        steps: int | None = None,
        rank: int | None = None,
        learning_rate: float | None = None,
        train_text_encoder: bool | None = None,
        seed: int | None = None,
        webhook: str | None = None,
        idempotency_key: str | None = None,
    ) -> Training:
        """Queue a training of `pictures` (a zip, a folder, or a list); returns its document."""
        fields = {
            "trigger_word": trigger_word,
            "model": model,
            "name": name,
            "steps": steps,
            "rank": rank,
            "learning_rate": learning_rate,
            "train_text_encoder": train_text_encoder,
            "seed": seed,
            "webhook": webhook,
        }
        request = _create_request(self._http, pictures, fields, idempotency_key)
        return Training.from_dict((await self._send(request)).json())

    async def get(self, training: str | Training) -> Training:
        return Training.from_dict((await self._request("GET", _path(training))).json())

    async def list(self) -> list[Training]:
        """This API key's trainings, newest first."""
        data = (await self._request("GET", TRAININGS)).json()["data"]
        return [Training.from_dict(entry) for entry in data]

    async def cancel(self, training: str | Training) -> Training:
        """Cancel a queued training at once, a running one at its next step."""
        return Training.from_dict((await self._request("DELETE", _path(training))).json())

    async def wait(
        self,
        training: str | Training,
        *,
        timeout: float | None = None,
        on_progress: Callable[[Training], None] | None = None,
    ) -> Training:
        """As `Trainings.wait`, awaiting between polls."""
        deadline = Deadline.after(timeout)
        delays = poll_delays(deadline)
        while True:
            current = await self.get(training)
            if on_progress is not None:
                on_progress(current)
            if _finished(current, deadline):
                return current
            await anyio.sleep(min(next(delays), 1.0))

    async def weights(self, adapter: str | TrainedAdapter) -> bytes:
        """A trained adapter as one `.safetensors` (kohya naming, trigger embedding bundled)."""
        return (await self._request("GET", _weights_path(adapter))).content

    async def delete_adapter(self, adapter: str | TrainedAdapter) -> None:
        """Delete a trained adapter: jobs naming it are refused from now on."""
        await self._request("DELETE", _adapter_path(adapter))


def _adapter_path(adapter: str | TrainedAdapter) -> str:
    return f"/v1/adapters/{adapter if isinstance(adapter, str) else adapter.id}"


def _weights_path(adapter: str | TrainedAdapter) -> str:
    return f"{_adapter_path(adapter)}/weights"


def _path(training: str | Training) -> str:
    training_id = training if isinstance(training, str) else training.id
    return f"{TRAININGS}/{training_id}"
