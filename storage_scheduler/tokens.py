"""Tokens of what produced a result, so that a stored result is never reused stale.

A key alone does not say what a result is: ``delayed(f, name="x")`` keeps its key when
``f``'s code changes, and two sessions may give one key to different work. A stored
result is therefore reused only when the token of the task that wants to reuse it equals
the token recorded when it was stored. The token covers

* the task spec: every function in it, its literal arguments and the keys of its
  dependencies (fused and nested tasks included);
* for every Python function reached, *transitively*: its code (bytecode, names, constants;
  not file names or line numbers), its default arguments, the values its closure holds,
  and through the global names its code uses, the user functions it calls, the methods of
  user classes it uses and the values of module-level constants it reads (immutable
  values: numbers, strings, tuples, frozensets...; a module-level list, dict or set is
  run-time state, covered by name only). "User" code is
  code outside the Python installation and its site-packages; library functions are
  covered by their module's name and version (a numpy upgrade changes ``np.sum``'s token);
* a version salt: ``dask.annotate(storage_version=...)`` on the task, and the
  ``storage-scheduler.version`` setting.

What it cannot see: data a function reads at run time (files, databases, environment
variables, the clock), state held by objects that cannot be tokenized deterministically
(those make the token unique: the task is never reused), attributes looked up on objects
rather than by a global name, and changes inside installed libraries that keep their
version. Use the version salt for those.

Tokens are the same in every process whatever ``PYTHONHASHSEED`` is: sets are hashed in a
sorted order, never by ``repr`` or by pickling. The digest of a function is cached on the
function object, so a task spec costs a few microseconds once its functions are known.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import math
import sys
import sysconfig
import types
import weakref
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from dask._task_spec import Alias, DataNode, GraphNode, NestedContainer, Task, TaskRef
from dask.tokenize import tokenize

__all__ = ["task_token"]

#: Values simple enough to hash by their ``repr`` (which does not depend on the hash seed).
_SCALARS = (str, bytes, bool, int, type(None), complex, range, slice, type(Ellipsis))

#: Digest of every function object seen, computed once (a function's code and defaults are
#: fixed; module constants are read when it is first seen).
_function_digests: weakref.WeakKeyDictionary[Callable[..., Any], bytes] = (
    weakref.WeakKeyDictionary()
)


@lru_cache(maxsize=1)
def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots.update({sys.prefix, sys.base_prefix, sys.exec_prefix})
    return tuple(sorted(r.rstrip("/") + "/" for r in roots if r))


@lru_cache(maxsize=4096)
def _is_user_module(name: str | None) -> bool:
    """Whether a module is the user's own code (not the standard library or a package)."""
    if not name:
        return False
    module = sys.modules.get(name)
    if module is None:
        return False
    path = getattr(module, "__file__", None)
    if path is None:
        return name == "__main__"  # interactive sessions; builtins have no file either
    return not any(str(path).startswith(root) for root in _library_roots())


def _is_user_code(module: str | None) -> bool:
    """Whether functions of ``module`` are digested by their code.

    ``__main__`` always is (in a scheduler or worker, functions of the client's
    ``__main__`` arrive pickled by value, while their own ``__main__`` is the ``dask``
    command), and so is a module this process does not have (pickled by value too).
    """
    if module is None or module == "__main__":
        return True
    return module not in sys.modules or _is_user_module(module)


@lru_cache(maxsize=4096)
def _module_version(name: str) -> str:
    top = name.split(".")[0]
    version = getattr(sys.modules.get(top), "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version(top)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return sys.version if top in sys.stdlib_module_names else ""


def _framed(part: str | bytes) -> bytes:
    data = part.encode() if isinstance(part, str) else part
    return len(data).to_bytes(8, "little") + data


#: Framed type names of the scalars, prefixed once rather than per value.
_SCALAR_HEADS = {t: _framed(t.__name__) for t in _SCALARS}
_REF_HEAD = _framed("ref")
_TASK_HEAD = _framed("task")
_EMPTY_DICT = _framed("dict")
_TUPLE_HEADS = [_framed("tuple") + _framed(str(n)) for n in range(16)]


class _Hasher:
    """One token's walk: length-prefixed parts in a canonical order, hashed at the end,
    with cycle protection.

    The parts are gathered in one buffer and hashed once: a task spec is dozens of small
    parts, and one ``update`` call each cost more than the hashing.
    """

    __slots__ = ("_active", "buf")

    def __init__(self) -> None:
        self.buf = bytearray()
        #: Functions being digested (shared with sub-walks), made when first needed: a
        #: plain task's walk then allocates nothing the garbage collector tracks.
        self._active: set[int] | None = None

    def feed(self, *parts: str | bytes) -> None:
        buf = self.buf
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            buf += len(data).to_bytes(8, "little")
            buf += data

    def digest(self) -> bytes:
        return hashlib.sha256(self.buf).digest()

    def sub(self, v: Any, how: Callable[[_Hasher, Any], None] | None = None) -> bytes:
        """The digest of ``v`` on its own (fed by ``how``, default :meth:`value`), for
        parts hashed in a sorted order and for caching."""
        if self._active is None:
            self._active = set()
        sub = _Hasher()
        sub._active = self._active
        (how or _Hasher.value)(sub, v)
        return sub.digest()

    # ------------------------------------------------------------------- values

    def value(self, v: Any) -> None:
        """Feed a value so that equal values give equal bytes in every process."""
        t = type(v)
        head = _SCALAR_HEADS.get(t)
        if head is not None:  # the common cases first, by exact type
            self.buf += head
            self.feed(repr(v))
        elif t is Task:
            self._task(v)
        elif t is tuple:
            self.feed("tuple", str(len(v)))
            self._items(v)
        elif isinstance(v, float):
            self.feed("f", repr(v) if not math.isnan(v) else "nan")
        elif isinstance(v, _SCALARS):
            self.feed(type(v).__name__, repr(v))
        elif isinstance(v, TaskRef):
            self.feed("ref", repr(v.key))
        elif isinstance(v, GraphNode):
            self.node(v)
        elif isinstance(v, (tuple, list)):
            self.feed(type(v).__name__, str(len(v)))
            self._items(v)
        elif isinstance(v, (set, frozenset)):
            self.feed(type(v).__name__, *sorted(self.sub(x) for x in v))
        elif isinstance(v, dict):
            if not v:
                self.buf += _EMPTY_DICT
                return
            items = sorted((self.sub(k), self.sub(x)) for k, x in v.items())
            self.feed("dict", *(part for item in items for part in item))
        elif isinstance(v, types.CodeType):
            self.code(v)
        elif isinstance(v, types.ModuleType):
            self.feed("module", v.__name__, _module_version(v.__name__))
        elif callable(v):
            self.function(v)
        elif type(v).__name__ == "Array" and type(v).__module__.startswith("zarr."):
            # A zarr array is a handle on data elsewhere: its location and metadata, not
            # its pickled state, which changes as the array is used (its data's version
            # is the ``storage_sources`` annotation's: see scheduler/sources.py).
            self.feed("zarr", repr(v.store), str(v.path), repr(v.metadata))
        else:
            # Arrays, frames and other data: dask's own deterministic token. An object
            # dask cannot tokenize deterministically gets a random one: never reused.
            self.feed("data", type(v).__qualname__, str(tokenize(v)))

    def _items(self, items: Any) -> None:
        """The items of a sequence, scalars and references inline: task arguments are
        mostly these, and this loop is most of a task's token."""
        buf, heads = self.buf, _SCALAR_HEADS
        for x in items:
            head = heads.get(type(x))
            if head is not None:
                data = repr(x).encode()
            elif type(x) is TaskRef:
                head, data = _REF_HEAD, repr(x.key).encode()
            else:
                self.value(x)
                continue
            buf += head
            buf += len(data).to_bytes(8, "little")
            buf += data

    # -------------------------------------------------------------------- specs

    def node(self, node: GraphNode) -> None:
        if isinstance(node, NestedContainer):
            parts = [self.sub(a) for a in node.args]
            if node.klass in (set, frozenset):
                parts.sort()  # a set's order depends on the hash seed
            self.feed("container", node.klass.__name__, *parts)
        elif isinstance(node, Task):
            self._task(node)
        elif isinstance(node, Alias):
            self.feed("alias", repr(node.target))
        elif isinstance(node, DataNode):
            self.feed("datanode")
            self.value(node.value)
        else:
            self.feed("node", type(node).__qualname__, str(tokenize(node)))

    def _task(self, task: Task) -> None:
        self.buf += _TASK_HEAD
        self.function(task.func)
        args, kwargs = task.args, task.kwargs
        if type(args) is tuple:  # what value() does, without its dispatch
            if len(args) < len(_TUPLE_HEADS):
                self.buf += _TUPLE_HEADS[len(args)]
            else:
                self.feed("tuple", str(len(args)))
            self._items(args)
        else:
            self.value(args)
        if type(kwargs) is dict and not kwargs:
            self.buf += _EMPTY_DICT
        else:
            self.value(kwargs)

    # ---------------------------------------------------------------- functions

    def function(self, func: Any) -> None:
        try:
            cached = _function_digests.get(func)
        except TypeError:  # not weak-referenceable (a builtin, say)
            cached = None
        if cached is None:
            cached = self.sub(func, _Hasher._function)
            try:
                _function_digests[func] = cached
            except TypeError:
                pass
        self.feed(cached)

    def _function(self, func: Any) -> None:
        if self._active is None:
            self._active = set()
        if id(func) in self._active:  # recursion between user functions
            self.feed("cycle", getattr(func, "__qualname__", ""))
            return
        self._active.add(id(func))
        try:
            self._function_body(func)
        finally:
            self._active.discard(id(func))

    def _function_body(self, func: Any) -> None:
        inner = getattr(func, "func", None)  # functools.partial and friends
        if inner is not None and inner is not func and callable(inner):
            self.feed("partial")
            self.function(inner)
            self.value(tuple(getattr(func, "args", ())))
            self.value(dict(getattr(func, "keywords", None) or {}))
            return
        bound_to = getattr(func, "__self__", None)
        func = getattr(func, "__func__", func)  # bound methods: the function, and its object
        code = getattr(func, "__code__", None)
        module = getattr(func, "__module__", None) or type(func).__module__
        name = getattr(func, "__qualname__", type(func).__qualname__)
        if not isinstance(code, types.CodeType):
            if isinstance(func, type) and _is_user_code(func.__module__):
                self._user_class(func)
            elif _is_user_code(module):  # a callable object of the user's: its state too
                self.feed("callable", str(name))
                self._user_class(type(func))
                self.feed(str(tokenize(func)))
            else:
                self.feed("lib", str(module), str(name), _module_version(str(module)))
            return
        if not _is_user_code(module):
            self.feed("lib", str(module), str(name), _module_version(str(module)))
            return
        self.feed("def", str(name))
        self.code(code)
        self.value(func.__defaults__ or ())
        self.value(func.__kwdefaults__ or {})
        for cell in func.__closure__ or ():
            try:
                self.value(cell.cell_contents)
            except ValueError:  # an empty cell
                self.feed("empty-cell")
        self._globals(code, func.__globals__)
        if bound_to is not None and not isinstance(bound_to, types.ModuleType):
            self.feed("self")
            self.value(bound_to)

    def _user_class(self, cls: type) -> None:
        self.feed("class", cls.__qualname__)
        for attr, member in sorted(vars(cls).items()):
            member = getattr(member, "__func__", member)  # static and class methods
            if isinstance(member, types.FunctionType):
                self.feed(attr)
                self.function(member)

    def _globals(self, code: types.CodeType, namespace: Mapping[str, Any]) -> None:
        """What the code reads through global names: user functions and classes, module
        constants, and the attributes it uses of user modules."""
        names = sorted(_names(code))
        for name in names:
            if name not in namespace:
                continue  # a builtin, an attribute name, or not defined yet
            v = namespace[name]
            if isinstance(v, types.ModuleType):
                if _is_user_code(v.__name__):
                    self.feed("user-module", name)
                    for attr in names:  # ``helpers.f``: f is among the code's names
                        member = getattr(v, attr, None)
                        if isinstance(member, (types.FunctionType, type)):
                            self.feed(attr)
                            self.function(member)
                else:
                    self.feed("module", name, v.__name__, _module_version(v.__name__))
            elif isinstance(v, (types.FunctionType, type)) or callable(v):
                self.feed("global", name)
                self.function(v)
            elif isinstance(v, _STATE):
                # A mutable container is run-time state (a cache, a log, a registry), not
                # a constant: its contents change as tasks run, so they would make the
                # token depend on when it was computed. Covered by name and type only.
                self.feed("state", name, type(v).__qualname__)
            else:
                self.feed("const", name)
                self.value(v)

    def code(self, code: types.CodeType) -> None:
        # The code's behaviour, not where it sits: no file name or line numbers, so that
        # the same function in another checkout or after an edit elsewhere matches.
        self.feed("code", code.co_code, repr(code.co_names), repr(code.co_varnames))
        for const in code.co_consts:
            self.value(const)


#: Global values that are run-time state rather than constants.
_STATE = (list, dict, set, bytearray, collections.deque)


def _names(code: types.CodeType) -> set[str]:
    """Global and attribute names used by ``code`` and the code nested in it."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


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
    hasher = _Hasher()
    hasher.value(spec)
    hasher.buf += _salt(salt)
    return hasher.digest().hex()[:32]


def _salt(salt: object) -> bytes:
    # Cached only by exact types: a cache keyed by value alone would take 1, 1.0 and
    # True for one another.
    cache_key = (salt, tuple(map(type, salt))) if type(salt) is tuple else (salt, type(salt))
    try:
        return _salt_cache[cache_key]
    except (KeyError, TypeError):
        hasher = _Hasher()
        hasher.feed("salt")
        hasher.value(salt)
        data = bytes(hasher.buf)
    try:
        if len(_salt_cache) < 64:
            _salt_cache[cache_key] = data
    except TypeError:  # unhashable
        pass
    return data


_salt_cache: dict[object, bytes] = {}
