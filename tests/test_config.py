from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jsonschema
import pytest
import yaml

import dask

import storage_scheduler
from storage_scheduler import StorageConfigError, StoreSettings
from storage_scheduler.config import default_store_url

HERE = pathlib.Path(storage_scheduler.__file__).parent


def test_defaults_loaded() -> None:
    # From the registered defaults, as a fresh process sees them (gen_cluster tests run
    # earlier in this process replace the global config with their own copy).
    dask.config.refresh()
    assert dask.config.get("storage-scheduler.max-concurrency") == 16
    assert dask.config.get("storage-scheduler.url") is None


def test_default_store_is_persistent_directory() -> None:
    settings = StoreSettings.from_config()
    assert settings.url == default_store_url()
    assert settings.url.startswith("file://")
    assert "dask-storage-scheduler" in settings.url
    import tempfile

    assert not settings.url.startswith("file://" + tempfile.gettempdir())


def test_config_set_overrides() -> None:
    with dask.config.set(
        {"storage-scheduler.url": "memory://x", "storage-scheduler.retry.attempts": 2}
    ):
        s = StoreSettings.from_config()
    assert s.url == "memory://x" and s.retry.attempts == 2


def test_outage_window() -> None:
    assert StoreSettings.from_config().retry.outage_window == 60
    with dask.config.set({"storage-scheduler.retry.outage-window": "2m"}):
        assert StoreSettings.from_config().retry.outage_window == 120
    for bad in ("-1s", "soon"):
        with dask.config.set({"storage-scheduler.retry.outage-window": bad}):
            with pytest.raises(StorageConfigError, match="outage-window"):
                StoreSettings.from_config()
    assert StoreSettings.from_config("memory://y").url == "memory://y"


def test_environment_variable() -> None:
    env = {**os.environ, "DASK_STORAGE_SCHEDULER__URL": "s3://from-env/prefix"}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from storage_scheduler import StoreSettings; print(StoreSettings.from_config().url)",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "s3://from-env/prefix"


def test_schema() -> None:
    config = yaml.safe_load((HERE / "storage-scheduler.yaml").read_text())
    schema = yaml.safe_load((HERE / "storage-scheduler-schema.yaml").read_text())
    jsonschema.validate(config, schema)


def test_schema_is_complete() -> None:
    config = yaml.safe_load((HERE / "storage-scheduler.yaml").read_text())
    schema = yaml.safe_load((HERE / "storage-scheduler-schema.yaml").read_text())

    def check(c: dict, s: dict, path: str) -> None:
        props = s.get("properties", {})
        for k, v in c.items():
            assert k in props, f"{path}{k} is missing from the schema"
            assert "description" in props[k] or path == "", f"{path}{k} has no description"
            if isinstance(v, dict) and props[k].get("properties"):
                check(v, props[k], f"{path}{k}.")

    check(config, schema, "")


def test_flush_interval_must_be_positive() -> None:
    import pytest

    from storage_scheduler import SchedulerSettings, StorageConfigError

    with dask.config.set({"storage-scheduler.flush-interval": "0s"}):
        with pytest.raises(StorageConfigError, match="flush-interval must be positive"):
            SchedulerSettings.from_config()
    with dask.config.set({"storage-scheduler.lineage": "false"}):  # a string is not a bool
        with pytest.raises(StorageConfigError, match="lineage"):
            SchedulerSettings.from_config()
