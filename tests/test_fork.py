"""Fork safety: a child process never reuses the parent's pooled connections."""

from __future__ import annotations

import multiprocessing
import typing as t

import pytest
import sqlalchemy as sa

from .conftest import Setup

CONNECTION_ID = {
    "postgresql": "SELECT pg_backend_pid()",
    "mysql": "SELECT CONNECTION_ID()",
    "sqlite": "SELECT 1",
}


# Python 3.12+ warns that forking a process with threads may deadlock.
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_child_uses_new_connections_and_parent_keeps_its_own(setup: Setup, backend: str) -> None:
    query = sa.text(CONNECTION_ID[backend])
    pool = t.cast(sa.pool.QueuePool, setup.engine.pool)
    with setup.app.app_context():
        parent_connection = setup.wfs.session.scalar(query)
    assert pool.checkedin() == 1  # the parent's connection waits in the pool

    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def child() -> None:
        try:
            inherited = t.cast(sa.pool.QueuePool, setup.engine.pool).checkedin()
            with setup.app.app_context():
                sender.send({"inherited": inherited, "connection": setup.wfs.session.scalar(query)})
        except BaseException as e:
            sender.send({"error": repr(e)})

    process = context.Process(target=child)
    process.start()
    result = receiver.recv()
    process.join()
    assert "error" not in result, result
    assert result["inherited"] == 0
    if backend != "sqlite":
        assert result["connection"] != parent_connection
    with setup.app.app_context():
        assert setup.wfs.session.scalar(query) == parent_connection
