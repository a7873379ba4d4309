"""Tokens of what produced a result, so that a stored result is never reused stale.

A key alone does not say what a result is: ``delayed(f, name="x")`` keeps its key when
``f``'s code changes, and two sessions may give one key to different work. A stored
result is therefore reused only when the token of the task that wants to reuse it equals
the token recorded when it was stored. The token covers

* the task spec as dask tokenizes it: the functions' identities, literal arguments and the
  keys of the dependencies;
* the code of every Python function in the spec (dask tokenizes importable functions by
  name only, so an edited function would otherwise look the same), and the version of the
  module of compiled callables (a numpy upgrade changes ``np.sum``'s token);
* a version salt: ``dask.annotate(storage_version=...)`` on the task, and the
  ``storage-scheduler.version`` setting, for changes no hash can see (data read from a
  file that changed, say).

Worker and scheduler compute the same token from the same spec. Computing it is CPU work
of tens of microseconds; workers do it in their store's thread pool, the scheduler only
for the stored keys a new graph could reuse.
"""

from __future__ import annotations

import hashlib
import sys
import types
from collections.abc import Iterator
from typing import Any

from dask._task_spec import GraphNode, Task
from dask.base import tokenize

__all__ = ["task_token"]


def _callables(node: Any, depth: int = 0) -> Iterator[Any]:
    """Every callable inside a task spec (nested and fused tasks included)."""
    if depth > 50:  # pathological nesting; the dask token still covers it
        return
    if isinstance(node, Task):
        yield node.func
        children: Any = (*node.args, *node.kwargs.values())
    elif isinstance(node, GraphNode):
        children = getattr(node, "args", ())
    elif isinstance(node, (list, tuple, set, frozenset)):
        children = node
    elif isinstance(node, dict):
        children = node.values()
    else:
        return
    for child in children:
        yield from _callables(child, depth + 1)


def _code_digest(code: types.CodeType, h: Any) -> None:
    # The code's behaviour, not where it sits: no file name or line numbers, so that the
    # same function in another checkout or after an edit elsewhere in the file matches.
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    h.update(repr(code.co_varnames).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_digest(const, h)
        else:
            h.update(repr(const).encode())


def _digest_callable(func: Any, h: Any, depth: int = 0) -> None:
    if depth > 10:
        return
    inner = getattr(func, "func", None)  # functools.partial and friends
    if inner is not None and inner is not func:
        _digest_callable(inner, h, depth + 1)
    func = getattr(func, "__func__", func)  # bound methods
    code = getattr(func, "__code__", None)
    if isinstance(code, types.CodeType):
        _code_digest(code, h)
        return
    module = getattr(func, "__module__", None) or type(func).__module__
    top = sys.modules.get(str(module).split(".")[0])
    h.update(f"{module}:{getattr(func, '__qualname__', type(func).__qualname__)}".encode())
    h.update(str(getattr(top, "__version__", "")).encode())


def task_token(spec: Any, salt: object = None) -> str:
    """The token of a task spec: equal tokens mean the same computation.

    Parameters
    ----------
    spec
        The task's ``run_spec`` (a ``dask._task_spec`` node).
    salt
        Anything that must also match (a version string, say).

    Examples
    --------
    >>> from dask._task_spec import Task, TaskRef
    >>> def f(x, y):
    ...     return x + y
    >>> a = task_token(Task("k", f, TaskRef("dep"), 1))
    >>> a == task_token(Task("other-key", f, TaskRef("dep"), 1))  # the key is not part of it
    True
    >>> a == task_token(Task("k", f, TaskRef("dep"), 2))
    False
    >>> a == task_token(Task("k", f, TaskRef("dep"), 1), salt="v2")
    False
    """
    h = hashlib.sha256(str(tokenize(spec)).encode())
    for func in _callables(spec):
        _digest_callable(func, h)
    h.update(repr(salt).encode())
    return h.hexdigest()[:32]
