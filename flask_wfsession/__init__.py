"""Flask-SQLAlchemy sessions that are safe for slow work.

Anything not documented here is internal.
"""

from __future__ import annotations

from . import signals
from ._errors import (
    AttachedObjectError,
    CrossThreadSessionError,
    NoAppContextError,
    PendingChangesError,
    SetupError,
    StepGuardError,
    StepGuardWarning,
    WFSessionError,
)
from ._extension import WFSession
from ._long_running import LongRunning, long_running
from ._session import Session

__all__ = [
    "AttachedObjectError",
    "CrossThreadSessionError",
    "LongRunning",
    "NoAppContextError",
    "PendingChangesError",
    "Session",
    "SetupError",
    "StepGuardError",
    "StepGuardWarning",
    "WFSession",
    "WFSessionError",
    "long_running",
    "signals",
]
