"""Credentials in store URLs (user info, presigned query strings) are never shown."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from distributed.utils_test import captured_logger, gen_cluster, inc

from storage_scheduler import StorageSchedulerError, Store, StoreSettings, StoreUnavailableError
from storage_scheduler.dashboard import render_page
from tests.utils import enable_storage

SECRET = "Zm9vYmFy-do-not-show"


@gen_cluster(client=True)
async def test_query_string_secret_stays_hidden(
    c: Any, s: Any, a: Any, b: Any, tmp_path: Path
) -> None:
    # A local directory whose name holds a query string: a real store, with a secret in it.
    url = f"file://{tmp_path}/store?sig={SECRET}"
    with (
        captured_logger("storage_scheduler", level=logging.DEBUG) as ours,
        captured_logger("distributed", level=logging.INFO) as theirs,
    ):
        plugin = await enable_storage(s, url)
        assert await c.submit(inc, c.submit(inc, 1, key="x"), key="y") == 3
        info, status = plugin.storage_info(), plugin.storage_status()
        shown = [
            ours.getvalue(),
            theirs.getvalue(),
            repr(info),
            repr(status),
            render_page(status),
            repr(plugin.store_settings),
            repr(plugin.store),
            repr(a.plugins["storage-scheduler"].store),
        ]
    assert info["url"] == f"file://{tmp_path}/store?***"
    for text in shown:
        assert SECRET not in text


@pytest.mark.parametrize(
    "url",
    [f"http://user:{SECRET}@127.0.0.1:9/results", f"http://127.0.0.1:9/results?token={SECRET}"],
    ids=["userinfo", "query"],
)
@pytest.mark.asyncio
async def test_errors_of_an_unreachable_store_hide_the_secret(url: str) -> None:
    store = Store(StoreSettings.from_config(url))
    try:
        with pytest.raises(StoreUnavailableError) as info:
            await store.check()
    finally:
        store.close()
    text = f"{info.value} {info.value.__cause__!r} {store!r} {store.settings!r}"
    assert SECRET not in text
    assert "127.0.0.1:9" in text  # the host stays, to say where


def test_config_error_hides_the_secret() -> None:
    with pytest.raises(StorageSchedulerError) as info:
        Store(StoreSettings.from_config(f"nosuchproto://user:{SECRET}@host/x"))
    assert SECRET not in str(info.value)
