"""Session-wide set-up: in CI a missing optional package fails its tests instead of skipping
them, and a real PostgreSQL server on loopback serves the multi-machine tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.pg_server import PostgresTestServer, start_postgres, unavailable_reason


def in_ci() -> bool:
    """CI=true (or 1, yes): CI installs the test extra, so every optional package must be there."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def strict_importorskip(importorskip: Callable[..., Any]) -> Callable[..., Any]:
    """``pytest.importorskip`` that fails instead of skipping: a test skipped for a missing
    package would hide that the feature it checks was never tested."""

    def strict(modname: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return importorskip(modname, *args, **kwargs)
        except pytest.skip.Exception as exc:
            pytest.fail(f"{modname} is missing, but CI installs every optional package (the test extra): "
                        f"{exc.msg}", pytrace=False)

    return strict


def pytest_configure(config: pytest.Config) -> None:
    # test modules call pytest.importorskip through the module, at collection or inside a test:
    # replacing it here, before any test module is imported, covers both
    if in_ci():
        pytest.importorskip = strict_importorskip(pytest.importorskip)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresTestServer]:
    """One server for the whole session, started on first use and stopped at the end.

    In CI (CI=true) it must start: a missing package or a failed start fails the tests that use
    it. Elsewhere a missing package skips them, naming what to install.
    """
    reason = unavailable_reason()
    if reason is not None:
        if in_ci():
            pytest.fail(f"PostgreSQL tests cannot run in CI: {reason}")
        pytest.skip(f"no PostgreSQL server for this test: {reason}")
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server: PostgresTestServer, request: pytest.FixtureRequest) -> str:
    """A fresh database on the session's server, named after the test."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:50].lower()
    return postgres_server.new_database(name)
