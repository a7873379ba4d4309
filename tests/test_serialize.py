"""Object naming and framing: property-based round trips."""

from __future__ import annotations

import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage_scheduler import IntegrityError
from storage_scheduler.store.serialize import (
    MAX_SPELLED_NAME,
    decode_value,
    encode,
    key_from_object_name,
    object_name,
    object_path,
    pack_key,
    read_header,
    unpack_key,
    verify,
)

atoms = (
    st.text()
    | st.binary()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.sampled_from(["..", "/", "a/../../b", "\x00", ".", "~", "C:\\x"])
)
keys = st.recursive(atoms, lambda inner: st.tuples(inner) | st.lists(inner, max_size=4).map(tuple))

NAME_ALPHABET = set(string.ascii_lowercase + string.digits)


def same_key(a: object, b: object) -> bool:
    """Equal, and equal in type all the way down (1 == 1.0 == True in Python)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same_key(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    if isinstance(a, float):
        return repr(a) == repr(b)  # tells 0.0 from -0.0
    return a == b


@given(keys)
def test_pack_key_round_trip(key: object) -> None:
    assert same_key(unpack_key(pack_key(key)), key)


@given(keys)
def test_object_name_is_safe_and_bounded(key: object) -> None:
    name = object_name(key)
    assert 1 < len(name) <= MAX_SPELLED_NAME + 1
    assert set(name) <= NAME_ALPHABET  # no "/", ".", NUL, upper case
    path = object_path(key)
    assert path.startswith("objects/") and path.count("/") == 2 and ".." not in path


@given(keys)
def test_object_name_reversible_when_spelled(key: object) -> None:
    name = object_name(key)
    back = key_from_object_name(name)
    if name.startswith("k"):
        assert same_key(back, key)
    else:
        assert name.startswith("h") and back is None


@given(keys, keys)
def test_object_name_injective(a: object, b: object) -> None:
    if not same_key(a, b):
        assert object_name(a) != object_name(b)


def test_names_distinguish_types() -> None:
    names = {object_name(k) for k in [1, 1.0, "1", b"1", (1,), 2, -0.0, 0.0]}
    assert len(names) == 8


def test_invalid_key_parts_rejected() -> None:
    with pytest.raises(TypeError, match="not a valid Dask key"):
        object_name(("x", object()))
    with pytest.raises(TypeError, match="not a valid Dask key"):
        object_name(True)


@settings(max_examples=50)
@given(
    keys,
    st.one_of(st.binary(), st.integers(), st.text(), st.lists(st.integers())),
    st.text() | st.none(),
)
def test_framing_round_trip(key: object, value: object, token: str | None) -> None:
    data = b"".join(encode(key, value, token=token))
    header, payload = verify(data, key)
    assert same_key(header.key, key)
    assert header.token == token
    assert header.nbytes == len(payload)
    assert decode_value(payload) == value
    assert same_key(read_header(data[:4096] if len(data) > 4096 else data).key, key)


@settings(max_examples=50)
@given(st.binary(min_size=1, max_size=5000), st.data())
def test_any_single_byte_damage_is_detected(value: bytes, data: st.DataObject) -> None:
    obj = bytearray(b"".join(encode("k", value)))
    i = data.draw(st.integers(0, len(obj) - 1))
    obj[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(IntegrityError):
        verify(obj, "k")


@settings(max_examples=50)
@given(st.binary(max_size=5000), st.data())
def test_any_truncation_is_detected(value: bytes, data: st.DataObject) -> None:
    obj = b"".join(encode("k", value))
    cut = data.draw(st.integers(0, len(obj) - 1))
    with pytest.raises(IntegrityError):
        verify(obj[:cut], "k")


def test_numpy_frames_not_copied() -> None:
    x = np.arange(1_000_000)
    frames = encode("k", x, compression=False)
    assert any(
        np.shares_memory(np.asarray(memoryview(f)).view("u1"), x.view("u1")) for f in frames[2:]
    )
