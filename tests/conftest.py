from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest

from tests.s3server import CREDENTIALS, MotoServer

# Every process the tests start (workers, the CLI) inherits these: moto accepts any
# credentials, and botocore must not go looking for real ones.
os.environ.setdefault("AWS_ACCESS_KEY_ID", CREDENTIALS["key"])
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", CREDENTIALS["secret"])
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

# Tests that care about durability choose it (parametrized over both modes); the others
# assume write-through (the default), where a finished task's result is already stored (a
# lane holds it as soon as the client has it). DASK_STORAGE_SCHEDULER__DURABILITY set in
# the environment wins: the suite can be run in write-behind to see what differs.
os.environ.setdefault("DASK_STORAGE_SCHEDULER__DURABILITY", "write-through")
if "dask.config" in sys.modules:  # read before this file set it: read the environment again
    import dask.config

    dask.config.refresh()

ENDPOINT_VAR = "STORAGE_SCHEDULER_TEST_S3_ENDPOINT"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server: ci/test.sh's if it started one, else our own."""
    endpoint = os.environ.get(ENDPOINT_VAR)
    if endpoint:
        yield endpoint
        return
    with MotoServer() as server:
        yield server.endpoint


def s3_options(endpoint: str) -> dict[str, Any]:
    return {"endpoint_url": endpoint, **CREDENTIALS}


def make_bucket(endpoint: str) -> str:
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_options(endpoint))
    fs.mkdir(bucket)
    return bucket


@pytest.fixture
def s3_store_url(s3_endpoint: str) -> tuple[str, dict[str, Any]]:
    """URL and storage options of an empty prefix in a fresh bucket."""
    return f"s3://{make_bucket(s3_endpoint)}/results", s3_options(s3_endpoint)


@pytest.fixture(params=["memory", "local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    """Each backend in turn: URL and storage options of an empty store."""
    if request.param == "memory":
        return f"memory://store-{uuid.uuid4().hex}", {}
    if request.param == "local":
        return f"file://{tmp_path}/store", {}
    return request.getfixturevalue("s3_store_url")  # type: ignore[no-any-return]


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    """A store that other processes can reach: a local directory, then S3 (moto)."""
    if request.param == "local":
        return f"file://{tmp_path}/store", {}
    return request.getfixturevalue("s3_store_url")  # type: ignore[no-any-return]
