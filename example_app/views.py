"""HTTP endpoints: chat, streamed chat, workflows, background jobs, pool figures."""

from __future__ import annotations

import concurrent.futures
import json
import typing as t

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    render_template,
    request,
    stream_with_context,
)

from . import wfs
from .jobs import start_summary
from .llm import LLMClient
from .models import Conversation, Message, WorkflowRun
from .pool import pool_figures
from .repositories import SQLAlchemyRunRepository
from .workflow import Node, Workflow, WorkflowEngine

bp = Blueprint("chat", __name__)


def llm() -> LLMClient:
    return t.cast(LLMClient, current_app.extensions["example_llm"])


def conversation_or_404(conversation_id: int) -> Conversation:
    conversation = wfs.session.get(Conversation, conversation_id)
    if conversation is None:
        abort(404, f"no conversation {conversation_id}")
    return conversation


@bp.get("/")
def index() -> str:
    return render_template("index.html")


@bp.post("/api/conversations")
@wfs.transaction  # committed when the view returns, rolled back if it raises
def create_conversation() -> tuple[dict[str, t.Any], int]:
    conversation = Conversation(title=(request.get_json(silent=True) or {}).get("title", "chat"))
    wfs.session.add(conversation)
    wfs.session.flush()  # the id, before the commit
    return {"id": conversation.id, "title": conversation.title}, 201


def release_requested() -> bool:
    """The page's switch: may this request release its connection during the LLM call?

    ``?release=0`` serves the chat as a plain app would, ``?release=1`` with
    the release; without the parameter, ``RELEASE_DURING_LLM`` decides.
    """
    switch = request.args.get("release")
    if switch is None:
        return bool(current_app.config["RELEASE_DURING_LLM"])
    return switch != "0"


def prompt_for(conversation: Conversation) -> str:
    return "\n".join(f"{m.role}: {m.content}" for m in conversation.messages)


@bp.post("/api/conversations/<int:conversation_id>/chat")
def chat(conversation_id: int) -> dict[str, t.Any]:
    """Store the question, ask the LLM, store the answer: two units of work with
    the slow step between them, never inside one. (With the switch off, one
    unit around it all: :func:`chat_in_one_unit`.)"""
    message = request.get_json(force=True)["message"]
    if not release_requested():
        return chat_in_one_unit(conversation_id, message)
    with wfs.transaction():  # the question is kept even if the LLM fails
        conversation = conversation_or_404(conversation_id)
        conversation.messages.append(Message(role="user", content=message))
    # Reading the history opens a new transaction; a plain app would now hold
    # its connection through the whole LLM call.
    answer = llm().complete(prompt_for(conversation))  # a long-running step: released first
    with wfs.transaction():
        conversation.messages.append(Message(role="assistant", content=answer))
    return {"answer": answer, "messages": len(conversation.messages)}


@wfs.transaction
def chat_in_one_unit(conversation_id: int, message: str) -> dict[str, t.Any]:
    """The same chat as a plain app often writes it, for contrast: one unit of
    work with the LLM call inside it.

    The unit has written the question when the step starts, and a step never
    splits a unit: the connection is held through the call, and the extension
    reports it (a ``HeldConnectionWarning``: the default policy, ``"hold"``).
    """
    conversation = conversation_or_404(conversation_id)
    conversation.messages.append(Message(role="user", content=message))
    wfs.session.flush()  # the question is sent: the transaction has written
    answer = llm().complete(prompt_for(conversation))  # held through the call
    conversation.messages.append(Message(role="assistant", content=answer))
    return {"answer": answer, "messages": len(conversation.messages)}


def token_event(token: str) -> str:
    return f"data: {json.dumps({'token': token})}\n\n"


def done_event(answer: str) -> str:
    return f"event: done\ndata: {json.dumps({'answer': answer})}\n\n"


@bp.get("/api/conversations/<int:conversation_id>/stream")
def stream(conversation_id: int) -> Response:
    """Server-sent events: the answer's tokens as the LLM produces them.

    With the switch off, the body is :func:`events_in_one_unit`.
    """
    message = request.args["message"]
    if release_requested():
        with wfs.transaction():
            conversation = conversation_or_404(conversation_id)
            conversation.messages.append(Message(role="user", content=message))
        body = released_events(conversation_id, message)
    else:
        conversation_or_404(conversation_id)  # a 404 now, not inside the stream
        body = events_in_one_unit(conversation_id, message)
    return Response(stream_with_context(body), mimetype="text/event-stream")


def released_events(conversation_id: int, message: str) -> t.Iterator[str]:
    tokens = []
    for token in llm().stream(message):  # released before each token is awaited
        tokens.append(token)
        yield token_event(token)
    answer = "".join(tokens).strip()
    with wfs.detached() as session:  # a short transaction of its own
        session.add(Message(conversation_id=conversation_id, role="assistant", content=answer))
    yield done_event(answer)


def events_in_one_unit(conversation_id: int, message: str) -> t.Iterator[str]:
    """The switch off: question, tokens and answer in one unit of work, which
    holds its connection through every token, as in :func:`chat_in_one_unit`."""
    with wfs.transaction():  # opened inside: a generator cannot be a unit
        conversation = wfs.session.get_one(Conversation, conversation_id)
        conversation.messages.append(Message(role="user", content=message))
        wfs.session.flush()
        tokens = []
        for token in llm().stream(message):  # held while each token is awaited
            tokens.append(token)
            yield token_event(token)
        answer = "".join(tokens).strip()
        conversation.messages.append(Message(role="assistant", content=answer))
    yield done_event(answer)


@bp.post("/api/conversations/<int:conversation_id>/summary")
@wfs.transaction
def summarize(conversation_id: int) -> tuple[dict[str, t.Any], int]:
    """Start a background summary: Celery if configured, else a worker thread.

    The old summary is cleared in this unit, and the job starts once that is
    committed, so it can never read the row before the change.
    """
    conversation_or_404(conversation_id).summary = None
    wfs.on_commit(lambda: start_summary(conversation_id))
    return {"status": "started"}, 202


@bp.get("/api/conversations/<int:conversation_id>")
def show(conversation_id: int) -> dict[str, t.Any]:
    conversation = conversation_or_404(conversation_id)
    return {
        "id": conversation.id,
        "title": conversation.title,
        "summary": conversation.summary,
        "messages": [{"role": m.role, "content": m.content} for m in conversation.messages],
    }


def research_workflow(client: LLMClient) -> Workflow:
    """Two questions asked in parallel, then an answer that uses both."""
    return Workflow(
        "research",
        (
            Node("facts", lambda r: client.complete(f"facts about {r['topic']}")),
            Node("risks", lambda r: client.complete(f"risks of {r['topic']}")),
            Node(
                "answer",
                lambda r: client.complete(f"combine {r['facts']} and {r['risks']}"),
                after=("facts", "risks"),
            ),
        ),
    )


@bp.post("/api/workflows/research")
def run_workflow() -> dict[str, t.Any]:
    """Run a workflow; the engine gets repositories built on a session factory."""
    topic = request.get_json(force=True)["topic"]
    wfs.release()  # nothing of this request's session is needed while it runs
    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        engine = WorkflowEngine(SQLAlchemyRunRepository(wfs.sessionmaker), executor)
        run_id = engine.run(research_workflow(llm()), {"topic": topic})
    run = wfs.session.get_one(WorkflowRun, run_id)
    return {
        "run": run.id,
        "status": run.status,
        "results": {r.node: r.output for r in run.results},
    }


@bp.get("/api/pool")
def pool() -> dict[str, t.Any]:
    """Who holds the pool's connections now (``wfs.pool_status()``), and the LLM waits."""
    return pool_figures(current_app.extensions["example_llm_waits"])
