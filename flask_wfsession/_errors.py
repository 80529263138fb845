"""The exceptions flask-wfsession raises, one class per kind of misuse."""

from __future__ import annotations


class WFSessionError(Exception):
    """Base class of every error raised by flask-wfsession."""


class SetupError(WFSessionError, RuntimeError):
    """The extension is not set up for this app, or set up twice or wrongly."""


class NoAppContextError(WFSessionError, RuntimeError):
    """The scoped session was asked for outside an application context."""


class PendingChangesError(WFSessionError, RuntimeError):
    """A session holds uncommitted writes when its transaction must end.

    Raised before a long-running step starts, so the step never runs with
    writes that would otherwise be committed or dropped without anyone saying
    so.
    """


class StepGuardError(WFSessionError, RuntimeError):
    """A released session was used while a long-running step's body runs."""


class StepGuardWarning(UserWarning):
    """Issued instead of :class:`StepGuardError` when ``WFSESSION_GUARD`` is ``"warn"``."""


class CrossThreadSessionError(WFSessionError, RuntimeError):
    """A session ran SQL from a thread (or greenlet) other than its own."""


class AttachedObjectError(WFSessionError, TypeError):
    """An ORM object still attached to a session was handed to a worker."""
