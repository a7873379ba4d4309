"""The catalog's segment files: what the catalog knows of each stored result, in columns.

A segment holds entries added and versions deleted, as one msgpack map of columns
(``keys``, ``tokens``, ``nbytes``, ...): a million entries decode in one msgpack call.
A whole catalog of a million entries is written as one snapshot segment from a thread
beside the scheduler's event loop, so it is encoded a slice at a time
(:func:`~storage_scheduler._threads.in_slices`) into the very bytes one call would make:
one call would hold the GIL, and the loop, for hundreds of milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from storage_scheduler._threads import HAND_OVER, free_in_slices, in_slices
from storage_scheduler.store.serialize import key_to_msgpack, msgpack_ext_hook

__all__ = [
    "ANY_VERSION",
    "Entry",
    "Versions",
    "decode_segment",
    "encode_segment",
    "encode_snapshot",
    "versions_of",
]

#: Entries per slice when encoding: well under a millisecond of work each (a loop step
#: making system calls waits up to a slice per call).
SLICE = 4096
KEY_SLICE = 128


@dataclass(frozen=True, slots=True)
class Entry:
    """What the catalog knows of one stored result (one version of a key)."""

    #: Token of the task that produced the result (see :mod:`storage_scheduler.tokens`);
    #: with the key, it names the object.
    token: str | None
    #: Size of the stored object in bytes.
    nbytes: int
    #: When it was stored (seconds since the epoch): the time in its object's header,
    #: which tells this write of the object apart from any other.
    created: float
    #: A client asked for it (or it is annotated ``storage_keep``): no cluster's lifecycle
    #: policy deletes it; only ``dask storage gc`` does.
    kept: bool = False
    #: With ``lineage: true``: the token of the result and of everything upstream of it.
    lineage: str | None = None


#: The versions of one key: one Entry (nearly always), or several.
Versions = Entry | tuple[Entry, ...]

#: A deleted "version" that stands for every version of its key (version-1 segments
#: deleted keys, not versions).
ANY_VERSION: Any = object()


def versions_of(v: Versions | None) -> tuple[Entry, ...]:
    if v is None:
        return ()
    return v if isinstance(v, tuple) else (v,)


def encode_segment(
    added: Sequence[tuple[Any, Entry]], deleted: Sequence[tuple[Any, str | None]]
) -> bytes:
    """A segment adding ``added`` (key, entry) and deleting ``deleted`` (key, token)."""
    names = ["keys", "tokens", "nbytes", "created", "kept", "lineage"]
    columns: dict[str, list[Any]] = {n: [] for n in [*names, "deleted", "deleted_tokens"]}
    for part in in_slices(added, SLICE):
        columns["tokens"] += [e.token for _, e in part]
        columns["nbytes"] += [e.nbytes for _, e in part]
        columns["created"] += [e.created for _, e in part]
        columns["kept"] += [e.kept for _, e in part]
        columns["lineage"] += [e.lineage for _, e in part]
    for part in in_slices(added, KEY_SLICE):  # a few microseconds per key
        columns["keys"] += [key_to_msgpack(k) for k, _ in part]
    for gone in in_slices(deleted, KEY_SLICE):
        columns["deleted"] += [key_to_msgpack(k) for k, _ in gone]
        columns["deleted_tokens"] += [t for _, t in gone]
    # msgpack.packb({"version": 2, **columns}, use_bin_type=True), a slice at a time.
    packer = msgpack.Packer(use_bin_type=True)
    out = [packer.pack_map_header(1 + len(columns)), packer.pack("version"), packer.pack(2)]
    for name, column in columns.items():
        out += [packer.pack(name), packer.pack_array_header(len(column))]
        for part in in_slices(column, SLICE):
            packed = packer.pack(list(part))
            out.append(packed[len(packer.pack_array_header(len(part))) :])  # the items
        free_in_slices(column)
    return b"".join(out)


def encode_snapshot(entries: Mapping[Any, Versions]) -> bytes:
    """A segment adding every version of ``entries`` (a copy nobody else changes)."""
    added: list[tuple[Any, Entry]] = []
    for i, (key, v) in enumerate(entries.items()):
        if not i % SLICE:
            time.sleep(HAND_OVER)  # as in_slices does
        added += [(key, e) for e in versions_of(v)]
    try:
        return encode_segment(added, [])
    finally:
        free_in_slices(added)


def decode_segment(data: bytes) -> tuple[list[tuple[Any, Entry]], list[tuple[Any, Any]]]:
    """The (key, entry) pairs a segment adds and the (key, token) pairs it deletes (the
    token :data:`ANY_VERSION` deletes every version)."""
    seg = msgpack.unpackb(data, raw=False, use_list=False, ext_hook=msgpack_ext_hook)
    n = len(seg["keys"])
    kept = seg.get("kept") or (False,) * n  # older segments lack the newer columns
    lineage = seg.get("lineage") or (None,) * n
    added = [
        (k, Entry(t, int(nb), float(c), bool(kp), ln))
        for k, t, nb, c, kp, ln in zip(
            seg["keys"], seg["tokens"], seg["nbytes"], seg["created"], kept, lineage, strict=True
        )
    ]
    tokens = seg.get("deleted_tokens") or (ANY_VERSION,) * len(seg["deleted"])
    return added, list(zip(seg["deleted"], tokens, strict=True))
