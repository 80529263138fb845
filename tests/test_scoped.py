from __future__ import annotations

import gc
import logging

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_wfsession import DiscardedWritesWarning, NoAppContextError, WFSession, signals

from .conftest import Setup, checked_out
from .models import Conversation

SENT = "writes already sent in the open transaction (the database says so)"


def test_one_session_per_context(app: Flask, wfs: WFSession) -> None:
    with app.app_context():
        first = wfs.session
        assert wfs.session is first
        with app.app_context():
            assert wfs.session is not first
        assert wfs.session is first


def test_closed_and_connection_returned_at_teardown(setup: Setup) -> None:
    with setup.app.app_context():
        setup.wfs.session.execute(sa.select(1))
        assert checked_out(setup.engine) == 1
    assert checked_out(setup.engine) == 0


def test_new_context_never_reuses_a_dead_contexts_session(app: Flask, wfs: WFSession) -> None:
    seen = []
    for _ in range(20):
        with app.app_context():
            seen.append(wfs.session)
        gc.collect()
    assert len({id(s) for s in seen}) == len(seen)


def test_outside_context_raises_and_points_to_detached(wfs: WFSession) -> None:
    with pytest.raises(NoAppContextError, match=r"'wfs\.session' needs an application context"):
        _ = wfs.session


def test_view_commits_are_kept(app: Flask, wfs: WFSession) -> None:
    @app.post("/")
    def create() -> str:
        wfs.session.add(Conversation(title="kept"))
        wfs.session.commit()
        return "ok"

    assert app.test_client().post("/").status_code == 200
    with wfs.detached(app) as session:
        assert session.scalars(sa.select(Conversation.title)).all() == ["kept"]


def test_uncommitted_writes_at_teardown_are_rolled_back_and_reported(
    app: Flask, wfs: WFSession, caplog: pytest.LogCaptureFixture
) -> None:
    with wfs.detached(app) as session:
        session.add(Conversation(title="kept"))
    reports = []
    with signals.session_discarded.connected_to(lambda app, **kw: reports.append(kw), app):
        with pytest.warns(DiscardedWritesWarning) as warned:
            with app.app_context():
                wfs.session.add(Conversation(title="forgotten"))
            with app.app_context():
                wfs.session.add(Conversation(title="flushed"))
                wfs.session.flush()
            with app.app_context():
                wfs.session.execute(sa.text("DELETE FROM wfs_test_conversation"))
            with app.app_context():  # a write hidden in a "select": only the database knows
                wfs.session.execute(
                    sa.text(
                        "INSERT INTO wfs_test_conversation (title) VALUES ('t') RETURNING id"
                    ).columns(id=sa.Integer)
                ).all()
    assert [r["reason"] for r in reports] == ["app context teardown"] * 4
    assert reports[0]["changes"] == ["new Conversation (not yet inserted)"]
    assert [r["changes"] for r in reports[1:]] == [[SENT]] * 3
    assert len(warned) == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4
    assert "Discarded uncommitted writes" in warnings[0].getMessage()
    with wfs.detached(app) as session:
        assert session.scalars(sa.select(Conversation.title)).all() == ["kept"]


def test_a_statement_that_wrote_nothing_is_not_reported(app: Flask, wfs: WFSession) -> None:
    with app.app_context():
        wfs.session.execute(sa.text("DELETE FROM wfs_test_conversation WHERE id = -1"))
        wfs.session.execute(sa.update(Conversation).where(Conversation.id == -1).values(title="x"))
    # filterwarnings = error: a DiscardedWritesWarning would fail this test.


def test_read_only_teardown_is_silent(app: Flask, wfs: WFSession) -> None:
    reports: list[object] = []
    receiver = signals.session_discarded.connected_to(lambda app, **kw: reports.append(kw), app)
    with receiver, app.app_context():
        wfs.session.scalars(sa.select(Conversation)).all()
        wfs.session.execute(sa.text("SELECT 1"))
    assert reports == []
