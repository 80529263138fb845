"""HTTP endpoints: scoped mode in views, detached mode for an audit write."""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
from flask import Blueprint, request

from . import wfs
from .models import Conversation, Message

bp = Blueprint("chat", __name__)


@bp.post("/conversations")
def create_conversation() -> tuple[dict[str, t.Any], int]:
    conversation = Conversation(title=request.json["title"] if request.json else "untitled")
    wfs.session.add(conversation)
    wfs.session.commit()
    return {"id": conversation.id, "title": conversation.title}, 201


@bp.post("/conversations/<int:conversation_id>/messages")
def post_message(conversation_id: int) -> dict[str, t.Any]:
    conversation = wfs.session.get_one(Conversation, conversation_id)
    content = request.json["content"] if request.json else ""
    # The read above holds a pooled connection. A detached session needs a
    # second one: under load, every request would hold one and wait for
    # another. Release the first (the conversation stays readable) ...
    wfs.release()
    # ... then write in a detached session: its own short transaction,
    # committed at the end of the block.
    with wfs.detached() as session:
        session.add(Message(conversation_id=conversation.id, role="user", content=content))
    count = wfs.session.scalar(
        sa.select(sa.func.count()).where(Message.conversation_id == conversation_id)
    )
    return {"conversation": conversation.title, "messages": count}
