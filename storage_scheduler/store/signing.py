"""Keyed MACs: nothing read back from a shared store is trusted unless it was signed.

Anyone who can write the store could otherwise replace an object whose checksum they
recompute, and the next reader would unpickle it: code execution on every worker and
client. With ``storage-scheduler.signing-key`` set, every object, catalog segment and lease
carries a MAC over its bytes, and a reader verifies it before anything is unpickled or
believed. Several keys rotate: the first signs, any of them verifies.

Objects are hashed twice (written, read), so their MAC is the fastest sound one for their
size. Large objects carry GMAC (:func:`object_gmac`, AES-GCM's authentication alone, about
5 GB/s per core with AES-NI) under a one-time AES key derived from the signing key and a
random salt, so no key is used twice and no nonce can repeat. Small ones carry keyed
BLAKE3 (:func:`object_mac`), cheaper to set up per call. Both keys are derived from the
signing key (BLAKE3's key derivation), so one secret serves all. Objects signed with
keyed BLAKE3 or HMAC-SHA256 by earlier versions still verify. Catalog segments and
leases, small, keep HMAC-SHA256.

The checksum stays beside the MAC: a checksum failure says the bytes were damaged, a MAC
failure with a good checksum says they were written without the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

import blake3
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from storage_scheduler._exceptions import UntrustedObjectError

__all__ = [
    "GMAC_MIN_BYTES",
    "MAC_SIZE",
    "mac",
    "object_gmac",
    "object_mac",
    "seal",
    "unseal",
    "verify_mac",
]

Buffer = bytes | bytearray | memoryview

#: Bytes of one MAC (HMAC-SHA256, keyed BLAKE3, and GMAC's salt and tag alike).
MAC_SIZE = 32
#: Objects of this many payload bytes and more carry GMAC; smaller ones keyed BLAKE3,
#: whose setup per call costs a few microseconds against GMAC's twenty.
GMAC_MIN_BYTES = 64 << 10
#: Contexts of the derivations of the object MACs' keys from the signing key.
_OBJECT_KEY_CONTEXT = "storage_scheduler 2026 object MAC"
_GMAC_KEY_CONTEXT = "storage_scheduler 2026 object GMAC"
_SALT_SIZE = 16
#: Each one-time key authenticates one object: a fixed nonce never repeats under a key.
_GCM_NONCE = bytes(12)
#: Bytes authenticated per call: other threads get the GIL between calls.
_GMAC_CHUNK = 8 << 20
#: Leads a sealed small file (catalog segment, lease).
SEAL_MAGIC = b"DSKSEAL1"


def mac(key: bytes, parts: Iterable[Buffer]) -> bytes:
    """HMAC-SHA256 of the concatenation of ``parts``, fed without joining them."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        h.update(part)
    return h.digest()


def object_mac(key: bytes, parts: Iterable[Buffer]) -> bytes:
    """Keyed BLAKE3 of the concatenation of ``parts`` (with a key derived from ``key``)."""
    h = blake3.blake3(key=_object_key(key))
    for part in parts:
        # As bytes: blake3 takes only byte-formatted buffers (a float64 array's is not).
        h.update(part if isinstance(part, bytes) else memoryview(part).cast("B"))
    return h.digest()


def object_gmac(key: bytes, parts: Iterable[Buffer], salt: bytes | None = None) -> bytes:
    """A random ``salt`` (or the one given, to verify) and the GMAC of the concatenation
    of ``parts`` under the one-time AES-256 key that ``key`` and ``salt`` derive."""
    salt = os.urandom(_SALT_SIZE) if salt is None else salt
    one_time = blake3.blake3(salt, key=_object_key(key, _GMAC_KEY_CONTEXT)).digest()
    gmac = Cipher(algorithms.AES(one_time), modes.GCM(_GCM_NONCE)).encryptor()
    for part in parts:
        view = memoryview(part).cast("B")
        for start in range(0, view.nbytes, _GMAC_CHUNK):
            gmac.authenticate_additional_data(view[start : start + _GMAC_CHUNK])
    gmac.finalize()
    return salt + gmac.tag


def gmac_verifier(tag: Buffer) -> Callable[[bytes, Iterable[Buffer]], bytes]:
    """The MAC algorithm that recomputes a stored GMAC ``tag`` (with its salt)."""
    salt = bytes(tag[:_SALT_SIZE])
    return lambda key, parts: object_gmac(key, parts, salt)


@lru_cache(maxsize=16)
def _object_key(key: bytes, context: str = _OBJECT_KEY_CONTEXT) -> bytes:
    derived: bytes = blake3.blake3(key, derive_key_context=context).digest()
    return derived


def verify_mac(
    keys: Sequence[bytes],
    parts: Sequence[Buffer],
    tag: Buffer,
    where: str,
    algorithm: Callable[[bytes, Iterable[Buffer]], bytes] = mac,
) -> None:
    """Raise :class:`UntrustedObjectError` unless one of ``keys`` made ``tag`` (with
    ``algorithm``, :func:`mac` or :func:`object_mac`)."""
    if not any(hmac.compare_digest(algorithm(k, parts), bytes(tag)) for k in keys):
        raise UntrustedObjectError(
            f"{where} is not signed with the configured signing key: not trusted"
        )


def seal(data: bytes, key: bytes | None) -> bytes:
    """``data`` with a MAC in front (unchanged without a key).

    Examples
    --------
    >>> unseal(seal(b"lease", b"k"), [b"k"], "lease")
    b'lease'
    >>> unseal(b"lease", [], "lease")
    b'lease'
    """
    if key is None:
        return data
    return SEAL_MAGIC + mac(key, [data]) + data


def unseal(data: bytes, keys: Sequence[bytes], where: str) -> bytes:
    """The data of a sealed file, verified when ``keys`` are configured.

    Without keys a sealed file is read without checking (as today); with keys an unsealed
    or wrongly sealed one raises :class:`UntrustedObjectError`.
    """
    sealed = data.startswith(SEAL_MAGIC)
    body = data[len(SEAL_MAGIC) + MAC_SIZE :] if sealed else data
    if keys:
        if not sealed:
            raise UntrustedObjectError(f"{where} is not signed: not trusted")
        tag = data[len(SEAL_MAGIC) : len(SEAL_MAGIC) + MAC_SIZE]
        verify_mac(keys, [body], tag, where)
    return body
