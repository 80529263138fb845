from __future__ import annotations

import gc
import logging

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_wfsession import NoAppContextError, WFSession, signals

from .conftest import Setup, checked_out
from .models import Conversation


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
    reports = []
    with signals.session_discarded.connected_to(lambda app, **kw: reports.append(kw), app):
        with app.app_context():
            wfs.session.add(Conversation(title="forgotten"))
        with app.app_context():
            wfs.session.add(Conversation(title="flushed"))
            wfs.session.flush()
        with app.app_context():
            wfs.session.execute(sa.text("DELETE FROM wfs_test_conversation"))
    assert [r["reason"] for r in reports] == ["app context teardown"] * 3
    assert "new Conversation (not yet inserted)" in reports[0]["changes"]
    assert reports[1]["changes"][0].startswith("flushed, not committed: new Conversation")
    assert reports[2]["changes"][0].startswith("sent, not committed: DELETE FROM")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert "Discarded uncommitted writes" in warnings[0].getMessage()
    with wfs.detached(app) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Conversation)) == 0


def test_read_only_teardown_is_silent(app: Flask, wfs: WFSession) -> None:
    reports: list[object] = []
    receiver = signals.session_discarded.connected_to(lambda app, **kw: reports.append(kw), app)
    with receiver, app.app_context():
        wfs.session.scalars(sa.select(Conversation)).all()
        wfs.session.execute(sa.text("SELECT 1"))
    assert reports == []
