"""Images in at the edge (app/images_in.py) and end to end: every bad input of issue 16 is a
4xx naming the field (the README's table), checked before a job exists; good inputs are
normalized, stored once with the job (binary, never in the job hash), and expire with it."""

from __future__ import annotations

import base64
import io
import socket
import struct
import time
import tracemalloc
import zlib
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from app import images_in
from app.errors import InvalidRequest
from imagegen.core.blobs import input_blob
from imagegen.core.contract import Keys
from tests.conftest import TINY_MODEL_ID
from tests.stack import STORAGE, Gateway, stored, wait_for_job

BASE = {"prompt": "a red circle", "model": TINY_MODEL_ID, "steps": 2}
MAX_BYTES = 10 * 1024 * 1024


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scene(size: tuple[int, int] = (64, 64)) -> Image.Image:
    image = Image.new("RGB", size, (240, 240, 240))
    image.paste((200, 20, 20), (8, 8, 32, 32))
    return image


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims `width` x `height`, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def animated_gif() -> bytes:
    frames = [Image.new("P", (64, 64), i) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    """64 wide, 96 tall as stored; EXIF orientation 6 (rotate 90° CW) makes it 96x64."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(scene((64, 96)), "JPEG", exif=exif.tobytes())


GOOD = b64(encode(scene()))
# (case, body changes, status, field named)
BAD_INPUTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("image not base64", {"image": "not base64 at all!"}, 422, "image"),
    ("image base64 of text", {"image": b64(b"hello, this is text")}, 422, "image"),
    ("image truncated PNG", {"image": b64(encode(scene())[:120])}, 422, "image"),
    (
        "image header claims 100000x100000",
        {"image": b64(png_claiming(100_000, 100_000))},
        422,
        "image",
    ),
    ("image 10 MB + 1", {"image": b64(b"\x89PNG" + b"\x00" * (MAX_BYTES - 3))}, 422, "image"),
    ("image GIF with frames", {"image": b64(animated_gif())}, 422, "image"),
    (
        "mask of another size",
        {"image": GOOD, "mask": b64(encode(Image.new("L", (72, 64))))},
        422,
        "mask",
    ),
    ("mask not base64", {"image": GOOD, "mask": "%%%"}, 422, "mask"),
    ("mask without image", {"mask": GOOD}, 422, "mask"),
    ("mask_blur without image", {"mask_blur": 4}, 422, "mask_blur"),
    ("mask_blur without mask", {"image": GOOD, "mask_blur": 4}, 422, "mask_blur"),
    ("mask_blur over 64", {"image": GOOD, "mask": GOOD, "mask_blur": 65}, 422, "mask_blur"),
    ("padding_mask_crop without mask", {"image": GOOD, "padding_mask_crop": 0}, 422, "padding"),
    ("outpaint without image", {"outpaint": {"right": 32}}, 422, "outpaint"),
    (
        "outpaint with mask",
        {"image": GOOD, "mask": GOOD, "outpaint": {"right": 32}},
        422,
        "outpaint",
    ),
    (
        "outpaint not a multiple of 8",
        {"image": GOOD, "outpaint": {"right": 30}},
        422,
        "outpaint.right",
    ),
    ("outpaint all zero", {"image": GOOD, "outpaint": {"left": 0}}, 422, "outpaint"),
    ("outpaint unknown side", {"image": GOOD, "outpaint": {"up": 8}}, 422, "outpaint.up"),
    ("strength 0", {"image": GOOD, "strength": 0}, 422, "strength"),
    ("strength 1.5", {"image": GOOD, "strength": 1.5}, 422, "strength"),
    ("strength without image", {"strength": 0.5}, 422, "strength"),
    ("strength too small for the steps", {"image": GOOD, "strength": 0.1}, 422, "strength"),
]


def _post(client: httpx.Client, changes: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/generations", json={**BASE, **changes})


@pytest.mark.parametrize(
    ("case", "changes", "status", "field"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_refused_naming_the_field(
    stack: Gateway, case: str, changes: dict[str, Any], status: int, field: str
) -> None:
    with stack.client() as client:
        response = _post(client, changes)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"].startswith(field), error
    assert "Traceback" not in response.text


def test_a_header_claiming_100000_squared_is_refused_before_any_pixel() -> None:
    data = png_claiming(100_000, 100_000)
    tracemalloc.start()
    with pytest.raises(InvalidRequest) as refused:
        images_in.load_image(data, "image", MAX_BYTES, 1024 * 1024)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "pixel cap" in refused.value.message and "10000000000" in refused.value.message
    # 30 GB of pixels were never allocated: the peak is the header's bytes, not the image's.
    assert peak < 5 * 1024 * 1024, peak


@pytest.mark.parametrize(
    ("case", "data", "size"),
    [
        ("CMYK JPEG", encode(scene().convert("CMYK"), "JPEG"), (64, 64)),
        ("16-bit PNG", encode(Image.new("I;16", (64, 64), 40000)), (64, 64)),
        ("palette PNG with alpha", encode(scene().convert("RGBA").convert("P")), (64, 64)),
        ("EXIF-rotated JPEG", exif_rotated_jpeg(), (96, 64)),
        ("WebP", encode(scene(), "WEBP"), (64, 64)),
    ],
)
def test_odd_but_valid_inputs_are_converted(case: str, data: bytes, size: tuple[int, int]) -> None:
    decoded = images_in.load_image(data, "image", MAX_BYTES, 1024 * 1024)
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == size  # EXIF orientation applied
    if case == "16-bit PNG":
        assert decoded.image.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256, not clipped


def test_alpha_is_composited_on_white() -> None:
    transparent = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    decoded = images_in.load_image(encode(transparent), "image", MAX_BYTES, 1024 * 1024)
    assert decoded.image.getpixel((0, 0)) == (255, 255, 255)


def test_inputs_are_resized_to_the_output_size() -> None:
    decoded = images_in.load_image(encode(scene((100, 70))), "image", MAX_BYTES, 1024 * 1024)
    prepared = images_in.prepare(
        image=decoded, mask=None, outpaint=None, width=None, height=None, max_pixels=1024 * 1024
    )
    assert (prepared.width, prepared.height) == (96, 64)  # multiples of 8
    assert Image.open(io.BytesIO(prepared.blobs["image"])).size == (96, 64)
    assert prepared.refs["image"].width == 100  # the document shows the input as sent


@pytest.mark.parametrize("case", ["CMYK JPEG", "16-bit PNG", "EXIF-rotated JPEG"])
def test_odd_inputs_are_accepted_over_http(stack: Gateway, case: str) -> None:
    data = {
        "CMYK JPEG": encode(scene().convert("CMYK"), "JPEG"),
        "16-bit PNG": encode(Image.new("I;16", (64, 64), 40000)),
        "EXIF-rotated JPEG": exif_rotated_jpeg(),
    }[case]
    with stack.client() as client:
        response = _post(client, {"image": "data:image/jpeg;base64," + b64(data)})
        assert response.status_code == 202, response.text
        doc = response.json()
        client.delete(f"/v1/generations/{doc['id']}")
    if case == "EXIF-rotated JPEG":
        assert (doc["request"]["width"], doc["request"]["height"]) == (96, 64)


def _raw_post(stack: Gateway, path: str, headers: dict[str, str], body: bytes = b"") -> int:
    url = urlsplit(stack.base_url)
    with socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=10) as s:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + body)
        reply = s.recv(4096).decode(errors="replace")
    return int(reply.split(" ", 2)[1])


@pytest.mark.parametrize("path", ["/v1/generations", "/v1/images/edits"])
def test_a_50_mb_body_is_413_before_it_is_read(stack: Gateway, path: str) -> None:
    # Nothing of the body is sent: the answer can only come from the declared length.
    headers = {"Content-Type": "application/json", "Content-Length": str(50 * 1024 * 1024)}
    assert _raw_post(stack, path, headers) == 413


def test_the_larger_limit_is_only_for_bodies_with_images(stack: Gateway) -> None:
    with stack.client() as client:
        big_text = _post(
            client,
            {"negative_prompt": "", "seed": 1, "prompt": "a" * 10}
            | {"scheduler": "euler" + " " * 200_000},
        )
        assert big_text.status_code == 413, big_text.text
        assert "image" in big_text.json()["error"]["message"]
        padded = b64(encode(scene()) + b"\x00" * 200_000)  # a 270 kB body with an image
        response = _post(client, {"image": padded})
        assert response.status_code == 202, response.text
        client.delete(f"/v1/generations/{response.json()['id']}")


def _image(client: httpx.Client, job_id: str) -> Image.Image:
    png = client.get(f"/v1/generations/{job_id}/images/0").content
    return Image.open(io.BytesIO(png))


def test_inpainting_end_to_end_keeps_the_black_mask_pixels_and_stores_inputs_once(
    stack: Gateway, redis_conn: redis.Redis
) -> None:
    image = scene()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 32, 64, 64))
    with stack.client() as client:
        response = _post(
            client, {"image": b64(encode(image)), "mask": b64(encode(mask)), "seed": 3}
        )
        assert response.status_code == 202, response.text
        doc = response.json()
        job_id = doc["id"]
        assert doc["request"]["task"] == "inpaint" and doc["request"]["strength"] == 1.0
        assert set(doc["request"]["image"]) == {"sha256", "width", "height"}
        record = redis_conn.hgetall(Keys.job(job_id))
        assert all(len(v) < 2000 for v in record.values())  # no image bytes in the hash
        assert stored(redis_conn, input_blob(job_id, "image")) is not None
        assert stored(redis_conn, input_blob(job_id, "mask")) is not None
        done = wait_for_job(client, job_id)
        assert done["status"] == "succeeded", done
        out = _image(client, job_id)
        parameters = out.info["parameters"]
    keep = np.asarray(mask) < 128
    assert np.array_equal(np.asarray(out.convert("RGB"))[keep], np.asarray(image)[keep])
    assert '"sha256"' in parameters and '"strength": 1.0' in parameters
    if STORAGE == "s3":
        return  # objects go with the sweeper (test_object_storage)
    # The inputs expire with the record.
    record_ttl = redis_conn.ttl(Keys.job(job_id))
    for name in ("image", "mask"):
        ttl = redis_conn.ttl(Keys.input(job_id, name))
        assert 0 < ttl <= record_ttl + 1


def test_outpainting_and_image_to_image_end_to_end(stack: Gateway) -> None:
    image = scene()
    with stack.client() as client:
        out_job = _post(client, {"image": b64(encode(image)), "outpaint": {"right": 32}})
        i2i_job = _post(client, {"image": b64(encode(image)), "strength": 0.5, "steps": 4})
        assert out_job.status_code == 202 and i2i_job.status_code == 202, out_job.text
        assert (out_job.json()["request"]["width"], out_job.json()["request"]["height"]) == (96, 64)
        assert i2i_job.json()["request"]["task"] == "img2img"
        for job in (out_job, i2i_job):
            assert wait_for_job(client, job.json()["id"])["status"] == "succeeded"
        grown = _image(client, out_job.json()["id"]).convert("RGB")
    assert grown.size == (96, 64)
    assert np.array_equal(np.asarray(grown)[:, :64], np.asarray(image))


@pytest.mark.skipif(STORAGE == "s3", reason="Redis TTLs; the S3 sweeper: test_object_storage")
def test_a_canceled_edit_job_expires_its_inputs(stack: Gateway, redis_conn: redis.Redis) -> None:
    with stack.client() as client:
        # The built-in model's queue has a worker; cancel at once, queued or running.
        response = _post(client, {"image": GOOD, "steps": 50})
        job_id = response.json()["id"]
        client.delete(f"/v1/generations/{job_id}")
    ttl = redis_conn.ttl(Keys.input(job_id, "image"))
    assert 0 < ttl <= redis_conn.ttl(Keys.job(job_id)) + 1


def test_the_lifecycle_writes_inputs_with_the_job_and_expires_them_with_it(
    redis_conn: redis.Redis,
) -> None:
    from imagegen.core.contract import InputRef, JobRecord, JobSpec, JobStatus
    from imagegen.core.lifecycle import Lifecycle
    from imagegen.core.store import JobStore

    ref = InputRef(sha256="a" * 64, width=64, height=64)
    spec = JobSpec(
        prompt="x", negative_prompt="", width=64, height=64, steps=2, guidance_scale=1.0,
        seed=1, n=1, scheduler="euler", model="lifecycle-inputs", task="inpaint", image=ref,
        mask=ref, strength=1.0,
    )  # fmt: skip
    record = JobRecord(
        id="gen_" + "i" * 22, status=JobStatus.QUEUED, spec=spec, created_at=time.time()
    )
    lifecycle = Lifecycle(redis_conn)
    with pytest.raises(ValueError, match="needs inputs"):
        lifecycle.submit(record, max_depth=10, inputs={"image": b"png"})
    assert redis_conn.exists(Keys.job(record.id)) == 0  # nothing written
    blobs = {"image": b"\x89PNG image", "mask": b"\x89PNG mask"}
    assert lifecycle.submit(record, max_depth=10, inputs=blobs).outcome == "created"
    assert JobStore(redis_conn).get_input(record.id, "mask") == b"\x89PNG mask"
    assert redis_conn.ttl(Keys.input(record.id, "image")) == -1  # queued: no TTL, as the record
    assert redis_conn.hget(Keys.job(record.id), "inputs") == b"image,mask"
    assert lifecycle.cancel(record, ttl_s=120)
    for name in ("image", "mask"):
        assert 0 < redis_conn.ttl(Keys.input(record.id, name)) <= 120
