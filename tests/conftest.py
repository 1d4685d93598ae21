"""Session-wide fixtures: a real PostgreSQL server on loopback for the multi-machine tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.pg_server import PostgresTestServer, start_postgres, unavailable_reason


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresTestServer]:
    """One server for the whole session, started on first use and stopped at the end.

    In CI (CI=true) it must start: a missing package or a failed start fails the tests that use
    it. Elsewhere a missing package skips them, naming what to install.
    """
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
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
