"""Background jobs: Celery when a broker is configured, a worker thread otherwise."""

from __future__ import annotations

import threading
import typing as t

from flask import Flask, current_app

from . import wfs
from .models import Conversation

if t.TYPE_CHECKING:
    from .llm import LLMClient


def summarize(conversation_id: int) -> str:
    """Summarise a conversation. Gets an id, never an object: it runs elsewhere."""
    conversation = wfs.session.get_one(Conversation, conversation_id)
    transcript = "\n".join(f"{m.role}: {m.content}" for m in conversation.messages)
    llm: LLMClient = current_app.extensions["example_llm"]
    summary = llm.complete(f"Summarise this conversation:\n{transcript}")  # releases first
    with wfs.transaction():
        conversation.summary = summary
    return summary


class Job(t.Protocol):
    def wait(self, timeout: float | None = None) -> None: ...


class _ThreadJob:
    def __init__(self, thread: threading.Thread) -> None:
        self._thread = thread

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


class _CeleryJob:
    def __init__(self, result: t.Any) -> None:
        self._result = result

    def wait(self, timeout: float | None = None) -> None:
        self._result.get(timeout=timeout)


def init_jobs(app: Flask) -> None:
    """Set up Celery if ``CELERY_BROKER_URL`` is configured."""
    broker = app.config.get("CELERY_BROKER_URL")
    if not broker:
        return
    from celery import Celery

    celery = Celery(app.import_name, broker=broker, backend=app.config.get("CELERY_RESULT_BACKEND"))
    celery.conf.update(app.config.get("CELERY", {}))
    wfs.init_celery(celery, app)
    app.extensions["example_celery"] = celery
    app.extensions["example_summarize_task"] = celery.task(name="example_app.summarize")(summarize)


def start_summary(conversation_id: int) -> Job:
    """Summarise in the background: a Celery task, or a thread from ``wfs.spawn``."""
    task = current_app.extensions.get("example_summarize_task")
    if task is not None:
        return _CeleryJob(task.delay(conversation_id))
    return _ThreadJob(wfs.spawn(summarize, conversation_id))
