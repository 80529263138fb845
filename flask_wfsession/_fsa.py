"""The one module that knows about Flask-SQLAlchemy.

Adopting a ``db`` means: use its engines (binds included), and treat
``db.session`` as the scoped session, so code that already uses ``db.session``
gets releases, guards and reports without being rewritten.
"""

from __future__ import annotations

import sys
import typing as t
import weakref

import sqlalchemy as sa
import sqlalchemy.orm as orm

from . import _hooks
from ._errors import SetupError
from ._guard import claim

if t.TYPE_CHECKING:
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy


# The db.session objects whose sessions carry our hooks. Identity, not id():
# SQLAlchemy's event.contains() answers by id() and is fooled when a new
# target reuses the id of a collected one.
_hooked: weakref.WeakSet[orm.scoped_session[t.Any]] = weakref.WeakSet()


class FlaskSQLAlchemyScoped:
    """``db.session`` seen as a :class:`~flask_wfsession._scoped.ScopedSource`."""

    def __init__(self, scoped_session: orm.scoped_session[t.Any]) -> None:
        self._scoped = scoped_session

    def get(self) -> orm.Session:
        return t.cast(orm.Session, self._scoped())

    def peek(self) -> orm.Session | None:
        registry = self._scoped.registry  # one scope lookup, not has() then get()
        return t.cast("orm.Session | None", registry.registry.get(registry.scopefunc()))

    def close(self, session: orm.Session) -> None:
        # db's own teardown runs right after ours (init_app order is
        # enforced) and would remove it too, but only if nothing raised in
        # between. Closed once here; db's later remove() finds nothing.
        session.close()
        self._scoped.registry.clear()

    def adopt(self, session: orm.Session) -> bool:
        registry = self._scoped.registry
        if registry.has():
            return False
        registry.set(session)
        return True


def adopt(app: Flask, db: SQLAlchemy) -> tuple[dict[str | None, sa.Engine], FlaskSQLAlchemyScoped]:
    """Return ``db``'s engines for ``app`` and its session as a scoped source.

    :raise SetupError: ``db`` is not Flask-SQLAlchemy's, or ``db.init_app(app)``
        was not called first. It must come first so that ``db``'s teardown runs
        after ours, letting us report writes before ``db`` discards them.
    """
    flask_sqlalchemy = sys.modules.get("flask_sqlalchemy")  # imported if 'db' is one
    if flask_sqlalchemy is None or not isinstance(db, flask_sqlalchemy.SQLAlchemy):
        raise SetupError(
            f"'init_app(db=...)' adopts a Flask-SQLAlchemy 'SQLAlchemy' object, but got"
            f" {type(db).__module__}.{type(db).__qualname__}. For another extension"
            " (Flask-SQLAlchemy-Lite, say), pass its engine and use 'wfs.session':"
            " 'with app.app_context(): wfs.init_app(app, engine=db.engine)'."
        )
    if app.extensions.get("sqlalchemy") is not db:
        raise SetupError(
            "The Flask-SQLAlchemy 'db' passed to 'init_app' is not registered on this"
            " app. Call 'db.init_app(app)' before 'wfs.init_app(app, db=db)'."
        )
    with app.app_context():
        engines = dict(db.engines)
    if db.session not in _hooked:
        _hooks.install(db.session)
        _claim_when_made(db.session)
        _hooked.add(db.session)
    return engines, FlaskSQLAlchemyScoped(db.session)


def _claim_when_made(scoped_session: orm.scoped_session[t.Any]) -> None:
    """Make each ``db.session()`` belong to the app context it is made in.

    Flask-SQLAlchemy makes the session on first access, always inside its app
    context; claimed later, at its first SQL, it would belong to whichever
    thread got there first.
    """
    registry = scoped_session.registry
    create = registry.createfunc

    def create_and_claim() -> orm.Session:
        session = create()
        claim(session, scoped=True)
        return t.cast(orm.Session, session)

    registry.createfunc = create_and_claim
