"""Faults under a real gunicorn: raising receivers, killed backends, abandoned streams.

Each test starts gunicorn (gthread, one worker, 16 threads) serving
:mod:`tests.fault_app` on a free loopback port, with an ``application_name``
of its own, and drives it over HTTP. PostgreSQL only: the faults and the
checks need ``pg_terminate_backend`` and ``pg_stat_activity``. Figures and the
reasoning are in ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import struct
import threading
import time
import typing as t
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa

from .conftest import SERVERS
from .fault_app import RAISE_IN_DISCARDED, RAISE_IN_STARTED, FaultRow
from .served import THREADS, Client, Reply, Server, concurrently, fault_tables, scalar, together

URL = SERVERS["postgresql"]
TABLE = FaultRow.__tablename__
PRE_PING = os.environ.get("FAULT_PRE_PING", "1")  # "0" shows why it is recommended


def idle_in_transaction(engine: sa.Engine, app_name: str) -> int:
    return int(
        scalar(
            engine,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"
            " AND state LIKE 'idle in transaction%'",
            name=app_name,
        )
    )


def idle_seconds(engine: sa.Engine, app_name: str) -> float:
    """How long the app's longest-idle transaction has been idle (0 if none is)."""
    return float(
        scalar(
            engine,
            "SELECT coalesce(max(extract(epoch FROM now() - state_change)), 0)"
            " FROM pg_stat_activity WHERE application_name = :name"
            " AND state LIKE 'idle in transaction%'",
            name=app_name,
        )
    )


@contextlib.contextmanager
def longest_idle(engine: sa.Engine, app_name: str) -> t.Iterator[list[float]]:
    """While the block runs, poll every 20 ms for the app's longest idle transaction.

    Yields a one-item list holding the longest idle time seen, in seconds.
    """
    longest = [0.0]
    stop = threading.Event()

    def monitor() -> None:
        while not stop.wait(0.02):
            longest[0] = max(longest[0], idle_seconds(engine, app_name))

    watcher = threading.Thread(target=monitor)
    watcher.start()
    try:
        yield longest
    finally:
        stop.set()
        watcher.join()


@pytest.fixture(scope="module")
def engine() -> t.Iterator[sa.Engine]:
    with fault_tables(URL) as engine:
        yield engine


@pytest.fixture
def serve(
    tmp_path: Path, request: pytest.FixtureRequest, engine: sa.Engine
) -> t.Iterator[t.Callable[..., Server]]:
    """Start gunicorn with ``FAULT_*`` settings; stop it (and check its worker) at the end."""
    servers: list[Server] = []

    def start(**env: str) -> Server:
        name = f"wfs-faults-{os.getpid()}-{request.node.name}"[:63]
        server = Server(tmp_path / f"gunicorn{len(servers)}.log", name, url=URL, **env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        # The same worker all along: a restarted worker would hide a leak.
        pid = server.pool()["pid"]
        server.stop()
        assert pid == server.pid, f"the worker was replaced:\n{server.log_tail()}"


def test_raising_step_receiver_fails_only_its_requests(serve: t.Callable[..., Server]) -> None:
    """A receiver of long_running_started raises: only those requests fail.

    The receiver runs after the extension's own one (which marks the thread
    as inside a step), so the mark is set when it raises; the guard is in
    "raise" mode, so a thread left marked would fail every later request.
    """
    server = serve()
    assert server.pool()["started_receiver_last"]
    warm = concurrently(server.port, [("POST", "/step", {})] * 32)
    assert [r.status for r in warm] == [200] * 32

    fault = {"X-Fault": RAISE_IN_STARTED}
    failed = concurrently(server.port, [("POST", "/step", fault)] * 32)
    assert {(r.status, r.data.get("error")) for r in failed} == {(500, "InjectedFault")}
    assert server.pool()["stats"]["started_raised"] == 32
    marked = {r.data["thread"] for r in failed}

    # Every thread that served a failing request must serve ordinary ones.
    afterwards: list[Reply] = []
    for _ in range(20):
        afterwards += concurrently(server.port, [("POST", "/step", {}), ("GET", "/read", {})] * 16)
        if marked <= {r.data.get("thread") for r in afterwards}:
            break
    bad = [r for r in afterwards if r.status != 200]
    served_again = marked & {r.data.get("thread") for r in afterwards if r.status == 200}
    left = server.wait_pool(lambda p: p["checkedout"] == 0, 3)["checkedout"]
    print(
        f"\nraising step receiver: {len(failed)} faulted requests (500) on {len(marked)}"
        f" threads, then {len(afterwards)} ordinary requests: {len(bad)} failed,"
        f" {len(served_again)} of the {len(marked)} threads served them; checked out {left}"
    )
    assert not bad, f"{len(bad)} of {len(afterwards)} later requests failed: {bad[:3]}"
    assert served_again == marked
    assert left == 0


def test_raising_discarded_receiver_still_closes_session(
    serve: t.Callable[..., Server], engine: sa.Engine
) -> None:
    """A receiver of session_discarded raises at teardown: the session is closed anyway."""
    server = serve(pool_size="2")
    keys = [uuid.uuid4().hex for _ in range(16)]
    fault = {"X-Fault": RAISE_IN_DISCARDED}
    replies = concurrently(server.port, [("POST", f"/discard/{key}", fault) for key in keys])
    state = server.wait_pool(lambda p: p["stats"].get("discarded_raised") == len(keys), 3)
    idle = idle_in_transaction(engine, server.app_name)
    present = scalar(engine, f"SELECT count(*) FROM {TABLE} WHERE key = ANY(:keys)", keys=keys)
    # A pool of 2 with a leaked connection would time out (3 s) on most of these.
    reads = concurrently(server.port, [("GET", "/read", {})] * 64)
    left = server.pool()["checkedout"]
    print(
        f"\nraising discarded receiver: {len(keys)} requests, receiver raised"
        f" {state['stats'].get('discarded_raised')} times, {sum(r.status != 200 for r in replies)}"
        f" failed; then checked out {state['checkedout']}, idle in transaction {idle}, rows"
        f" left {present}; {len(reads)} reads on the pool of 2:"
        f" {sum(r.status != 200 for r in reads)} failed; checked out {left}"
    )
    # The receiver's error is logged, not raised: the request is over.
    assert [r.status for r in replies] == [200] * len(keys)
    assert state["stats"].get("discarded_raised") == len(keys)
    assert state["checkedout"] == 0
    assert idle == 0
    assert present == 0
    assert [r.status for r in reads] == [200] * len(reads)
    assert left == 0


@dataclass
class Kill:
    started: float
    ended: float
    terminated: int


@dataclass
class Load:
    replies: list[Reply] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def successes_since(self, moment: float) -> int:
        with self.lock:
            return sum(1 for r in self.replies if r.status == 200 and r.started > moment)


def terminate_busy_backends(engine: sa.Engine, app_name: str) -> Kill:
    """Once one of the app's backends is inside a transaction, terminate them all."""
    busy = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"
        " AND state LIKE 'idle in transaction%'"
    )
    deadline = time.monotonic() + 5
    while not scalar(engine, busy, name=app_name) and time.monotonic() < deadline:
        pass  # each poll is a round trip to the server
    return terminate_backends(engine, app_name)


def terminate_backends(engine: sa.Engine, app_name: str) -> Kill:
    """Terminate all the app's backends; return when they are gone."""
    deadline = time.monotonic() + 5
    started = time.monotonic()
    pids = scalar(
        engine,
        "SELECT coalesce(array_agg(pid) FILTER (WHERE pg_terminate_backend(pid)), '{}')"
        " FROM pg_stat_activity WHERE application_name = :name",
        name=app_name,
    )
    # The backends exit a moment after the signal: the kill ends when all are gone.
    gone = "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = ANY(:pids))"
    while not scalar(engine, gone, pids=pids) and time.monotonic() < deadline:
        pass
    return Kill(started, time.monotonic(), len(pids))


def test_terminated_backends_fail_only_in_flight_requests(
    serve: t.Callable[..., Server], engine: sa.Engine
) -> None:
    """pg_terminate_backend of all the app's backends, three times, under load."""
    server = serve(pool_size="4", pre_ping=PRE_PING)
    load = Load()
    stop = threading.Event()

    def client(n: int) -> None:
        connection = Client(server.port)
        while not stop.is_set():
            key = uuid.uuid4().hex
            path = f"/insert/{key}" + ("?early=1" if n % 2 else "")
            reply = connection.request("POST", path)
            reply.key = key
            with load.lock:
                load.replies.append(reply)
        connection.close()

    clients = [threading.Thread(target=client, args=(n,)) for n in range(THREADS)]
    for thread in clients:
        thread.start()
    kills: list[Kill] = []
    try:
        deadline = time.monotonic() + 15
        while load.successes_since(0) < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(3):
            kills.append(terminate_busy_backends(engine, server.app_name))
            # Requests that start after the kill must get through again.
            while load.successes_since(kills[-1].ended) < 50 and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        stop.set()
        for thread in clients:
            thread.join()

    replies = load.replies
    failed = [r for r in replies if r.status != 200]
    in_flight = [
        r for r in failed if any(r.started < k.ended and r.ended > k.started for k in kills)
    ]
    beyond = [r for r in failed if r not in in_flight]
    acknowledged = [r.key for r in replies if r.status == 200]
    present = set(
        scalar(
            engine,
            f"SELECT coalesce(array_agg(key), '{{}}') FROM {TABLE} WHERE key = ANY(:keys)",
            keys=acknowledged,
        )
    )
    missing = [key for key in acknowledged if key not in present]
    after_last = [r for r in replies if r.started > kills[-1].ended]
    errors = sorted({str(r.data.get("error")) for r in failed})
    print(
        f"\nkills under load: requests {len(replies)}, failed {len(failed)} (in flight"
        f" {len(in_flight)}, beyond {len(beyond)}: {errors}), terminated"
        f" {[k.terminated for k in kills]}, acknowledged {len(acknowledged)},"
        f" missing {len(missing)}"
    )
    assert all(k.terminated for k in kills), kills
    assert not beyond, f"{len(beyond)} requests failed outside the kills: {beyond[:3]}"
    assert len(failed) <= sum(k.terminated for k in kills)
    assert not missing, f"{len(missing)} acknowledged rows are missing"
    assert sum(1 for r in after_last if r.status == 200) >= 50
    assert server.wait_pool(lambda p: p["checkedout"] == 0, 3)["checkedout"] == 0
    assert idle_in_transaction(engine, server.app_name) == 0

    # Once more with the load stopped: every backend sits idle in the pool and no
    # request is in flight, so none may fail (pool_pre_ping replaces them).
    idle = terminate_backends(engine, server.app_name)
    calls = [("POST", f"/insert/{uuid.uuid4().hex}", {}) for _ in range(32)]
    quiet = concurrently(server.port, calls)
    print(f"idle kill: terminated {idle.terminated}, failed {sum(r.status != 200 for r in quiet)}")
    assert idle.terminated
    assert [r.status for r in quiet] == [200] * len(calls), [r.data for r in quiet]
    assert server.pool()["checkedout"] == 0


def test_connection_lost_under_a_handled_read(
    serve: t.Callable[..., Server], engine: sa.Engine
) -> None:
    """A backend dies under a read the view catches: the app's own answer reaches the client.

    The view answers 503 itself, or goes on to a long-running step that needs no
    database and answers 200. Neither the release before the step nor the
    teardown may fail on the session whose connection SQLAlchemy invalidated.
    """
    server = serve(pool_size="2")
    calls = [("POST", "/lose-connection", {}), ("POST", "/lose-connection?step=1", {})] * 8
    replies = concurrently(server.port, calls)
    left = server.wait_pool(lambda p: p["checkedout"] == 0, 3)["checkedout"]
    idle = idle_in_transaction(engine, server.app_name)
    reads = concurrently(server.port, [("GET", "/read", {})] * 32)
    got = [(r.status, r.data.get("error", r.data.get("answered"))) for r in replies]
    print(
        f"\nhandled lost connection: {len(calls)} requests, {got.count((503, 'OperationalError'))}"
        f" answered 503 by the view, {got.count((200, True))} answered 200 after the step,"
        f" {len(calls) - got.count((503, 'OperationalError')) - got.count((200, True))} other"
        f" (gunicorn's own 500 when the error escaped Flask); checked out {left}, idle in"
        f" transaction {idle}; {sum(r.status != 200 for r in reads)} of {len(reads)} reads failed"
    )
    assert left == 0
    assert idle == 0
    assert [r.status for r in reads] == [200] * len(reads)
    assert got == [(503, "OperationalError"), (200, True)] * 8, got


def open_and_abandon(port: int, path: str, reset: bool) -> bytes:
    """Read a stream's headers and first event, then go away (RST if ``reset``, else FIN)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        received = b""
        while b"data:" not in received.partition(b"\r\n\r\n")[2] and len(received) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return received


def test_abandoned_streams_return_their_connections(
    serve: t.Callable[..., Server], engine: sa.Engine
) -> None:
    """Clients disconnect after the first event of streamed responses."""
    tick = 0.4  # the server's wait between events
    server = serve(pool_size="2", tick=str(tick))
    with longest_idle(engine, server.app_name) as longest:
        paths = ["/sse/reads", "/sse/llm"] * 6
        heads: list[bytes] = [b""] * len(paths)

        def open_one(n: int) -> None:
            heads[n] = open_and_abandon(server.port, paths[n], reset=n % 4 < 2)

        together(*(threading.Thread(target=open_one, args=(n,)) for n in range(len(paths))))
        assert all(h.startswith(b"HTTP/1.1 200") and b"data:" in h for h in heads), heads
        state = server.wait_pool(lambda p: p["stats"].get("streams_abandoned", 0) == len(paths), 10)
    idle = idle_in_transaction(engine, server.app_name)
    after = concurrently(server.port, [("POST", "/step", {}), ("GET", "/read", {})] * 16)
    print(
        f"\nabandoned streams: {len(paths)} opened, {state['stats'].get('streams_abandoned')}"
        f" closed early, {state['stats'].get('streams_completed', 0)} completed; checked out"
        f" {state['checkedout']}, idle in transaction {idle}, longest idle in transaction"
        f" {longest[0]:.3f} s; {len(after)} requests afterwards:"
        f" {sum(r.status != 200 for r in after)} failed"
    )
    assert state["stats"].get("streams_abandoned", 0) == len(paths), state
    assert "streams_completed" not in state["stats"]
    assert state["checkedout"] == 0
    assert idle == 0
    # No connection sat in a transaction across a wait of the streams.
    assert longest[0] < tick / 2, f"a backend sat idle in a transaction for {longest[0]:.2f} s"
    assert [r.status for r in after] == [200] * len(after)


def read_stream(port: int, path: str) -> tuple[int, list[str]]:
    """A whole streamed response: its status and its events."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read().decode()
    except (OSError, http.client.HTTPException) as error:
        return 0, [repr(error)]
    finally:
        conn.close()
    return response.status, [e.removeprefix("data: ") for e in body.split("\n\n") if e]


BLOCKING = "psycopg was imported before gevent patched this process"


@pytest.mark.parametrize(
    ("worker_class", "preload", "wait_func"),
    [
        ("gthread", False, None),
        ("gevent", False, None),
        ("gevent", True, None),
        ("gevent", True, "wait_poll"),
    ],
)
def test_concurrent_streams_on_a_smaller_pool(
    serve: t.Callable[..., Server],
    engine: sa.Engine,
    worker_class: str,
    preload: bool,
    wait_func: str | None,
) -> None:
    """24 streamed chats at once on a pool of two: a read, then an LLM token, per chunk.

    Under gevent every stream is a greenlet of one thread; with ``--preload``
    the app (engine, pool, extension) is built before the worker forks and
    patches, and psycopg, imported before the patching, blocks the worker
    during each query unless told to wait through ``poll``: that is reported.
    The streams can only run side by side if each token's step returns the
    connection of the read before it.
    """
    tick, tokens, streams = 0.2, 5, 24
    environ = {"PSYCOPG_WAIT_FUNC": wait_func} if wait_func else {}
    server = serve(
        worker_class=worker_class,
        preload=preload,
        environ=environ,
        tick=str(tick),
        tokens=str(tokens),
    )
    results: list[tuple[int, list[str]]] = [(0, [])] * streams

    def reader(n: int) -> None:
        results[n] = read_stream(server.port, "/sse/llm")

    with longest_idle(engine, server.app_name) as longest:
        together(*(threading.Thread(target=reader, args=(n,)) for n in range(streams)))
    state = server.wait_pool(lambda p: p["checkedout"] == 0, 3)
    print(
        f"\n{worker_class}{' --preload' if preload else ''} {wait_func or ''}: {streams}"
        f" streams of {tokens} tokens on a pool of 2:"
        f" {sum(s == 200 for s, _ in results)} answered 200,"
        f" {state['stats'].get('streams_completed', 0)} completed; longest idle in"
        f" transaction {longest[0]:.3f} s; checked out after {state['checkedout']}"
    )
    for status, events in results:
        assert status == 200, events
        assert [e.split()[0] for e in events[1:]] == [f"token{n}" for n in range(tokens)]
    assert state["stats"].get("streams_completed") == streams
    assert state["checkedout"] == 0
    assert longest[0] < tick / 2, f"a backend sat idle in a transaction for {longest[0]:.2f} s"
    warned = BLOCKING in server.log.read_text(errors="replace")
    assert warned == (worker_class == "gevent" and preload and not wait_func)
    warned = BLOCKING in server.log.read_text(errors="replace")
    assert warned == (worker_class == "gevent" and preload and not wait_func)
