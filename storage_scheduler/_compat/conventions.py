"""dask's conventions that are no API: the names of ``compute``'s wrappers, and which
functions write. Checked by ``tests/test_private_hooks.py`` like the rest of the package.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DASK_WRITERS", "is_finalize_key", "runs_for_effect"]


def is_finalize_key(key: Any) -> bool:
    """Whether ``key`` is the one-off wrapper ``compute`` puts around a collection.

    A dask naming convention (``finalize-<token>``), not an API. Its name is new at every
    call, so its result can never be reused: it is not stored, and what it wraps (the
    collection's own keys) counts as the requested result. ``dask.compute`` fuses the
    wrapper with the collection's last task and joins their names
    (``sum-aggregate-finalize-hlgfinalizecompute-<token>``, which ``key_split`` cuts to
    ``sum-aggregate``).

    Examples
    --------
    >>> is_finalize_key("finalize-hlgfinalizecompute-e524ccd8f9c04e6b98067802ea44649d")
    True
    >>> is_finalize_key("sum-aggregate-finalize-hlgfinalizecompute-e524ccd8f9c04e6b")
    True
    >>> is_finalize_key(("sum-partial-b599ab36dafeab53eb2e45e5687aec5d", 0))
    False
    """
    words = str(key[0] if isinstance(key, tuple) and key else key).split("-")
    return words[0] == "finalize" or "hlgfinalizecompute" in words


#: dask's writers, by module and qualified name of the task's function (of its class, for
#: a callable object): they run for what they write, whatever they return.
DASK_WRITERS = frozenset(
    {
        "dask.array.core.load_store_chunk",
        "dask.bag.core._to_textfiles_chunk",
        "dask.dataframe.io.csv._write_csv",
        "dask.dataframe.io.hdf._pd_to_hdf",
        "dask.dataframe.io.json.write_json_partition",
        "dask.dataframe.io.orc.arrow.ArrowORCEngine.write_partition",
        "dask.dataframe.io.parquet.core.ToParquetFunctionWrapper",
        "dask.dataframe.io.sql._to_sql_chunk",
    }
)


def runs_for_effect(spec: object, value: object) -> bool:
    """Whether a task ran for what it did (wrote files, a database, an array) rather than
    for what it returned: its result is ``None``, or its function is one of dask's
    writers (``to_parquet``, ``to_csv``, ``store``/``to_zarr``, ...). Reusing such a
    result would skip the writing.

    Examples
    --------
    >>> from dask._task_spec import Task
    >>> from dask.array.core import load_store_chunk
    >>> runs_for_effect(Task("k", load_store_chunk, 1, 2, 3, 4, 5, 6), ())
    True
    >>> runs_for_effect(Task("k", len, [1]), 1), runs_for_effect(Task("k", print, 1), None)
    (False, True)
    """
    if value is None:
        return True
    func = getattr(spec, "func", None)
    named: Any = func if hasattr(func, "__qualname__") else type(func)
    return f"{named.__module__}.{named.__qualname__}" in DASK_WRITERS
