"""The catalog's segment files: what the catalog knows of each stored result, in columns.

A segment holds entries added and versions deleted, as one msgpack map of columns
(``keys``, ``tokens``, ``nbytes``, ...): a million entries decode in one msgpack call.
A whole catalog of a million entries is written as one snapshot segment from a thread
beside the scheduler's event loop, so it is encoded a slice at a time
(:func:`~storage_scheduler._threads.in_slices`) into the very bytes one call would make:
one call would hold the GIL, and the loop, for hundreds of milliseconds.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from storage_scheduler._threads import HAND_OVER, free_in_slices, in_slices
from storage_scheduler.store.serialize import msgpack_ext_hook, msgpack_key_part

__all__ = [
    "ANY_VERSION",
    "Deleted",
    "Entry",
    "Versions",
    "decode_segment",
    "encode_segment",
    "encode_snapshot",
    "versions_of",
]

#: Entries per slice when encoding: well under a millisecond of work each (a loop step
#: making system calls waits up to a slice per call).
SLICE = 2048


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


#: A version deleted: key, token, and the ``created`` of the write deleted (None: every
#: write of that version up to the segment's time).
Deleted = tuple[Any, Any, float | None]


def encode_segment(added: Sequence[tuple[Any, Entry]], deleted: Sequence[Deleted]) -> bytes:
    """A segment adding ``added`` (key, entry) and deleting ``deleted`` (see
    :data:`Deleted`)."""
    return _encode([k for k, _ in added], [e for _, e in added], deleted)


def encode_snapshot(entries: Mapping[Any, Versions]) -> bytes:
    """A segment adding every version of ``entries`` (a copy nobody else changes)."""
    keys: list[Any] = []
    versions: list[Entry] = []
    for i, (key, v) in enumerate(entries.items()):
        if not i % SLICE:
            time.sleep(HAND_OVER)  # as in_slices does
        if isinstance(v, tuple):
            keys += [key] * len(v)
            versions += v
        else:
            keys.append(key)
            versions.append(v)
    try:
        return _encode(keys, versions, [])
    finally:
        free_in_slices(keys)
        free_in_slices(versions)


#: The columns of entries, and the attribute of Entry each holds.
_COLUMNS = {"tokens": "token", "nbytes": "nbytes", "created": "created"}
_COLUMNS |= {"kept": "kept", "lineage": "lineage"}


def _encode(keys: Sequence[Any], entries: Sequence[Entry], deleted: Sequence[Deleted]) -> bytes:
    """``msgpack.packb({"version": 2, "keys": [...], "tokens": [...], ...})``, a slice at a
    time. No list of a million objects is built: a full garbage collection, which such
    lists make likely, holds the GIL for seconds on a big scheduler."""
    # msgpack walks the keys itself (tuples are arrays), calling back only for what it
    # cannot pack: ~3x faster than converting each key first.
    packer = msgpack.Packer(use_bin_type=True, default=msgpack_key_part)
    out = [packer.pack_map_header(5 + len(_COLUMNS)), packer.pack("version"), packer.pack(2)]

    def array(name: str, items: Sequence[Any], value: Callable[[Any], Any] | None) -> None:
        out.extend([packer.pack(name), packer.pack_array_header(len(items))])
        for part in in_slices(items, SLICE):
            # An array's bytes are its items' one after another: a slice packed as an
            # array of its own, without that array's header.
            values = part if value is None else list(map(value, part))
            packed = packer.pack(values)
            out.append(packed[len(packer.pack_array_header(len(values))) :])

    array("keys", keys, None)
    for name, attribute in _COLUMNS.items():
        array(name, entries, operator.attrgetter(attribute))
    array("deleted", deleted, operator.itemgetter(0))
    array("deleted_tokens", deleted, operator.itemgetter(1))
    array("deleted_created", deleted, operator.itemgetter(2))
    return b"".join(out)


def decode_segment(data: bytes) -> tuple[list[tuple[Any, Entry]], list[Deleted]]:
    """The (key, entry) pairs a segment adds and the versions it deletes (the token
    :data:`ANY_VERSION` deletes every version)."""
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
    gone = len(seg["deleted"])
    tokens = seg.get("deleted_tokens") or (ANY_VERSION,) * gone
    created = seg.get("deleted_created") or (None,) * gone
    return added, list(zip(seg["deleted"], tokens, created, strict=True))
