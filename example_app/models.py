"""Conversations and their messages."""

from __future__ import annotations

import sqlalchemy as sa
import sqlalchemy.orm as orm


class Base(orm.DeclarativeBase):
    pass


class Conversation(Base):
    __tablename__ = "conversation"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    title: orm.Mapped[str] = orm.mapped_column(sa.String(200))
    messages: orm.Mapped[list[Message]] = orm.relationship(
        back_populates="conversation", order_by="Message.id"
    )


class Message(Base):
    __tablename__ = "message"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    conversation_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey(Conversation.id))
    role: orm.Mapped[str] = orm.mapped_column(sa.String(20))
    content: orm.Mapped[str] = orm.mapped_column(sa.Text)
    conversation: orm.Mapped[Conversation] = orm.relationship(back_populates="messages")
