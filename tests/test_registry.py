"""The registry of sessions holding a connection, per thread or greenlet."""

from __future__ import annotations

import sqlalchemy as sa
import sqlalchemy.orm as orm

from flask_wfsession import _registry

from .conftest import run_in_thread


def test_each_thread_sees_only_the_sessions_it_took_connections_in() -> None:
    engine = sa.create_engine("sqlite://")
    mine, theirs = orm.Session(engine), orm.Session(engine)
    _registry.add(mine)
    seen_there: list[list[orm.Session]] = []

    def other_thread() -> None:
        _registry.add(theirs)
        seen_there.append(_registry.in_this_thread())

    assert run_in_thread(other_thread) is None
    try:
        assert seen_there == [[theirs]]
        assert _registry.in_this_thread() == [mine]
        assert {s for s, _ in _registry.all_holding()} >= {mine, theirs}
        # Taken again here (a session handed over and re-entered): it moves.
        _registry.add(theirs)
        assert set(_registry.in_this_thread()) == {mine, theirs}
        _registry.discard(mine)
        assert _registry.in_this_thread() == [theirs]
    finally:
        _registry.discard(mine)
        _registry.discard(theirs)
    assert _registry.in_this_thread() == []
    assert not {mine, theirs} & {s for s, _ in _registry.all_holding()}
