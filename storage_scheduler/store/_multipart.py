"""Streaming writes to S3: a multipart upload whose parts are read from the frames.

Joining an object's frames before a single PUT needs the whole object twice in memory
(the frames, often one large numpy buffer, and their concatenation), and the HTTP client
copies a bytes body once more. Here each part's body is a file-like view of its byte
range of the frames: botocore and aiohttp read it in chunks of at most 1 MiB, so a write
needs a few MiB beyond the frames, whatever the object's size.

S3 publishes a multipart upload only when it is completed, so writing straight to the
object's key stays atomic for readers; on any failure (cancellation included) the upload
is aborted, so no incomplete upload is left behind.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import io
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

from storage_scheduler.store.serialize import Buffer

__all__ = ["PART_BYTES", "STREAM_MIN_BYTES", "upload"]

#: Size of the parts of a multipart upload (the last one may be smaller). S3 wants parts
#: of 5 MiB or more.
PART_BYTES = 16 * 2**20
#: Objects larger than this are streamed as a multipart upload; smaller ones are one PUT
#: (their frames joined: one copy). A multipart upload costs four round trips (create,
#: parts, list, complete) where a PUT costs one: at an object store's latency, that is
#: most of the time of an object of one or two parts.
STREAM_MIN_BYTES = 2 * PART_BYTES
#: Parts uploaded at once, per object: each holds only the HTTP client's chunk buffers.
PARTS_IN_FLIGHT = 4
#: S3's limit on the parts of one upload: larger objects get larger parts.
_MAX_PARTS = 10_000


def part_size(nbytes: int) -> int:
    """The part size for an object of ``nbytes``: at least :data:`PART_BYTES`, and large
    enough to stay within S3's part count."""
    return max(PART_BYTES, math.ceil(nbytes / _MAX_PARTS / 2**20) * 2**20)


async def upload(fs: Any, path: str, frames: Sequence[Buffer]) -> None:
    """Publish ``frames``, concatenated, at ``path`` of the s3fs filesystem ``fs``.

    Runs on ``fs.loop`` (s3fs's session lives there).
    """
    views = [_flat(f) for f in frames]
    size = part_size(sum(len(v) for v in views))
    bucket, key, _ = fs.split_path(path)
    where = {"Bucket": bucket, "Key": key}
    mpu = await fs._call_s3("create_multipart_upload", **where)
    where["UploadId"] = mpu["UploadId"]
    try:
        etags = await _upload_parts(fs, where, _parts(views, size))
        await _check_sizes(fs, where, views, size, len(etags))
        parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
        await fs._call_s3("complete_multipart_upload", MultipartUpload={"Parts": parts}, **where)
    except BaseException:
        # Also on cancellation: this coroutine's task was cancelled once and may await.
        try:
            await fs._call_s3("abort_multipart_upload", **where)
        except Exception:  # the error that got us here is the one to report
            pass
        raise
    finally:
        fs.invalidate_cache(path)


async def _upload_parts(
    fs: Any, where: dict[str, Any], parts: Iterator[tuple[int, _PartBody]]
) -> dict[int, str]:
    """Upload ``parts``, a few at once; their ETags by part number."""
    etags: dict[int, str] = {}

    async def uploader() -> None:
        for number, body in parts:  # one shared iterator: each part is taken once
            out = await fs._call_s3("upload_part", PartNumber=number, Body=body, **where)
            etags[number] = out["ETag"]

    tasks = [asyncio.ensure_future(uploader()) for _ in range(PARTS_IN_FLIGHT)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # Stop the other parts before the upload is aborted: a part still in flight
        # then could survive the abort.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return etags


async def _check_sizes(
    fs: Any, where: dict[str, Any], views: list[memoryview], size: int, count: int
) -> None:
    """Fail unless S3 holds every part whole.

    s3fs retries a failed call with the same body object; a body read partly by the
    failed attempt would then be sent from where that attempt stopped, and S3 would
    accept the shorter part.
    """
    total = sum(len(v) for v in views)
    expected = {n + 1: min(size, total - n * size) for n in range(count)}
    found: dict[int, int] = {}
    marker = 0
    while True:
        out = await fs._call_s3("list_parts", PartNumberMarker=marker, **where)
        found.update((p["PartNumber"], p["Size"]) for p in out.get("Parts", []))
        if not out.get("IsTruncated"):
            break
        marker = int(out["NextPartNumberMarker"])
    if found != expected:
        bad = sorted(n for n in expected.keys() | found.keys() if found.get(n) != expected.get(n))
        raise OSError(errno.EIO, f"multipart upload lost or truncated parts {bad[:5]}")


def _flat(frame: Buffer) -> memoryview:
    view = memoryview(frame)
    if view.ndim == 1 and view.format == "B":
        return view
    if not view.c_contiguous:  # not seen from distributed's serializers; copy to be safe
        return memoryview(view.tobytes())
    return view.cast("B")


def _parts(views: list[memoryview], size: int) -> Iterator[tuple[int, _PartBody]]:
    """Numbered bodies of ``size`` bytes (the last may be shorter) spanning ``views``."""
    part: list[memoryview] = []
    filled = 0
    number = itertools.count(1)
    for view in views:
        while view:
            take = view[: size - filled]
            part.append(take)
            filled += len(take)
            view = view[len(take) :]
            if filled == size:
                yield next(number), _PartBody(part)
                part, filled = [], 0
    if filled:
        yield next(number), _PartBody(part)


class _PartBody(io.RawIOBase):
    """A read-only, seekable file over a sequence of byte views, read without copying
    them whole (botocore and aiohttp read request bodies in chunks)."""

    def __init__(self, views: list[memoryview]):
        super().__init__()
        self._views = views
        self._starts = list(itertools.accumulate((len(v) for v in views), initial=0))
        self._size = self._starts[-1]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        stop = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        chunks = []
        i = bisect.bisect_right(self._starts, self._pos) - 1
        while self._pos < stop:
            view, start = self._views[i], self._starts[i]
            chunk = view[self._pos - start : stop - start]
            chunks.append(chunk)
            self._pos += len(chunk)
            i += 1
        return b"".join(chunks)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(memoryview(buffer).cast("B")))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)
