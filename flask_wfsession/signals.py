"""Signals sent by flask-wfsession and by :func:`~flask_wfsession.long_running`.

Every signal's sender is the Flask application (the real object, never the
``current_app`` proxy). Connect with ``signal.connect(receiver, sender=app)``;
in tests, ``signal.connected_to(receiver)`` is handy.

The extension releases sessions in a receiver of :data:`long_running_started`,
so code that only *sends* these signals (an HTTP client hook, a workflow
engine) gets the release without importing the extension.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

long_running_started = _signals.signal("long-running-started")
"""Sent before a long-running step runs.

:param step: the step's name.
:param pending: the pending-writes policy asked for (``"raise"``,
    ``"commit"``, ``"rollback"``), or ``None`` for the app's default.

A receiver that raises stops the step before it starts.
"""

long_running_finished = _signals.signal("long-running-finished")
"""Sent after a long-running step's body ended, successfully or not.

:param step: the step's name.
:param duration: seconds the body ran, as a ``float``.
:param exception: the exception the body raised, or ``None``.
"""

session_released = _signals.signal("session-released")
"""Sent for each session whose transaction was ended to release its connection.

:param session: the :class:`~sqlalchemy.orm.Session`.
:param step: the step's name, or ``None`` for an explicit
    :meth:`~flask_wfsession.WFSession.release`.
:param action: ``"released"`` (nothing was pending), ``"committed"`` or
    ``"rolled-back"`` (pending writes, by policy).
"""

session_discarded = _signals.signal("session-discarded")
"""Sent when uncommitted writes of a session are thrown away.

This happens when a scoped session is torn down with writes that were never
committed, and when a step's ``pending="rollback"`` policy discards them.

:param session: the :class:`~sqlalchemy.orm.Session`.
:param changes: a list of strings describing what was discarded.
:param reason: why, for example ``"teardown"`` or ``"step 'llm'"``.
"""
