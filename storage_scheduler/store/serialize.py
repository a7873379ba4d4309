"""Object names and the byte layout of stored results.

An object is::

    MAGIC (8 bytes) | header length (u32) | checksum (u64) | header (msgpack) | payload

and, signed (``storage-scheduler.signing-key``)::

    MAGIC_SIGNED_GMAC | header length | checksum | salt and GMAC (32 bytes) | header | payload

or, for payloads under :data:`~storage_scheduler.store.signing.GMAC_MIN_BYTES`,
``MAGIC_SIGNED_B3`` and a keyed BLAKE3 MAC. (``MAGIC_SIGNED`` leads objects signed with
HMAC-SHA256 by earlier versions: they verify.)

The payload is distributed's own framing of the value (:func:`serialize_bytelist`), so
numpy buffers and other out-of-band frames are written without copies. The checksum
(xxh3-64) covers the header and the payload: a truncated or corrupted object raises
:class:`~storage_scheduler.IntegrityError` on read and is never deserialized.

All functions here are pure and CPU-bound: callers on an event loop run them in an
executor.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import numbers
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash

from distributed.protocol.compression import decompress
from distributed.protocol.serialize import Serialized, deserialize_bytes, serialize_bytelist
from distributed.protocol.utils import unpack_frames

from storage_scheduler._exceptions import IntegrityError, StaleObjectError, UntrustedObjectError
from storage_scheduler.store import signing

__all__ = [
    "ListedObject",
    "ObjectHeader",
    "decode_serialized",
    "decode_value",
    "encode",
    "key_from_object_name",
    "key_to_msgpack",
    "msgpack_ext_hook",
    "msgpack_key_part",
    "object_name",
    "object_path",
    "pack_key",
    "parse_listing",
    "read_header",
    "unpack_key",
    "verify",
    "version_name",
]

Buffer = bytes | bytearray | memoryview

MAGIC = b"DSKSTOR1"
#: Leads a signed object: the prefix is followed by the MAC of header and payload.
MAGIC_SIGNED = b"DSKSIGN1"
#: As :data:`MAGIC_SIGNED`, with keyed BLAKE3 as the MAC (small objects).
MAGIC_SIGNED_B3 = b"DSKSIGN2"
#: As :data:`MAGIC_SIGNED`, with a salt and GMAC as the MAC (large objects).
MAGIC_SIGNED_GMAC = b"DSKSIGN3"
_PREFIX = struct.Struct("<8sIQ")
PREFIX_SIZE = _PREFIX.size
_BIGINT = 1  # msgpack ext type of integers outside the 64-bit range

#: Longest name that spells the key out; longer keys are named by a digest instead.
#: 200 + 1 leaves room below the 255-byte file name limit of common filesystems.
MAX_SPELLED_NAME = 200
#: Bytes of the token digest in an object's name: 200 + 1 + 1 + 20 + a temporary
#: file's ``.tmp-`` suffix of 17 stays below the 255-byte limit.
VERSION_DIGEST_SIZE = 10


# --------------------------------------------------------------------------- keys


def key_to_msgpack(key: object) -> Any:
    """A Dask key as msgpack-able data (tuples as arrays, big integers as an extension)."""
    if type(key) is tuple:
        return [key_to_msgpack(k) for k in key]
    kind = type(key)  # the common cases first: checks against numbers' ABCs are slow
    if kind is str or kind is bytes:
        return key
    if kind is int and -(2**63) <= key < 2**64:  # type: ignore[operator]
        return key
    if isinstance(key, (str, bytes)):
        return key
    if isinstance(key, bool):
        raise TypeError(f"not a valid Dask key part: {key!r}")
    if isinstance(key, numbers.Integral):
        key = int(key)
        if -(2**63) <= key < 2**64:
            return key
        return msgpack.ExtType(_BIGINT, str(key).encode())
    if isinstance(key, numbers.Real):
        return float(key)
    raise TypeError(f"not a valid Dask key part: {key!r} of type {type(key).__name__}")


def msgpack_key_part(obj: object) -> Any:
    """``default`` of a msgpack packer walking keys itself: what msgpack cannot pack
    (big or numpy integers), as :func:`key_to_msgpack` spells it."""
    if isinstance(obj, (numbers.Integral, numbers.Real)) and not isinstance(obj, bool):
        return key_to_msgpack(obj)
    raise TypeError(f"not a valid Dask key part: {obj!r}")


def msgpack_ext_hook(code: int, data: bytes) -> object:
    """``ext_hook`` for msgpack data holding keys from :func:`key_to_msgpack`."""
    if code == _BIGINT:
        return int(data.decode())
    return msgpack.ExtType(code, data)


def pack_key(key: object) -> bytes:
    """Encode a Dask key to bytes, injectively: distinct keys give distinct bytes.

    Examples
    --------
    >>> unpack_key(pack_key(("x", 1, 2.5, b"y")))
    ('x', 1, 2.5, b'y')
    """
    return msgpack.packb(key_to_msgpack(key), use_bin_type=True)


def unpack_key(data: bytes) -> Any:
    """Inverse of :func:`pack_key`."""
    return msgpack.unpackb(data, raw=False, use_list=False, ext_hook=msgpack_ext_hook)


def object_name(key: object) -> str:
    """A file name for a key: injective, at most 201 characters, made of ``[a-z0-9]``.

    Short keys are spelled out in lower-case base32 (so the name is reversible, and
    distinct even on case-insensitive filesystems) behind a ``k``; longer ones are named
    ``h`` + the SHA-256 of the key. No name contains ``/`` or ``.``, so no key can reach
    outside the store's directory.

    Examples
    --------
    >>> object_name("x")
    'kuf4a'
    >>> key_from_object_name(object_name(("a/../b", 3)))
    ('a/../b', 3)
    """
    packed = pack_key(key)
    spelled = base64.b32encode(packed).decode().rstrip("=").lower()
    if len(spelled) <= MAX_SPELLED_NAME:
        return "k" + spelled
    return "h" + hashlib.sha256(packed).hexdigest()


def key_from_object_name(name: str) -> Any | None:
    """The key a name spells out, or None for a digest name (read its header instead)."""
    if not name.startswith("k"):
        return None
    spelled = name[1:].upper()
    return unpack_key(base64.b32decode(spelled + "=" * (-len(spelled) % 8)))


def version_name(token: str) -> str:
    """The part of an object's name that tells its version: a digest of its token.

    Examples
    --------
    >>> version_name("0123abcd")
    '8b77d645684cfb1c1200'
    """
    return hashlib.blake2b(token.encode(), digest_size=VERSION_DIGEST_SIZE).hexdigest()


@dataclass(frozen=True, slots=True)
class ListedObject:
    """An object found by listing the store."""

    path: str
    size: int
    #: The key its name spells, or None for a digest name (the key is in its header).
    key: Any | None
    #: :func:`version_name` of its token, or None for an object stored without one.
    version: str | None


def parse_listing(listing: dict[str, int]) -> tuple[list[ListedObject], list[str]]:
    """The objects in a listing (path to size), and the paths that are not objects:
    unfinished writes (``.tmp-`` files) and stray files.

    Examples
    --------
    >>> objs, other = parse_listing({"objects/0a/kuf4a-0f": 10, "objects/0a/kuf4a.tmp-1": 3})
    >>> [(o.key, o.version, o.size) for o in objs], other
    ([('x', '0f', 10)], ['objects/0a/kuf4a.tmp-1'])
    """
    found: list[ListedObject] = []
    other: list[str] = []
    for path, size in listing.items():
        name = path.rsplit("/", 1)[-1]
        stem, _, version = name.partition("-")
        well_formed = (
            stem[:1] in ("k", "h") and stem[1:].isalnum() and (not version or version.isalnum())
        )
        try:
            if not well_formed or not stem.isascii():
                raise ValueError(name)
            key = key_from_object_name(stem) if stem.startswith("k") else None
        except Exception:  # not a name this package writes: a stray file
            other.append(path)
            continue
        found.append(ListedObject(path, size, key, version or None))
    return found, other


def object_path(key: object, token: str | None = None) -> str:
    """Path of the object of ``key``'s result produced with ``token``, relative to the
    store root: ``objects/<shard>/<name>-<version>``.

    Results of one key with different tokens (other code) are different objects, so no
    cluster can overwrite another's. The two-character shard (from the key alone: every
    version of a key sits together) spreads objects over 256 directories, so that no
    single directory (or S3 prefix) holds millions of entries.
    """
    name = object_name(key)
    shard = hashlib.blake2b(name.encode(), digest_size=1).hexdigest()
    if token is None:
        return f"objects/{shard}/{name}"
    return f"objects/{shard}/{name}-{version_name(token)}"


# --------------------------------------------------------------------------- framing


@dataclass(frozen=True)
class ObjectHeader:
    """What a stored object says about itself."""

    #: The Dask key whose result this is.
    key: Any
    #: Token of what produced the result (function, arguments, dependencies), if known.
    token: str | None
    #: Size of the payload, the serialized value.
    nbytes: int
    #: Type name of the value, for listings.
    type: str
    #: When the object was written (seconds since the epoch).
    created: float


def encode(
    key: object,
    value: object,
    *,
    token: str | None = None,
    compression: str | bool | None = "auto",
    signing_key: bytes | None = None,
    created: float | None = None,
) -> list[Buffer]:
    """Frames of the object storing ``value`` under ``key``; write them in order.

    The frames reference the value's buffers (no copy of numpy data is made). With a
    ``signing_key`` the object is signed (see :mod:`~storage_scheduler.store.signing`).
    """
    # on_error="raise": by default distributed "serializes" a failure as an error message,
    # which would be stored as if it were the result.
    payload = serialize_bytelist(
        value,
        compression=compression or False,  # type: ignore[arg-type]
        on_error="raise",
    )
    nbytes = sum(memoryview(f).nbytes for f in payload)
    header = msgpack.packb(
        {
            "key": pack_key(key),
            "token": token,
            "nbytes": nbytes,
            "type": type(value).__name__,
            "created": time.time() if created is None else created,
        },
        use_bin_type=True,
    )
    digest = xxhash.xxh3_64(header)
    for frame in payload:
        digest.update(frame)
    if signing_key is None:
        return [_PREFIX.pack(MAGIC, len(header), digest.intdigest()), header, *payload]
    if nbytes < signing.GMAC_MIN_BYTES:
        magic, tag = MAGIC_SIGNED_B3, signing.object_mac(signing_key, [header, *payload])
    else:
        magic, tag = MAGIC_SIGNED_GMAC, signing.object_gmac(signing_key, [header, *payload])
    return [_PREFIX.pack(magic, len(header), digest.intdigest()), tag, header, *payload]


def _parse_header(data: Buffer, where: str) -> ObjectHeader:
    try:
        h = msgpack.unpackb(data, raw=False)
        return ObjectHeader(
            key=unpack_key(h["key"]),
            token=h["token"],
            nbytes=int(h["nbytes"]),
            type=str(h["type"]),
            created=float(h["created"]),
        )
    except Exception as e:
        raise IntegrityError(f"corrupted object header in {where}: {e}") from e


@dataclass(frozen=True)
class _Layout:
    """Where the parts of an object sit."""

    #: Offset of the header: after the prefix, and the MAC of a signed object.
    header_start: int
    header_len: int
    checksum: int
    #: The MAC of a signed object, else None.
    tag: memoryview | None
    #: The MAC's algorithm.
    algorithm: Callable[[bytes, Iterable[Buffer]], bytes] = signing.mac

    @property
    def header_end(self) -> int:
        return self.header_start + self.header_len


def _layout(buf: memoryview, where: str) -> _Layout:
    if buf.nbytes < PREFIX_SIZE:
        raise IntegrityError(f"truncated object {where}: {buf.nbytes} bytes")
    magic, header_len, checksum = _PREFIX.unpack_from(buf)
    if magic == MAGIC:
        return _Layout(PREFIX_SIZE, header_len, checksum, None)
    start = PREFIX_SIZE + signing.MAC_SIZE
    tag = buf[PREFIX_SIZE:start]
    if magic == MAGIC_SIGNED_GMAC:
        return _Layout(start, header_len, checksum, tag, signing.gmac_verifier(tag))
    if magic in (MAGIC_SIGNED_B3, MAGIC_SIGNED):
        algorithm = signing.object_mac if magic == MAGIC_SIGNED_B3 else signing.mac
        return _Layout(start, header_len, checksum, tag, algorithm)
    raise IntegrityError(f"not a storage_scheduler object: {where}")


def read_header(data: Buffer, where: str = "object") -> ObjectHeader:
    """Parse the header from the first bytes of an object (for listings; not verified).

    Raises IntegrityError if ``data`` is too short to hold the whole header.
    """
    buf = memoryview(data).cast("B")
    layout = _layout(buf, where)
    if buf.nbytes < layout.header_end:
        raise IntegrityError(f"truncated object header in {where}")
    return _parse_header(buf[layout.header_start : layout.header_end], where)


def header_span(data: Buffer, where: str = "object") -> int:
    """How many leading bytes of an object hold its prefix and header."""
    return _layout(memoryview(data).cast("B"), where).header_end


def verify(
    data: Buffer,
    key: object = None,
    where: str = "object",
    signing_keys: Sequence[bytes] = (),
    token: str | None = None,
) -> tuple[ObjectHeader, memoryview]:
    """Check an object's length, checksum and signature; return its header and payload.

    Parameters
    ----------
    data
        The whole object as read from the store.
    key
        If given, the key the object must hold (guards against misplaced objects).
    where
        Path or URL named in error messages.
    signing_keys
        If given, the object must be signed with one of them.
    token
        If given, the token the object must carry (the result a reader wants).

    Raises
    ------
    IntegrityError
        If the object is truncated, corrupted, or holds another key.
    UntrustedObjectError
        If ``signing_keys`` are given and none of them signed the object.
    StaleObjectError
        If ``token`` is given and the object carries another.
    """
    buf = memoryview(data).cast("B")
    layout = _layout(buf, where)
    start, end = layout.header_start, layout.header_end
    if buf.nbytes < end:
        raise IntegrityError(f"truncated object {where}: {buf.nbytes} bytes")
    body = buf[start:]
    if xxhash.xxh3_64_intdigest(body) != layout.checksum:
        # Name the likelier cause: a short object was cut off, a full-length one damaged.
        header = _parse_header(buf[start:end], where)
        expected = end + header.nbytes
        if buf.nbytes != expected:
            raise IntegrityError(f"truncated object {where}: {buf.nbytes} of {expected} bytes")
        raise IntegrityError(f"corrupted object {where}: checksum mismatch")
    if signing_keys:
        if layout.tag is None:
            raise UntrustedObjectError(f"object {where} is not signed: not trusted")
        signing.verify_mac(signing_keys, [body], layout.tag, f"object {where}", layout.algorithm)
    header = _parse_header(buf[start:end], where)
    if key is not None and pack_key(key) != pack_key(header.key):
        raise IntegrityError(f"object {where} holds key {header.key!r}, not {key!r}")
    if token is not None and header.token != token:
        raise StaleObjectError(
            errno.ENOENT, f"the stored result of {header.key!r} was produced by other code", where
        )
    return header, buf[end:]


def decode_value(payload: Buffer) -> Any:
    """Deserialize a verified payload (unpickles: only where user data may be loaded)."""
    return deserialize_bytes(payload)


def decode_serialized(payload: Buffer) -> Serialized:
    """A verified payload as ``Serialized`` frames, without unpickling anything.

    For processes that pass data along without looking at it (the scheduler). The
    frames are decompressed here, so the header must say they are no longer compressed;
    otherwise the receiver would try to decompress them again.
    """
    frames: Sequence[Buffer] = unpack_frames(payload)
    header = msgpack.loads(frames[0], raw=False, use_list=False) if frames[0] else {}
    data = frames[1:]
    if "compression" in header:
        data = decompress(header, data)
        header = {**header, "compression": (None,) * len(data)}
    return Serialized(header, list(data))  # type: ignore[no-untyped-call]
