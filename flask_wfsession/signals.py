"""Signals sent by flask-wfsession and by :func:`~flask_wfsession.long_running`.

The extension and :func:`~flask_wfsession.long_running` always send the
Flask application itself (the real object, never the ``current_app`` proxy)
as sender. Connect a receiver for one app with
``signal.connect(receiver, sender=app)``; in tests, connect it for the
duration of a ``with`` block with
``signal.connected_to(receiver, sender=app)``.

The extension releases sessions in a receiver of :data:`long_running_started`,
so code that only *sends* these signals (an HTTP client hook, a workflow
engine) gets the release without importing the extension. Such code may
pass the real app or ``current_app`` (the proxy) as sender: the extension's
receivers accept both. A receiver connected with ``sender=app`` sees only
the real app. Send :data:`long_running_finished` in a ``finally`` block, so
it is sent whenever :data:`long_running_started` was.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

long_running_started = _signals.signal("long-running-started")
"""Sent before a long-running step runs.

:param step: the step's name.
:param pending: the pending-writes policy asked for (``"hold"``,
    ``"raise"``, ``"commit"`` or ``"rollback"``), or ``None`` for the app's
    :confval:`WFSESSION_PENDING`.

The extension's receiver releases the sessions here, and raises
:class:`~flask_wfsession.PendingChangesError` when a session may not be
released, or :class:`~flask_wfsession.SettingError` for an unknown
``pending``. A receiver that raises fails this step only: the step does not
run, :data:`long_running_finished` is still sent (with the exception), and
the thread's step state is restored, so later steps and requests work.
"""

long_running_finished = _signals.signal("long-running-finished")
"""Sent after a long-running step's body ended, successfully or not.

Sent whenever :data:`long_running_started` was sent for the step, even if a
receiver of that signal raised.

:param step: the step's name.
:param duration: seconds the body ran, as a ``float``.
:param exception: the exception the body (or a receiver of
    :data:`long_running_started`) raised, or ``None``.

A receiver that raises fails this step only: the step raises that error,
and the thread's step state is restored.
"""

session_released = _signals.signal("session-released")
"""Sent for each session with an open transaction that a release looked at:
before a long-running step, for :meth:`~flask_wfsession.WFSession.release`,
or around a streamed response.

Sent after every session is in its final state.

:param session: the :class:`~sqlalchemy.orm.Session`.
:param step: the step's name, or ``None`` for
    :meth:`~flask_wfsession.WFSession.release` and streamed responses.
:param action: what was done: ``"released"`` (the transaction only read; it
    ended and the connection went back to the pool), ``"committed"`` or
    ``"rolled-back"`` (by the ``"commit"`` or ``"rollback"`` policy, or
    rolled back because the connection died), or ``"held"`` (the session
    kept its transaction and connection through the step).

A receiver that raises fails this step only (or this ``release()`` call):
the step does not run; the sessions are already released or held.
"""

idle_in_transaction = _signals.signal("idle-in-transaction")
"""Sent when a connection sat in an open transaction, with no statement
running and outside any long-running step, for longer than
:confval:`WFSESSION_IDLE_WARNING` seconds. Sent once per gap, when the next
statement or commit starts (or the app context ends).

:param duration: the idle seconds, as a ``float``.
:param endpoint: the view endpoint, Celery task name or thread name.
:param began_at: where the transaction began, ``"path/to/file.py:LINE"``.
:param idle_from: where the last statement before the gap was run.
:param idle_until: where the statement or commit after it was run.

Call sites are the first frame in the application's code. A receiver that
raises is logged; the request goes on.
"""

session_discarded = _signals.signal("session-discarded")
"""Sent when uncommitted writes of a session are rolled back.

This happens when a scoped session is torn down with writes that were never
committed, when the ``"rollback"`` policy discards them before a step, and
when the connection died with writes already sent.

:param session: the :class:`~sqlalchemy.orm.Session`.
:param changes: a list of strings describing what was discarded.
:param reason: why, for example ``"app context teardown"``,
    ``"released for the long-running step 'llm'"`` or
    ``"connection lost before the long-running step 'llm'"``.

A receiver that raises at teardown is logged on the ``flask_wfsession``
logger, not raised: the session is closed anyway. A receiver that raises
during a release fails that step only.
"""

unit_committed = _signals.signal("unit-committed")
"""Sent when an outermost unit of work (:meth:`~flask_wfsession.WFSession.transaction`)
ended without an exception: its transaction is committed, or it wrote nothing
and needed no commit. Sent after its ``on_commit`` callbacks ran.

:param name: the unit's name: the decorated function's qualified name, the
    ``name=`` given, or ``"with wfs.transaction()"``.
:param duration: seconds from the unit's start to the end of its commit, as
    a ``float``.

A receiver that raises is logged; the commit stands and the unit returns.
"""

unit_rolled_back = _signals.signal("unit-rolled-back")
"""Sent when an outermost unit of work was rolled back: its body raised, a
part of it failed, or its commit failed. Its ``on_commit`` callbacks were
dropped.

:param name: the unit's name, as for :data:`unit_committed`.
:param duration: seconds from the unit's start to the end of its rollback.

A receiver that raises is logged; the unit's own exception propagates.
"""
