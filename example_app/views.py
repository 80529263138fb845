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


@bp.post("/api/conversations/<int:conversation_id>/chat")
def chat(conversation_id: int) -> dict[str, t.Any]:
    """Store the question, ask the LLM, store the answer: two units of work with
    the slow step between them, never inside one."""
    message = request.get_json(force=True)["message"]
    with wfs.transaction():  # the question is kept even if the LLM fails
        conversation = conversation_or_404(conversation_id)
        conversation.messages.append(Message(role="user", content=message))
    # Reading the history opens a new transaction; a plain app would now hold
    # its connection through the whole LLM call.
    prompt = "\n".join(f"{m.role}: {m.content}" for m in conversation.messages)
    answer = llm().complete(prompt)  # a long-running step: released first
    with wfs.transaction():
        conversation.messages.append(Message(role="assistant", content=answer))
    return {"answer": answer, "messages": len(conversation.messages)}


@bp.get("/api/conversations/<int:conversation_id>/stream")
def stream(conversation_id: int) -> Response:
    """Server-sent events: the answer's tokens as the LLM produces them."""
    message = request.args["message"]
    with wfs.transaction():
        conversation = conversation_or_404(conversation_id)
        conversation.messages.append(Message(role="user", content=message))

    @stream_with_context
    def events() -> t.Iterator[str]:
        tokens = []
        for token in llm().stream(message):  # released before each token is awaited
            tokens.append(token)
            yield f"data: {json.dumps({'token': token})}\n\n"
        with wfs.detached() as session:  # a short transaction of its own
            answer = Message(conversation_id=conversation_id, role="assistant")
            answer.content = "".join(tokens).strip()
            session.add(answer)
        yield f"event: done\ndata: {json.dumps({'answer': answer.content})}\n\n"

    return Response(events(), mimetype="text/event-stream")


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
