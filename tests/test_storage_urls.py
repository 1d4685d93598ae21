"""Storage URLs: passwords masked however they are written, one-line errors for unreachable
storage, the gRPC proxy URL, workers racing to create the schema, and the worker liveness check."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from urllib.parse import unquote

import optuna
import pytest
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from ehrsr.cli import main
from ehrsr.search import storage as storage_module
from ehrsr.search.liveness import WorkerIdentity, current_worker, worker_gone
from ehrsr.search.storage import StorageError, mask_url, open_storage
from tests.cluster_helpers import MICRO, REPO

# (password as written in the URL, the secret a reader must not learn)
PASSWORDS = [
    ("SEC/RET", "SEC/RET"),  # '/': the old regex stopped here and printed 'SEC/RET@...'
    ("co:lo:n", "co:lo:n"),
    ("pct%2Fenc%40ded", "pct/enc@ded"),  # percent-encoded, as SQLAlchemy's docs advise
    ("p@55w0rd", "55w0rd"),  # a raw '@': SQLAlchemy reads 'p' and takes '55w0rd@host' for the host
    ("q?x=1&y", "q?x=1&y"),
]


@pytest.mark.parametrize(("written", "secret"), PASSWORDS)
def test_mask_url_hides_every_form_of_password(written: str, secret: str) -> None:
    url = f"postgresql://user:{written}@db.example:5432/study"
    masked = mask_url(url)
    assert masked == "postgresql://user:***@db.example:5432/study"
    for form in {written, unquote(written), secret}:
        assert form not in masked
    if "@" not in unquote(written) or "%40" in written:  # SQLAlchemy's own reading of the password ...
        assert make_url(url).password == unquote(written)  # ... is what was hidden
    # inside a message too, with what follows it kept
    assert mask_url(f"error: cannot open storage {url}: timeout") == f"error: cannot open storage {masked}: timeout"


def test_mask_url_leaves_urls_without_password_alone() -> None:
    for url in ("sqlite:////tmp/a@b/study.db", "postgresql://user@host/db", "grpc://10.0.0.1:13000",
                "journal:/tmp/x.journal", "no url here"):
        assert mask_url(url) == url
    assert mask_url("postgresql://u@h/db?password=zz&sslmode=require") == "postgresql://u@h/db?password=***&sslmode=require"


@pytest.mark.parametrize(("written", "secret"), PASSWORDS)
def test_unreachable_server_is_one_masked_line_and_exit_2(written: str, secret: str, tmp_path, capsys) -> None:
    url = f"postgresql://user:{written}@127.0.0.1:1/db"  # port 1: nothing listens, refused at once
    code = main(["--space", MICRO, "--storage", url, "--budget", "trials=1", "--out-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("error: cannot open storage postgresql://user:***@127.0.0.1:1/db")
    assert len(err.strip().splitlines()) == 1
    for form in {written, unquote(written), secret}:
        assert form not in out + err


def test_run_search_py_masks_a_slash_password_on_stderr(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(REPO / "run_search.py"), "--space", MICRO, "--storage",
                             "postgresql://user:SEC/RET@127.0.0.1:1/db", "--budget", "trials=1", "--out-dir",
                             str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "SEC/RET" not in result.stdout + result.stderr and "RET@" not in result.stderr
    assert "postgresql://user:***@127.0.0.1:1/db" in result.stderr


def test_grpc_urls(monkeypatch) -> None:
    with pytest.raises(StorageError, match="grpc://HOST:PORT"):
        open_storage("grpc://no-port-here")
    monkeypatch.setattr(storage_module, "PROXY_WAIT_SECONDS", 0.5)
    with pytest.raises(StorageError, match=r"no storage proxy answered.*storage-proxy"):
        open_storage("grpc://127.0.0.1:1")


def test_storage_proxy_refuses_a_journal_in_one_line(tmp_path, capsys) -> None:
    assert main(["storage-proxy", "--storage", f"journal:{tmp_path / 'x.journal'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: storage-proxy serves a database") and len(err.strip().splitlines()) == 1


def test_workers_racing_to_create_the_schema_open_it_again(monkeypatch) -> None:
    calls: list[str] = []

    def fake_rdb(url: str, **kwargs):
        calls.append(url)
        if len(calls) < 3:  # what PostgreSQL answers the losers of concurrent CREATE TABLEs
            raise sqlalchemy.exc.IntegrityError("CREATE TABLE studies", {}, Exception(
                'duplicate key value violates unique constraint "pg_type_typname_nsp_index"'))
        return "storage"

    monkeypatch.setattr(optuna.storages, "RDBStorage", fake_rdb)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    assert open_storage("postgresql://u@h/db") == "storage" and len(calls) == 3

    def other_error(url: str, **kwargs):
        raise sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("null value in column"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", other_error)
    with pytest.raises(StorageError, match="null value"):  # anything else is not retried
        open_storage("postgresql://u@h/db")


def test_worker_gone_only_when_provably_dead_on_this_host() -> None:
    me = current_worker()
    assert not worker_gone(me.to_dict())  # alive
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    import psutil

    recorded = WorkerIdentity(me.host, child.pid, psutil.Process(child.pid).create_time()).to_dict()
    assert not worker_gone(recorded)
    child.kill()
    deadline = time.monotonic() + 30
    while not worker_gone(recorded) and time.monotonic() < deadline:  # the kill lands asynchronously
        time.sleep(0.05)
    assert worker_gone(recorded)  # a zombie: dead, not yet reaped
    child.wait()
    assert worker_gone(recorded)  # reaped: the pid is free
    assert worker_gone({**me.to_dict(), "started": me.started - 100})  # the pid now belongs to another process
    assert not worker_gone({**recorded, "host": "other-node|boot|pid:[1]"})  # another machine: heartbeat only
    assert not worker_gone(None) and not worker_gone({"pid": "x"})


def test_a_storage_proxy_on_a_taken_port_is_one_line_and_leaves_nothing(tmp_path, capsys) -> None:
    import socket

    db = tmp_path / "proxy" / "study.db"
    db.parent.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["storage-proxy", "--storage", f"sqlite:///{db}", "--host", "127.0.0.1", "--port", str(port)])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.strip() == (f"error: storage-proxy cannot listen on 127.0.0.1:{port}: the port is taken or the "
                           "address is not this machine's")
    assert "listening" not in out
    assert list(db.parent.iterdir()) == []  # no empty SQLite file left behind
