"""Through PgBouncer in transaction mode: many app processes, a small server pool.

gunicorn (gthread, ``WORKERS`` workers of ``THREADS`` threads) serves
:mod:`tests.fault_app` through PgBouncer (127.0.0.1:6432, started by
``.ci/services``), each worker with its own pool of ``POOL_SIZE``: together
they open more connections to PgBouncer than PgBouncer may open to
PostgreSQL for the database (``default_pool_size``). The checks ask
PostgreSQL directly (``pg_stat_activity``; PgBouncer sets each client's
``application_name`` on the server connection it lends it) and PgBouncer's
admin console (``SHOW POOLS``, ``SHOW STATS``, ``SHOW SERVERS``).
"""

from __future__ import annotations

import os
import threading
import time
import typing as t
import uuid
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from .conftest import SERVERS
from .fault_app import FaultRow
from .served import THREADS, Client, Reply, Server, fault_tables, scalar, together

URL = SERVERS["pgbouncer"]
DIRECT = SERVERS["postgresql"]
DATABASE = sa.make_url(URL).database
CONSOLE = "host=127.0.0.1 port=6432 user=postgres dbname=pgbouncer"
WORKERS, POOL_SIZE = 3, 8
STEP = 0.4  # seconds: the slow step, and the early path's pause with its write open
# psycopg's prepared statements off, as transaction pooling needs; "5" shows why.
PREPARE = os.environ.get("FAULT_PREPARE_THRESHOLD", "none")


def drive(port: int, clients: int, per_client: int, query: str = "") -> list[Reply]:
    """``clients`` keep-alive clients at once, each inserting ``per_client`` fresh keys."""
    replies: list[Reply] = []
    lock = threading.Lock()

    def client() -> None:
        conn = Client(port)
        for _ in range(per_client):
            key = uuid.uuid4().hex
            reply = conn.request("POST", f"/insert/{key}{query}")
            reply.data.setdefault("key", key)
            with lock:
                replies.append(reply)
        conn.close()

    together(*(threading.Thread(target=client) for _ in range(clients)))
    return replies


def console(conn: psycopg.Connection[t.Any], command: str) -> list[dict[str, t.Any]]:
    """A ``SHOW`` command on PgBouncer's admin console, as dicts."""
    cursor = conn.execute(command)
    names = [column.name for column in cursor.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def ours(rows: list[dict[str, t.Any]]) -> dict[str, t.Any]:
    """The row of the tests' database (and user ``postgres``), zeros if PgBouncer has none."""
    for row in rows:
        if row["database"] == DATABASE and row.get("user", "postgres") == "postgres":
            return row
    return {"database": DATABASE}


@pytest.fixture(scope="module")
def direct() -> t.Iterator[sa.Engine]:
    """PostgreSQL itself, not through PgBouncer: the table, and what the server sees."""
    with fault_tables(DIRECT) as engine:
        yield engine


@pytest.fixture
def admin() -> t.Iterator[psycopg.Connection[t.Any]]:
    """PgBouncer's admin console (simple queries only, no transactions)."""
    with psycopg.connect(CONSOLE, autocommit=True, prepare_threshold=None) as conn:
        yield conn


@pytest.fixture
def serve(tmp_path: Path, request: pytest.FixtureRequest) -> t.Iterator[t.Callable[..., Server]]:
    servers: list[Server] = []

    def start(**env: str) -> Server:
        name = f"wfs-pgbouncer-{os.getpid()}-{request.node.name}"[:63]
        server = Server(
            tmp_path / f"gunicorn{len(servers)}.log", name, url=URL, workers=WORKERS, **env
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def scalar_row(engine: sa.Engine, sql: str, **params: t.Any) -> tuple[t.Any, ...]:
    with engine.connect() as conn:
        return tuple(conn.execute(sa.text(sql), params).one())


def committed(engine: sa.Engine, keys: list[str]) -> int:
    return int(
        scalar(
            engine,
            f"SELECT count(*) FROM {FaultRow.__tablename__} WHERE key = ANY(:keys)",
            keys=keys,
        )
    )


IDLE_IN_TRANSACTION = (
    "SELECT count(*), coalesce(max(extract(epoch FROM now() - state_change)), 0)"
    " FROM pg_stat_activity WHERE application_name = :name"
    " AND state LIKE 'idle in transaction%'"
)


def server_pids(admin: psycopg.Connection[t.Any]) -> list[int]:
    """The PostgreSQL backends of PgBouncer's server connections for the database."""
    servers = console(admin, "SHOW SERVERS")
    return [int(s["remote_pid"]) for s in servers if s["database"] == DATABASE]


class Watch:
    """Polls PostgreSQL and PgBouncer every 20 ms while the load runs."""

    def __init__(self, direct: sa.Engine, name: str) -> None:
        self.longest_idle_in_transaction = 0.0
        self.most_waiting = self.most_servers = self.most_clients = 0
        self._stop = threading.Event()

        def poll() -> None:
            console_args = {"autocommit": True, "prepare_threshold": None}
            with direct.connect() as conn, psycopg.connect(CONSOLE, **console_args) as admin:
                while not self._stop.wait(0.02):
                    _, longest = conn.execute(sa.text(IDLE_IN_TRANSACTION), {"name": name}).one()
                    conn.rollback()
                    self.longest_idle_in_transaction = max(
                        self.longest_idle_in_transaction, float(longest)
                    )
                    pool = ours(console(admin, "SHOW POOLS"))
                    servers = sum(v for k, v in pool.items() if k.startswith("sv_"))
                    clients = pool.get("cl_active", 0) + pool.get("cl_waiting", 0)
                    self.most_waiting = max(self.most_waiting, pool.get("cl_waiting", 0))
                    self.most_servers = max(self.most_servers, servers)
                    self.most_clients = max(self.most_clients, clients)

        self._thread = threading.Thread(target=poll)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def test_workers_share_a_smaller_server_pool(
    serve: t.Callable[..., Server], direct: sa.Engine, admin: psycopg.Connection[t.Any]
) -> None:
    """48 concurrent chats on 3 workers (pools of 8) through 10 server connections.

    First the chat path: read, a ``@long_running`` step, write and commit; the
    release ends the read's transaction before the step, so no server
    connection sits in a transaction through it. Then writes held open across
    a pause (``?early=1``): more transactions than server connections, so
    clients queue in PgBouncer, and still none fails.
    """
    server_pool = int(
        next(r["value"] for r in console(admin, "SHOW CONFIG") if r["key"] == "default_pool_size")
    )
    assert server_pool < WORKERS * POOL_SIZE, "the server pool must be the smaller one"
    server = serve(pool_size=str(POOL_SIZE), step=str(STEP), prepare_threshold=PREPARE)
    # PgBouncer's total_wait_time: microseconds its clients waited for a server connection.
    start = ours(console(admin, "SHOW STATS"))["total_wait_time"]

    watch = Watch(direct, server.app_name)
    try:
        chats = drive(server.port, clients=WORKERS * THREADS, per_client=4)
        chats_idle = watch.longest_idle_in_transaction
        after_chats = ours(console(admin, "SHOW STATS"))["total_wait_time"]
        held = drive(server.port, clients=WORKERS * 8, per_client=3, query="?early=1")
    finally:
        watch.stop()
    end = ours(console(admin, "SHOW STATS"))["total_wait_time"]
    chats_waited, held_waited = int(after_chats - start) / 1e6, int(end - after_chats) / 1e6
    replies = chats + held
    keys = [r.data["key"] for r in replies]
    rows = committed(direct, keys)
    # Every reply is in: no transaction of the app may still be open anywhere.
    idle, _ = scalar_row(direct, IDLE_IN_TRANSACTION, name=server.app_name)
    pool = ours(console(admin, "SHOW POOLS"))
    failed = [r for r in replies if r.status != 200]
    workers = {r.data.get("pid") for r in replies if r.status == 200}
    print(
        f"\npgbouncer: {len(replies)} requests ({len(chats)} chats, {len(held)} held writes)"
        f" from {WORKERS} workers x pool {POOL_SIZE} on a server pool of {server_pool}:"
        f" {len(failed)} failed, {rows} rows committed; served by {len(workers)} workers;"
        f" PgBouncer saw at most {watch.most_clients} clients and {watch.most_servers}"
        f" servers, at most {watch.most_waiting} clients waiting; clients waited"
        f" {chats_waited:.2f} s in all during the chats, {held_waited:.2f} s during the held"
        f" writes; longest idle in transaction {chats_idle:.3f} s during the chats,"
        f" {watch.longest_idle_in_transaction:.3f} s overall; at the end idle in transaction"
        f" {idle}, sv_active {pool.get('sv_active')}, cl_waiting {pool.get('cl_waiting')}"
    )
    assert not failed, f"{len(failed)} of {len(replies)} requests failed: {failed[:3]}"
    assert rows == len(replies)
    # The app wanted more server connections than PgBouncer had: clients waited.
    assert held_waited > 0
    assert watch.most_servers <= server_pool
    # The chats' transactions ended before the step: none spanned it.
    assert chats_idle < STEP / 2, f"a server connection sat in a transaction for {chats_idle} s"
    assert idle == 0
    assert pool.get("sv_active", 0) == 0 and pool.get("cl_waiting", 0) == 0


def test_terminated_idle_server_connections_never_reach_the_app(
    serve: t.Callable[..., Server], direct: sa.Engine, admin: psycopg.Connection[t.Any]
) -> None:
    """pg_terminate_backend on every server connection while the app is idle.

    PgBouncer notices and opens new ones; the app's own connections (to
    PgBouncer) stay up, so no request fails, even without ``pool_pre_ping``
    (directly on PostgreSQL the first request after such a kill fails
    without it: ``docs/reliability.md``).
    """
    server = serve(pool_size=str(POOL_SIZE), step="0", prepare_threshold=PREPARE, pre_ping="0")
    warm = drive(server.port, clients=WORKERS * THREADS, per_client=2)
    assert [r.status for r in warm] == [200] * len(warm)
    pids = server_pids(admin)
    terminated = scalar(
        direct,
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
        " FROM unnest(CAST(:pids AS int[])) AS pid",
        pids=pids,
    )
    # The backends exit a moment after the signal; wait until PgBouncer saw each go.
    deadline = time.monotonic() + 5
    while set(pids) & set(server_pids(admin)) and time.monotonic() < deadline:
        time.sleep(0.02)
    left = set(pids) & set(server_pids(admin))
    after = drive(server.port, clients=WORKERS * THREADS, per_client=2)
    failed = [r for r in after if r.status != 200]
    print(
        f"\npgbouncer idle kill: terminated {terminated} of {len(pids)} server connections"
        f" ({len(left)} still listed by PgBouncer);"
        f" {len(failed)} of {len(after)} requests failed afterwards (pool_pre_ping off)"
    )
    assert terminated == len(pids) > 0 and not left
    assert not failed, failed[:3]
    assert committed(direct, [r.data["key"] for r in warm + after]) == len(warm + after)
