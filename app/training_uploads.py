"""A training's pictures as users send them: a zip (kohya's and fal's convention: pictures with
optional same-stem `.txt` captions), repeated files, or base64 in JSON. Every picture is checked
like an image sent to a generation (format by content, bombs, the pixel cap) and normalized to
an RGB PNG; every problem is a 422 naming `images` (and the entry) before a training exists.

A zip is read without trusting it: its entry count, each entry's and the total unpacked size,
and each entry's compression ratio are checked from its directory first and again while
reading (a lying header stops the read at the limit), and names that climb out of the archive
(`..`, absolute paths, drive letters) or links are refused. Files that are neither pictures nor
captions (`.DS_Store`, `__MACOSX/`, a kohya `.npz` cache) are skipped, as kohya does.
"""

from __future__ import annotations

import io
import stat
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

from app import images_in
from app.errors import InvalidRequest

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# A zip's directory may list at most this many entries (pictures, captions and clutter).
MAX_ZIP_ENTRIES = 2000
# Past this compression ratio an entry is a bomb, not a picture (PNG and JPEG hardly compress;
# a caption of a few hundred bytes is allowed any ratio).
MAX_RATIO = 100
SMALL_ENTRY = 64 * 1024
FIELD = "images"


@dataclass(frozen=True)
class Picture:
    """One training picture: its normalized PNG, its caption (None: none sent) and where it
    came from (a zip entry's name, or `images[i]`)."""

    png: bytes
    caption: str | None
    source: str


@dataclass(frozen=True)
class Limits:
    max_images: int
    max_total_bytes: int  # all pictures, unpacked
    max_image_bytes: int  # one picture file
    max_pixels: int


class ZipPictures:
    """A zip upload, its directory checked on opening (names, sizes, ratios, the picture
    count: no pixel work yet); `read()` then decodes its pictures and captions, in name
    order."""

    def __init__(self, data: bytes, limits: Limits) -> None:
        self.limits = limits
        try:
            self.archive = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise InvalidRequest.for_field(FIELD, f"is not a zip file ({exc})") from None
        entries = self.archive.infolist()
        if len(entries) > MAX_ZIP_ENTRIES:
            raise InvalidRequest.for_field(
                FIELD, f"the zip lists {len(entries)} entries, over the limit of {MAX_ZIP_ENTRIES}"
            )
        self.pictures: dict[str, zipfile.ZipInfo] = {}
        self.captions: dict[str, zipfile.ZipInfo] = {}
        claimed = 0
        for entry in entries:
            name = _safe_name(entry)
            if name is None:
                continue
            suffix = PurePosixPath(name).suffix.lower()
            if suffix in PICTURE_SUFFIXES:
                self.pictures[name] = entry
            elif suffix == ".txt":
                self.captions[str(PurePosixPath(name).with_suffix(""))] = entry
            else:
                continue
            _check_ratio(entry)
            claimed += entry.file_size
            if claimed > limits.max_total_bytes:
                raise InvalidRequest.for_field(
                    FIELD,
                    f"the zip's pictures unpack to more than {limits.max_total_bytes} bytes, "
                    "the limit (IMAGEGEN_TRAINING_MAX_BYTES)",
                )
        if not self.pictures:
            raise InvalidRequest.for_field(
                FIELD, "the zip holds no picture (PNG, JPEG or WebP, by file name)"
            )
        _check_count(len(self.pictures), limits)

    @property
    def count(self) -> int:
        return len(self.pictures)

    def read(self) -> list[Picture]:
        with self.archive:
            budget = [self.limits.max_total_bytes]
            out = []
            for name in sorted(self.pictures):
                raw = _read(self.archive, self.pictures[name], self.limits.max_image_bytes, budget)
                caption_entry = self.captions.get(str(PurePosixPath(name).with_suffix("")))
                caption = None
                if caption_entry is not None:
                    text = _read(self.archive, caption_entry, SMALL_ENTRY, budget)
                    caption = _caption(text, caption_entry.filename)
                field = f"{FIELD}[{name[:100]}]"
                out.append(Picture(_normalized(raw, field, self.limits), caption, name))
            return out


def read_files(
    files: list[tuple[str, bytes]], captions: list[str] | None, limits: Limits
) -> list[Picture]:
    """Pictures sent as repeated `images[]` files, with `captions[]` in the same order."""
    _check_count(len(files), limits)
    if captions is not None and len(captions) not in (0, len(files)):
        raise InvalidRequest.for_field(
            "captions[]", f"has {len(captions)} captions for {len(files)} pictures; send one each"
        )
    out = []
    for i, (name, raw) in enumerate(files):
        caption = captions[i] if captions else None
        out.append(Picture(_normalized(raw, f"images[{i}]", limits), caption or None, name))
    return out


def read_base64(items: list[tuple[str, str | None]], limits: Limits) -> list[Picture]:
    """Pictures sent as JSON: (base64, caption) each."""
    _check_count(len(items), limits)
    out = []
    total = 0
    for i, (encoded, caption) in enumerate(items):
        field = f"images[{i}].image"
        raw = images_in.decode_base64(encoded, field, limits.max_image_bytes)
        total += len(raw)
        if total > limits.max_total_bytes:
            raise InvalidRequest.for_field(
                FIELD, f"the pictures are over {limits.max_total_bytes} bytes in all"
            )
        out.append(Picture(_normalized(raw, field, limits), caption or None, field))
    return out


def _safe_name(entry: zipfile.ZipInfo) -> str | None:
    """The entry's name if it is a file to read; None for folders and clutter; a 422 for a
    name that leaves the archive or a link."""
    name = entry.filename
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
        raise InvalidRequest.for_field(
            FIELD, f"the zip entry {name[:100]!r} points outside the archive; refused"
        )
    if stat.S_ISLNK(entry.external_attr >> 16):
        raise InvalidRequest.for_field(FIELD, f"the zip entry {name[:100]!r} is a link; refused")
    if entry.is_dir() or parts[0] == "__MACOSX" or parts[-1].startswith("."):
        return None
    return name


def _check_ratio(entry: zipfile.ZipInfo) -> None:
    if entry.file_size > SMALL_ENTRY and entry.file_size > MAX_RATIO * max(entry.compress_size, 1):
        raise InvalidRequest.for_field(
            FIELD,
            f"the zip entry {entry.filename[:100]!r} unpacks {entry.file_size} bytes from "
            f"{entry.compress_size} (over {MAX_RATIO}x: a zip bomb, not a picture)",
        )


def _read(
    archive: zipfile.ZipFile, entry: zipfile.ZipInfo, max_bytes: int, budget: list[int]
) -> bytes:
    """The entry's bytes, read no further than its limit and the total budget left, whatever
    its header claims."""
    limit = min(max_bytes, budget[0])
    try:
        with archive.open(entry) as handle:
            data = handle.read(limit + 1)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError) as exc:
        raise InvalidRequest.for_field(
            FIELD, f"the zip entry {entry.filename[:100]!r} cannot be read ({exc})"
        ) from None
    if len(data) > limit:
        raise InvalidRequest.for_field(
            FIELD,
            f"the zip entry {entry.filename[:100]!r} unpacks past {limit} bytes, the limit "
            "for one file or for the pictures in all",
        )
    budget[0] -= len(data)
    return data


def _caption(data: bytes, name: str) -> str | None:
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise InvalidRequest.for_field(FIELD, f"the caption {name[:100]!r} is not UTF-8") from None
    return " ".join(text.split()) or None


def _check_count(count: int, limits: Limits) -> None:
    if count < 1:
        raise InvalidRequest.for_field(FIELD, "holds no picture; send 1 or more")
    if count > limits.max_images:
        raise InvalidRequest.for_field(
            FIELD, f"holds {count} pictures, over the limit of {limits.max_images}"
        )


def _normalized(raw: bytes, field: str, limits: Limits) -> bytes:
    """The picture as an RGB PNG; a 422 naming `field` (`images[i]`, or `images[<entry>]` of
    a zip) when it is not a picture the service takes."""
    decoded = images_in.load_image(raw, field, limits.max_image_bytes, limits.max_pixels)
    return images_in.to_png(decoded.image)
