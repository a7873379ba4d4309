"""Signed stores: nothing unsigned or signed with another key is unpickled or trusted."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest

import dask
from dask import delayed
from distributed.utils_test import captured_logger, gen_test

from storage_scheduler import Store, StoreSettings, UntrustedObjectError
from storage_scheduler.store.catalog import Catalog
from storage_scheduler.store.leases import keys_leased_by_others, write_lease
from tests.utils import storage_cluster, stored_headers

KEY = "test-signing-key-never-shown"
CALLS: list[Any] = []


class Payload:
    """Unpickling it creates a file: proof that a forged object was deserialized."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (str(self.marker), "w"))


def store(url: str, key: str | list[str] | None) -> Store:
    """A store signing with ``key``; None: without any key, whatever the config says."""
    return Store(StoreSettings.from_config(url, signing_key=[] if key is None else key))


def inc(x: int) -> int:
    CALLS.append(x)
    return x + 1


@pytest.mark.asyncio
@pytest.mark.parametrize("forger_key", [None, "another-key"], ids=["unsigned", "wrong-key"])
async def test_forged_object_is_never_unpickled(tmp_path: Path, forger_key: str | None) -> None:
    url, marker = str(tmp_path / "store"), tmp_path / "pwned"
    signed, forger = store(url, KEY), store(url, forger_key)
    try:
        await signed.put("x", 42, token="t")
        assert await signed.get("x", "t") == 42
        await forger.put("x", Payload(marker), token="t")  # a valid checksum, no valid MAC
        with pytest.raises(UntrustedObjectError):
            await signed.get("x", "t")
        with pytest.raises(UntrustedObjectError):
            await signed.get_serialized("x", "t")
        assert not marker.exists()
        # Without a key configured, a reader trusts checksums only, as before.
        assert (await forger.read("x", "t"))[0].token == "t"
    finally:
        signed.close()
        forger.close()


@pytest.mark.asyncio
async def test_key_rotation(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    old, rotated = store(url, "old"), store(url, ["new", "old"])
    try:
        await old.put("a", 1)
        await rotated.put("b", 2)
        assert await rotated.get("a") == 1  # signed with the old key: still accepted
        assert await rotated.get("b") == 2
        with pytest.raises(UntrustedObjectError):
            await old.get("b")  # signed with the new key only
    finally:
        old.close()
        rotated.close()


@pytest.mark.asyncio
async def test_forged_segments_and_leases_are_ignored(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    signed, forger = store(url, KEY), store(url, None)
    try:
        good = Catalog(signed)
        good.add("real", "t1", 10)
        await good.flush()
        bad = Catalog(forger)
        bad.add("forged", "t2", 10)
        await bad.flush()
        with captured_logger("storage_scheduler", level=logging.WARNING) as log:
            loaded = Catalog(signed)
            await loaded.load()
        assert set(loaded.entries) == {"real"}
        assert "Ignoring catalog segment" in log.getvalue()
        await write_lease(forger, "forged", ["real"])
        await write_lease(signed, "honest", ["other"])
        assert await keys_leased_by_others(signed, own_lease=None) == {"other"}
    finally:
        signed.close()
        forger.close()


@gen_test(timeout=60)
async def test_cluster_recomputes_forged_results_and_reuses_signed_ones(tmp_path: Path) -> None:
    url, marker = str(tmp_path / "store"), tmp_path / "pwned"
    CALLS.clear()
    graph = delayed(inc)(delayed(inc)(1, dask_key_name="x"), dask_key_name="y")
    with dask.config.set({"storage-scheduler.signing-key": KEY}):
        async with storage_cluster(url) as (c, s, plugin):
            assert await c.compute(graph) == 3
        assert CALLS == [1, 2]
        # Signed results are reused by the next cluster.
        async with storage_cluster(url) as (c, s, plugin):
            assert await c.compute(graph) == 3
            assert plugin.reuse.reused_total == 1
        assert CALLS == [1, 2]
        # Someone without the key replaces y, keeping its token so that it would be reused.
        forger = store(url, None)
        (header,) = await stored_headers(forger, "y")
        await forger.put("y", Payload(marker), token=header.token)
        forger.close()
        with captured_logger("storage_scheduler", level=logging.WARNING) as log:
            async with storage_cluster(url) as (c, s, plugin):
                assert await c.compute(graph) == 3
                info = plugin.storage_info()
        assert not marker.exists()
        assert CALLS == [1, 2, 1, 2]  # y recomputed (and x, an intermediate deleted by GC)
        assert KEY not in log.getvalue() + repr(info) + repr(plugin.store_settings)
        assert "not signed" in log.getvalue() or "not trusted" in log.getvalue()


def test_objects_carry_keyed_blake3_and_earlier_hmac_objects_verify() -> None:
    import struct

    from storage_scheduler.store import serialize, signing

    key, other = KEY.encode(), b"another-key"
    frames = serialize.encode("x", 42, token="t", signing_key=key)
    data = b"".join(bytes(memoryview(f).cast("B")) for f in frames)
    assert data.startswith(serialize.MAGIC_SIGNED_B3)
    assert serialize.verify(data, "x", signing_keys=[key], token="t")[0].token == "t"
    with pytest.raises(UntrustedObjectError):
        serialize.verify(data, "x", signing_keys=[other])

    # The layout of earlier versions: the same object with an HMAC-SHA256 tag.
    start = serialize.PREFIX_SIZE + signing.MAC_SIZE
    body = data[start:]
    _, header_len, checksum = struct.unpack_from("<8sIQ", data)
    old = (
        struct.pack("<8sIQ", serialize.MAGIC_SIGNED, header_len, checksum)
        + signing.mac(key, [body])
        + body
    )
    assert serialize.verify(old, "x", signing_keys=[key])[0].token == "t"
    # The tag is checked with the algorithm its magic names, not the other one.
    swapped = serialize.MAGIC_SIGNED + data[len(serialize.MAGIC_SIGNED) :]
    with pytest.raises(UntrustedObjectError):
        serialize.verify(swapped, "x", signing_keys=[key])


def test_large_objects_carry_gmac_under_a_one_time_key() -> None:
    import struct

    import numpy as np
    import xxhash

    from storage_scheduler.store import serialize, signing

    key, other = KEY.encode(), b"another-key"
    value = np.arange(signing.GMAC_MIN_BYTES // 8, dtype="f8")

    def encoded() -> bytearray:
        frames = serialize.encode("x", value, token="t", signing_key=key)
        return bytearray(b"".join(bytes(memoryview(f).cast("B")) for f in frames))

    data = encoded()
    assert data.startswith(serialize.MAGIC_SIGNED_GMAC)
    header, payload = serialize.verify(data, "x", signing_keys=[other, key], token="t")
    np.testing.assert_array_equal(serialize.decode_value(payload), value)
    with pytest.raises(UntrustedObjectError):
        serialize.verify(data, "x", signing_keys=[other])
    # A fresh salt, so a fresh key, for every write of the same bytes.
    tag = slice(serialize.PREFIX_SIZE, serialize.PREFIX_SIZE + signing.MAC_SIZE)
    assert encoded()[tag] != data[tag]

    def forged(change: Any) -> bytearray:
        """``data`` changed, with its checksum made to match again."""
        out = bytearray(data)
        change(out)
        _, header_len, _ = struct.unpack_from("<8sIQ", out)
        body = out[tag.stop :]
        struct.pack_into(
            "<8sIQ", out, 0, bytes(out[:8]), header_len, xxhash.xxh3_64_intdigest(body)
        )
        return out

    def flip(i: int) -> Any:
        return lambda b: b.__setitem__(i, b[i] ^ 1)

    for change in (flip(len(data) - 1), flip(tag.start), flip(tag.stop - 1)):
        with pytest.raises(UntrustedObjectError):
            serialize.verify(forged(change), "x", signing_keys=[key])
    # The tag is checked with the algorithm its magic names.
    for magic in (serialize.MAGIC_SIGNED_B3, serialize.MAGIC_SIGNED):
        with pytest.raises(UntrustedObjectError):
            serialize.verify(magic + data[len(magic) :], "x", signing_keys=[key])
    # Below the threshold: keyed BLAKE3.
    small = serialize.encode("x", value[:1000], token="t", signing_key=key)
    assert bytes(memoryview(small[0]).cast("B")).startswith(serialize.MAGIC_SIGNED_B3)


@pytest.mark.asyncio
async def test_signed_arrays_round_trip(tmp_path: Path) -> None:
    """Arrays are stored as out-of-band buffers of their own format (float64, say): the
    MAC covers their bytes."""
    import numpy as np

    signed = store(str(tmp_path / "store"), KEY)
    try:
        for value in (np.arange(1000, dtype="f8"), np.ones((3, 4), dtype="i2")):
            await signed.put("a", value, token=str(value.dtype))
            np.testing.assert_array_equal(await signed.get("a", str(value.dtype)), value)
    finally:
        signed.close()


@pytest.mark.asyncio
async def test_files_are_sealed_and_verified_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catalog segments and lease parts can be tens of megabytes: their MACs are
    computed, and their bytes copied, in the store's thread pool, not on the loop."""
    from storage_scheduler.store import signing

    threads: list[int] = []

    def spy(func: Any) -> Any:
        def called(*args: Any) -> Any:
            threads.append(threading.get_ident())
            return func(*args)

        return called

    monkeypatch.setattr(signing, "mac", spy(signing.mac))  # sealing
    monkeypatch.setattr(signing, "verify_mac", spy(signing.verify_mac))  # unsealing
    signed = store(str(tmp_path / "store"), KEY)
    try:
        await signed.write_file("segment", b"x" * 100_000)
        assert await signed.read_file("segment") == b"x" * 100_000
        assert len(threads) == 2 and threading.get_ident() not in threads
    finally:
        signed.close()
