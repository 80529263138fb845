"""Celery tasks for test_celery.py; the worker process imports this module.

The app is built the way the tests build theirs, from environment variables
the test sets for the worker.
"""

from __future__ import annotations

import os
import threading
import typing as t

from celery import Celery

from flask_wfsession import long_running

from .conftest import checked_out, make_app
from .models import Conversation, Message

BROKER = "redis://127.0.0.1:6379/15"
# Tasks of 'chat_in_step' that meet inside their steps (the worker's concurrency).
MEETING = int(os.environ.get("WFS_TEST_MEETING", "1"))

setup = make_app(
    os.environ["WFS_TEST_INTEGRATION"], os.environ["WFS_TEST_BACKEND"], os.environ["WFS_TEST_URI"]
)
celery_app = Celery("wfsession-tests", broker=BROKER, backend=BROKER)
celery_app.conf.task_default_queue = os.environ["WFS_TEST_QUEUE"]
celery_app.conf.broker_connection_retry_on_startup = True
setup.wfs.init_celery(celery_app, setup.app)


@celery_app.task
def reply(conversation_id: int) -> int:
    """Read, call the 'LLM', write; return the connections held during the call."""
    conversation = setup.wfs.session.get_one(Conversation, conversation_id)
    with long_running("llm"):
        held = checked_out(setup.engine)
    setup.wfs.session.add(
        Message(conversation_id=conversation.id, content=f"re: {conversation.title}")
    )
    setup.wfs.session.commit()
    return held


@celery_app.task
def write_then_fail(conversation_id: int) -> None:
    setup.wfs.session.add(Message(conversation_id=conversation_id, content="from a failed task"))
    setup.wfs.session.flush()
    raise RuntimeError("the task failed after writing")


@celery_app.task(bind=True, max_retries=1)
def retried(self: t.Any, conversation_id: int) -> str:
    attempt = self.request.retries
    setup.wfs.session.add(Message(conversation_id=conversation_id, content=f"attempt {attempt}"))
    setup.wfs.session.flush()
    if attempt == 0:
        raise self.retry(countdown=0)
    setup.wfs.session.commit()
    return "done"


@celery_app.task
def pool_status() -> dict[str, int]:
    return {"checked out": checked_out(setup.engine), "pid": os.getpid()}


# Made after the worker's gevent patching (celery patches before importing
# this module), so a greenlet waiting here lets the others run.
_meeting = threading.Barrier(MEETING, timeout=30)


@celery_app.task
def chat_in_step(conversation_id: int, n: int) -> dict[str, t.Any]:
    """Read, wait inside a step until every task of the meeting is inside its own, write.

    :return: the task's thread (greenlet) and session, and the connections
        checked out while all the tasks were inside their steps.
    """
    session = setup.wfs.session
    conversation = session.get_one(Conversation, conversation_id)
    with long_running("llm"):
        _meeting.wait()  # all inside their steps...
        held = checked_out(setup.engine)
        _meeting.wait()  # ...until all have looked
    session.add(Message(conversation_id=conversation.id, content=f"chat {n}"))
    session.commit()
    return {"thread": threading.get_ident(), "session": id(session), "held": held}


@celery_app.task
def find_message(message_id: int) -> str | None:
    """What a task started for a new row sees of it: its content, or None."""
    message = setup.wfs.session.get(Message, message_id)
    return None if message is None else message.content
