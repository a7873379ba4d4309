"""Task tokens: complete (what the code calls and reads) and the same in every process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from storage_scheduler.tokens import task_token

#: A user module, its task built with the spec dask builds, its token printed.
PROGRAM = """
import sys
sys.path.insert(0, {where!r})
from dask._task_spec import Task, TaskRef
from storage_scheduler.tokens import task_token
import usermod
print(task_token(Task("k", usermod.entry, TaskRef("dep"), 1)))
"""

BASE = """
import math
SCALE = 3
LABELS = frozenset({"a", "b", "c", "d", "e", "f", "g"})

def helper(x):
    return x * SCALE

def entry(x, y, z=10):
    if x in {"p", "q", "r", "s", "t", "u", "v", "w"}:  # a frozenset constant in the code
        return 0
    return helper(x) + y + z + len(LABELS)
"""


def token_of(tmp_path: Path, module: str, seed: str = "0") -> str:
    where = tmp_path / "mod"
    where.mkdir(exist_ok=True)
    (where / "usermod.py").write_text(textwrap.dedent(module))
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM.format(where=str(where))],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    return out.stdout.strip()


def test_same_in_every_process(tmp_path: Path) -> None:
    """Set literals and set constants hash the same whatever the hash seed."""
    tokens = {token_of(tmp_path, BASE, seed) for seed in ("0", "1", "2", "12345")}
    assert len(tokens) == 1


_LOG: list[int] = []


def _log_and_inc(x: int) -> int:
    _LOG.append(x)
    return x + 1


def _forget_function_digests() -> None:
    """Drop the per-function digest cache, as a new process starts without it."""
    from storage_scheduler import tokens

    tokens._function_digests.clear()


@pytest.mark.parametrize(
    "edit",
    [
        ("return x * SCALE", "return x * SCALE + 0"),  # a helper the task calls
        ("SCALE = 3", "SCALE = 4"),  # a module constant the helper reads
        ('LABELS = frozenset({"a"', 'LABELS = frozenset({"z"'),  # a constant the task reads
        ("z=10", "z=11"),  # a default argument
    ],
    ids=["helper", "constant", "set-constant", "default"],
)
def test_edits_change_the_token(tmp_path: Path, edit: tuple[str, str]) -> None:
    source = BASE
    before, after = edit
    assert before in source
    assert token_of(tmp_path, source) != token_of(tmp_path, source.replace(before, after))


def test_global_state_is_not_a_constant() -> None:
    """A module-level list the task appends to (a log, a cache) is run-time state: its
    contents must not change the token (they made reuse depend on when the token of a
    function was first computed)."""
    from dask._task_spec import Task

    before = task_token(Task("k", _log_and_inc, 1))
    _forget_function_digests()
    _LOG.extend(range(5))
    assert task_token(Task("k", _log_and_inc, 1)) == before


def test_edit_elsewhere_in_the_file_does_not(tmp_path: Path) -> None:
    source = BASE
    moved = "\n\n# a comment that moves every line\n" + source + "\ndef unrelated():\n    pass\n"
    assert token_of(tmp_path, source) == token_of(tmp_path, moved)


def test_closures() -> None:
    from dask._task_spec import Task

    def make(n: int):  # type: ignore[no-untyped-def]
        def f(x: int) -> int:
            return x + n

        return f

    assert task_token(Task("k", make(1), 1)) == task_token(Task("k", make(1), 1))
    assert task_token(Task("k", make(1), 1)) != task_token(Task("k", make(2), 1))


def test_partial_and_nested_tasks() -> None:
    from functools import partial

    from dask._task_spec import List, Task, TaskRef

    def add(x: int, y: int) -> int:
        return x + y

    one = Task("k", partial(add, 1), TaskRef("a"))
    assert task_token(one) == task_token(Task("k", partial(add, 1), TaskRef("a")))
    assert task_token(one) != task_token(Task("k", partial(add, 2), TaskRef("a")))
    assert task_token(one) != task_token(Task("k", partial(add, 1), TaskRef("b")))
    nested = Task("k", sum, List(Task("i", add, 1, 2), TaskRef("a")))
    assert task_token(nested) != task_token(
        Task("k", sum, List(Task("i", add, 1, 3), TaskRef("a")))
    )


def test_library_functions_by_name_and_version() -> None:
    import numpy as np

    from dask._task_spec import Task

    assert task_token(Task("k", np.sum, 1)) == task_token(Task("k", np.sum, 1))
    assert task_token(Task("k", np.sum, 1)) != task_token(Task("k", np.prod, 1))


def test_encoding_is_stable() -> None:
    """Tokens name stored objects: an encoding change would orphan every stored result.
    (Values only: functions' tokens include the bytecode, which differs between Pythons.)"""
    from dask._task_spec import DataNode, Dict, List, TaskRef

    spec = List(
        *(1, -2, 1.5, float("nan"), "s", b"b", None, True, (1, 2, [3, {4: 5}])),
        *({"k": {1, 2}}, frozenset({"x"}), {}, range(3), slice(1, 2), ..., 3j),
        *(Dict(a=TaskRef("y")), DataNode("z", 4), TaskRef(("a", 1)), tuple(range(20))),
    )
    assert task_token(spec, ("v1", 2)) == "025c81ea9802b46f29f16d05a61f561e"


def test_salts_differ_by_type() -> None:
    from dask._task_spec import Task

    def f() -> None: ...

    tokens = {task_token(Task("k", f), salt) for salt in [(None, 1), (None, True), (None, 1.0)]}
    assert len(tokens) == 3
