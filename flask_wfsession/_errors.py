"""The exceptions and warnings flask-wfsession raises, one class per kind of misuse."""

from __future__ import annotations

import typing as t

import sqlalchemy as sa


class WFSessionError(Exception):
    """Base class of every error raised by flask-wfsession."""


class SetupError(WFSessionError, RuntimeError):
    """The extension is not set up for this app, or set up twice or wrongly."""


class SettingError(SetupError, ValueError):
    """A policy or configuration value is not one of the values it accepts.

    Raised where the value is given: ``init_app`` for configuration keys,
    :func:`~flask_wfsession.long_running` and
    :meth:`~flask_wfsession.WFSession.release` for ``pending=``.
    """


class NoAppContextError(WFSessionError, RuntimeError):
    """The scoped session was asked for outside an application context."""


class PendingChangesError(WFSessionError, RuntimeError):
    """A session's uncommitted writes would be committed, dropped or split.

    Raised under the ``"raise"`` policy before a long-running step starts, so
    the step never runs; and under any policy when the database connection
    died with writes already sent in its transaction.
    """


class UnitOfWorkError(WFSessionError, RuntimeError):
    """A unit of work (:meth:`~flask_wfsession.WFSession.transaction`) would be split.

    Raised by a ``session.commit()``, ``rollback()`` or ``close()`` inside a
    unit, and when a unit ends that can no longer commit: a part of it
    raised, or its transaction was ended from inside it.
    """


class StepGuardError(WFSessionError, RuntimeError):
    """A session was used while a long-running step's body runs."""


class CrossThreadSessionError(WFSessionError, RuntimeError):
    """A session was used from a thread, greenlet or process other than its own."""


class AttachedObjectError(WFSessionError, TypeError):
    """An ORM object still attached to a session was handed to a worker."""


class PoolTimeoutError(WFSessionError, sa.exc.TimeoutError):
    """A pool checkout timed out; says who held every connection.

    A subclass of :class:`sqlalchemy.exc.TimeoutError`, so existing ``except``
    clauses keep working.

    :param holders: one record per checked-out connection, as in
        :meth:`~flask_wfsession.WFSession.pool_status`.
    """

    def __init__(self, message: str, holders: list[dict[str, t.Any]]) -> None:
        super().__init__(message)
        self.holders = holders


class WFSessionWarning(UserWarning):
    """Base class of the warnings flask-wfsession issues.

    They report what the extension did instead of failing a working app.
    ``filterwarnings = error`` (pytest) turns them into test failures.
    """


class StepGuardWarning(WFSessionWarning):
    """A session was used inside a long-running step.

    Issued when :confval:`WFSESSION_GUARD` is ``"warn"``, the default.
    """


class HeldConnectionWarning(WFSessionWarning):
    """A session kept its connection through a long-running step (``"hold"``)."""


class BlockingDriverWarning(WFSessionWarning):
    """The database driver blocks every greenlet while a query runs (gevent).

    psycopg 3 was imported before gevent's monkey-patching; see :doc:`/deployment`.
    """


class IdleInTransactionWarning(WFSessionWarning):
    """A connection sat in an open transaction, outside any step, for too long."""


class DroppedCallbacksWarning(WFSessionWarning):
    """``on_commit`` callbacks were dropped: their app context ended without a commit."""


class DiscardedWritesWarning(WFSessionWarning):
    """Uncommitted writes were rolled back: at teardown, by policy, or with a lost connection."""
