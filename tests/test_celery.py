"""Celery: a real worker process on Redis, and eager mode."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import typing as t
import uuid
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa
from celery import Celery

from flask_wfsession import SetupError, signals

from .conftest import Setup, backend_fixture
from .models import Conversation, Message

# Also through PgBouncer in transaction mode.
backend = backend_fixture(pgbouncer=True)

ROOT = Path(__file__).parent.parent


def contents(setup: Setup) -> list[str]:
    with setup.wfs.detached(setup.app) as session:
        return sorted(session.scalars(sa.select(Message.content)))


def eager_celery(setup: Setup, name: str) -> Celery:
    """A Celery app that runs tasks in the caller's thread, connected to ``setup``."""
    celery_app = Celery(name, set_as_current=False)
    celery_app.conf.update(task_always_eager=True, task_eager_propagates=True)
    setup.wfs.init_celery(celery_app, setup.app)
    return celery_app


@pytest.fixture
def start_worker(
    setup: Setup, integration: str, backend: str, uri: str, monkeypatch: pytest.MonkeyPatch
) -> t.Iterator[t.Callable[..., ModuleType]]:
    """Start a Celery worker serving tests/celery_tasks.py on Redis; stop it at the end."""
    started: list[tuple[subprocess.Popen[bytes], ModuleType]] = []

    def start(pool: str, concurrency: int) -> ModuleType:
        env = {
            "WFS_TEST_INTEGRATION": integration,
            "WFS_TEST_BACKEND": backend,
            "WFS_TEST_URI": uri,
            "WFS_TEST_QUEUE": f"wfsession-tests-{uuid.uuid4().hex}",
            "WFS_TEST_MEETING": str(concurrency),
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        sys.modules.pop("tests.celery_tasks", None)
        tasks = importlib.import_module("tests.celery_tasks")
        command = [sys.executable, "-m", "celery", "-A", "tests.celery_tasks:celery_app"]
        command += ["worker", f"--pool={pool}", f"--concurrency={concurrency}"]
        command += ["--loglevel=WARNING", "--without-heartbeat", "--without-gossip"]
        command += ["--without-mingle"]
        started.append((subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}), tasks))
        return tasks

    yield start
    for process, tasks in started:
        process.terminate()
        process.wait(timeout=60)
        tasks.setup.engine.dispose()
    sys.modules.pop("tests.celery_tasks", None)


@pytest.fixture
def worker(start_worker: t.Callable[..., ModuleType]) -> ModuleType:
    """A prefork Celery worker (one child)."""
    return start_worker("prefork", 1)


def test_worker_runs_tasks_with_sessions_of_their_own(
    setup: Setup, conversation_id: int, worker: ModuleType
) -> None:
    # Held connections during the task's LLM step: none.
    assert worker.reply.delay(conversation_id).get(timeout=60) == 0
    with pytest.raises(RuntimeError, match="failed after writing"):
        worker.write_then_fail.delay(conversation_id).get(timeout=60)
    assert worker.retried.delay(conversation_id).get(timeout=60) == "done"
    status = worker.pool_status.delay().get(timeout=60)
    assert status["pid"] != os.getpid()
    assert status["checked out"] == 0  # nothing leaked between tasks
    # The failed task and the retried task's first attempt were rolled back.
    assert contents(setup) == ["attempt 1", "re: hello"]


def test_gevent_worker_runs_many_tasks_on_a_smaller_pool(
    setup: Setup, conversation_id: int, start_worker: t.Callable[..., ModuleType]
) -> None:
    """``-P gevent``: 12 tasks at once, each inside a long-running step, on a pool of 2.

    They can all be inside their steps at once only if each step returned its
    task's connection; each task has its own greenlet and session.
    """
    concurrency = 12
    pool = setup.engine.pool
    assert isinstance(pool, sa.pool.QueuePool) and pool.size() + pool._max_overflow < concurrency
    tasks = start_worker("gevent", concurrency)
    sent = [tasks.chat_in_step.delay(conversation_id, n) for n in range(concurrency)]
    results = [r.get(timeout=90) for r in sent]
    assert [r["held"] for r in results] == [0] * concurrency
    assert len({r["thread"] for r in results}) == concurrency
    assert len({r["session"] for r in results}) == concurrency
    assert tasks.pool_status.delay().get(timeout=60)["checked out"] == 0
    assert contents(setup) == sorted(f"chat {n}" for n in range(concurrency))


# The contrast waits for the worker inside the unit: idle in transaction.
@pytest.mark.filterwarnings("ignore::flask_wfsession.IdleInTransactionWarning")
def test_a_task_enqueued_on_commit_always_finds_its_row(
    setup: Setup, conversation_id: int, worker: ModuleType
) -> None:
    """The row is committed before the task is sent, every time. The contrast: a
    task sent inside the unit, and waited for there, runs before the commit."""
    wfs = setup.wfs
    sent: list[t.Any] = []
    for n in range(20):
        with setup.app.app_context(), wfs.transaction():
            message = Message(conversation_id=conversation_id, content=f"message {n}")
            wfs.session.add(message)
            wfs.session.flush()
            if n == 0:
                assert worker.find_message.delay(message.id).get(timeout=60) is None
            wfs.on_commit(
                lambda message_id=message.id: sent.append(worker.find_message.delay(message_id))
            )
    assert [r.get(timeout=60) for r in sent] == [f"message {n}" for n in range(20)]


def test_an_eager_task_runs_its_own_unit_not_the_callers(
    setup: Setup, conversation_id: int
) -> None:
    celery_app = eager_celery(setup, "eager-units")

    @celery_app.task
    @setup.wfs.transaction
    def write(conversation_id: int) -> None:
        setup.wfs.session.add(Message(conversation_id=conversation_id, content="the task's"))

    with setup.app.app_context(), pytest.raises(LookupError):
        with setup.wfs.transaction():
            setup.wfs.session.add(Message(conversation_id=conversation_id, content="lost"))
            write.delay(conversation_id)  # its own context, session and unit: committed
            raise LookupError
    assert contents(setup) == ["the task's"]


def test_eager_task_gets_a_session_separate_from_the_caller(
    setup: Setup, conversation_id: int
) -> None:
    celery_app = eager_celery(setup, "eager")

    @celery_app.task
    def write(conversation_id: int) -> int:
        session = setup.wfs.session
        session.add(Message(conversation_id=conversation_id, content="from the task"))
        session.commit()
        return id(session)

    @celery_app.task
    def fail(conversation_id: int) -> None:
        setup.wfs.session.add(Message(conversation_id=conversation_id, content="lost"))
        raise RuntimeError("eager failure")

    reports: list[dict[str, t.Any]] = []
    with (
        signals.session_discarded.connected_to(lambda app, **kw: reports.append(kw), setup.app),
        setup.app.app_context(),
    ):
        caller = setup.wfs.session
        caller.add(Conversation(title="the caller's, not committed"))
        assert write.delay(conversation_id).get() != id(caller)
        with pytest.raises(RuntimeError, match="eager failure"):
            fail.delay(conversation_id)
        assert setup.wfs.session is caller
        caller.rollback()
    assert contents(setup) == ["from the task"]
    assert [r["changes"] for r in reports] == [["new Message (not yet inserted)"]]


def test_init_celery_twice_is_refused(setup: Setup) -> None:
    celery_app = Celery("twice", set_as_current=False)
    setup.wfs.init_celery(celery_app, setup.app)
    with pytest.raises(SetupError, match="already called for the Celery app 'twice'"):
        setup.wfs.init_celery(celery_app, setup.app)
