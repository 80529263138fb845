"""gunicorn serving :mod:`tests.fault_app` on a free loopback port, and HTTP clients for it.

Shared by the suites that run the app under a real server: the fault suite
(``test_gunicorn_faults``) and PgBouncer's (``test_pgbouncer``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import typing as t
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
THREADS = 16  # gthread's threads per worker, and concurrent clients by default


@dataclass
class Reply:
    status: int  # 0: no HTTP response (connection failed)
    data: dict[str, t.Any]
    started: float
    ended: float
    key: str = ""


class Client:
    """One keep-alive HTTP connection to the server, reopened after a failure."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, headers: dict[str, str] | None = None) -> Reply:
        started = time.monotonic()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
            self.conn.request(method, path, headers=headers or {})
            response = self.conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as error:
            self.close()
            return Reply(0, {"error": repr(error)}, started, time.monotonic())
        if response.will_close:
            self.close()
        is_json = response.getheader("Content-Type", "").startswith("application/json")
        data = json.loads(body) if is_json else {"text": body.decode()}
        return Reply(response.status, data, started, time.monotonic())

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Server:
    """gunicorn serving tests.fault_app on a free loopback port.

    :param url: the database; ``env`` items become ``FAULT_*`` settings.
    :param worker_class: ``gthread`` (``THREADS`` threads) or ``gevent``.
    :param preload: ``--preload``: the app is built in the arbiter, before
        the worker forks (and, for gevent, before it patches).
    :param environ: more environment variables for gunicorn.
    """

    def __init__(
        self,
        log: Path,
        app_name: str,
        *,
        url: str,
        workers: int = 1,
        worker_class: str = "gthread",
        preload: bool = False,
        environ: t.Mapping[str, str] | None = None,
        **env: str,
    ) -> None:
        self.app_name = app_name
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        environ = {**os.environ, **(environ or {})}
        environ.update({"FAULT_DATABASE_URL": url, "FAULT_APP_NAME": app_name})
        environ.update({f"FAULT_{k.upper()}": v for k, v in env.items()})
        command = [sys.executable, "-m", "gunicorn", "-k", worker_class, "-w", str(workers)]
        if worker_class == "gthread":
            command += ["--threads", str(THREADS)]
        else:
            command += ["--worker-connections", "1000"]
        command += ["--preload"] if preload else []
        command += ["-b", f"127.0.0.1:{self.port}"]
        command += ["--keep-alive", "30", "--graceful-timeout", "5", "--log-level", "warning"]
        command += ["tests.fault_app:app_from_env()"]
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, env=environ, stderr=out)
        self.client = Client(self.port)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # startup poll, not synchronisation
            if self.process.poll() is not None:
                break
            if self.client.request("GET", "/health").status == 200:
                self.pid = self.pool()["pid"]
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not start:\n{self.log_tail()}")

    def pool(self) -> dict[str, t.Any]:
        reply = self.client.request("GET", "/pool")
        assert reply.status == 200, reply
        return reply.data

    def wait_pool(self, check: t.Callable[[dict[str, t.Any]], bool], seconds: float) -> dict:
        """Poll ``/pool`` until ``check`` holds (or the time is up); return the last answer."""
        deadline = time.monotonic() + seconds
        state = self.pool()
        while not check(state) and time.monotonic() < deadline:
            time.sleep(0.05)
            state = self.pool()
        return state

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def together(*threads: threading.Thread) -> None:
    """Start ``threads``, then wait for all of them."""
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@contextlib.contextmanager
def fault_tables(url: str) -> t.Iterator[sa.Engine]:
    """A pool-less engine on ``url`` with the fault app's tables, dropped afterwards."""
    from .fault_app import Base

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    try:
        yield engine
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()


def concurrently(port: int, calls: list[tuple[str, str, dict[str, str]]]) -> list[Reply]:
    """Send ``calls`` from ``THREADS`` keep-alive clients at once; replies in call order."""
    replies: list[Reply | None] = [None] * len(calls)
    next_call = iter(range(len(calls)))
    lock = threading.Lock()

    def client() -> None:
        connection = Client(port)
        while True:
            with lock:
                n = next(next_call, None)
            if n is None:
                break
            replies[n] = connection.request(*calls[n])
        connection.close()

    together(*(threading.Thread(target=client) for _ in range(THREADS)))
    return [r for r in replies if r is not None]


def scalar(engine: sa.Engine, sql: str, **params: t.Any) -> t.Any:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar()
