"""Conversations, their messages, and workflow runs."""

from __future__ import annotations

import sqlalchemy as sa
import sqlalchemy.orm as orm


class Base(orm.DeclarativeBase):
    pass


class Conversation(Base):
    __tablename__ = "example_conversation"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    title: orm.Mapped[str] = orm.mapped_column(sa.String(200))
    summary: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    messages: orm.Mapped[list[Message]] = orm.relationship(
        back_populates="conversation", order_by="Message.id"
    )


class Message(Base):
    __tablename__ = "example_message"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    conversation_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey(Conversation.id))
    role: orm.Mapped[str] = orm.mapped_column(sa.String(20))
    content: orm.Mapped[str] = orm.mapped_column(sa.Text)
    conversation: orm.Mapped[Conversation] = orm.relationship(back_populates="messages")


class WorkflowRun(Base):
    __tablename__ = "example_workflow_run"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    workflow: orm.Mapped[str] = orm.mapped_column(sa.String(100))
    status: orm.Mapped[str] = orm.mapped_column(sa.String(20))
    results: orm.Mapped[list[NodeResult]] = orm.relationship(order_by="NodeResult.id")


class NodeResult(Base):
    __tablename__ = "example_node_result"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    run_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey(WorkflowRun.id))
    node: orm.Mapped[str] = orm.mapped_column(sa.String(100))
    output: orm.Mapped[str] = orm.mapped_column(sa.Text)
