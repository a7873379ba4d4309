"""Keyed MACs: nothing read back from a shared store is trusted unless it was signed.

Anyone who can write the store could otherwise replace an object whose checksum they
recompute, and the next reader would unpickle it: code execution on every worker and
client. With ``storage-scheduler.signing-key`` set, every object, catalog segment and lease
carries an HMAC-SHA256 over its bytes, and a reader verifies it before anything is
unpickled or believed. Several keys rotate: the first signs, any of them verifies.

The checksum stays beside the MAC: a checksum failure says the bytes were damaged, a MAC
failure with a good checksum says they were written without the key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence

from storage_scheduler._exceptions import UntrustedObjectError

__all__ = ["MAC_SIZE", "mac", "seal", "unseal", "verify_mac"]

Buffer = bytes | bytearray | memoryview

#: Bytes of one MAC (HMAC-SHA256).
MAC_SIZE = 32
#: Leads a sealed small file (catalog segment, lease).
SEAL_MAGIC = b"DSKSEAL1"


def mac(key: bytes, parts: Iterable[Buffer]) -> bytes:
    """HMAC-SHA256 of the concatenation of ``parts``, fed without joining them."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        h.update(part)
    return h.digest()


def verify_mac(keys: Sequence[bytes], parts: Sequence[Buffer], tag: Buffer, where: str) -> None:
    """Raise :class:`UntrustedObjectError` unless one of ``keys`` made ``tag``."""
    if not any(hmac.compare_digest(mac(k, parts), bytes(tag)) for k in keys):
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
