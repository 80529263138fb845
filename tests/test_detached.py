from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_wfsession import WFSession

from .conftest import Setup, checked_out
from .models import Conversation


def titles(app: Flask, wfs: WFSession) -> list[str]:
    with wfs.detached(app) as session:
        return list(session.scalars(sa.select(Conversation.title).order_by(Conversation.id)))


def test_commits_on_success_and_closes(setup: Setup) -> None:
    with setup.wfs.detached(setup.app) as session:
        session.add(Conversation(title="saved"))
    assert checked_out(setup.engine) == 0
    assert titles(setup.app, setup.wfs) == ["saved"]


def test_rolls_back_when_the_block_raises(app: Flask, wfs: WFSession) -> None:
    with pytest.raises(LookupError), wfs.detached(app) as session:
        session.add(Conversation(title="lost"))
        session.flush()
        raise LookupError
    assert titles(app, wfs) == []


def test_loaded_values_readable_after_the_block(app: Flask, wfs: WFSession) -> None:
    with wfs.detached(app) as session:
        conversation = Conversation(title="fresh")
        session.add(conversation)
    assert conversation.title == "fresh"
    assert conversation.id is not None


def test_independent_of_the_scoped_session(app: Flask, wfs: WFSession) -> None:
    with app.app_context():
        wfs.session.add(Conversation(title="scoped, uncommitted"))
        with wfs.detached() as session:
            assert session is not wfs.session
            session.add(Conversation(title="detached"))
        wfs.session.rollback()
    assert titles(app, wfs) == ["detached"]


def test_sessionmaker_works_in_a_thread_without_context(app: Flask, wfs: WFSession) -> None:
    with app.app_context():
        factory = wfs.sessionmaker
    results: list[str] = []

    def repository_save() -> None:
        with factory() as session, session.begin():
            session.add(Conversation(title="from a thread"))
        with factory() as session:
            results.extend(session.scalars(sa.select(Conversation.title)))

    thread = threading.Thread(target=repository_save)
    thread.start()
    thread.join()
    assert results == ["from a thread"]
