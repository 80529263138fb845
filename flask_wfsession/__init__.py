"""Flask-SQLAlchemy sessions that are safe for slow work.

Anything not documented here is internal.
"""

from __future__ import annotations

from . import signals
from ._errors import (
    AttachedObjectError,
    BlockingDriverWarning,
    CrossThreadSessionError,
    DiscardedWritesWarning,
    DroppedCallbacksWarning,
    HeldConnectionWarning,
    IdleInTransactionWarning,
    NoAppContextError,
    PendingChangesError,
    PoolTimeoutError,
    SettingError,
    SetupError,
    StepGuardError,
    StepGuardWarning,
    UnitOfWorkError,
    WFSessionError,
    WFSessionWarning,
)
from ._extension import WFSession
from ._long_running import LongRunning, long_running
from ._session import Session
from ._transaction import Transaction

__all__ = [
    "AttachedObjectError",
    "BlockingDriverWarning",
    "CrossThreadSessionError",
    "DiscardedWritesWarning",
    "DroppedCallbacksWarning",
    "HeldConnectionWarning",
    "IdleInTransactionWarning",
    "LongRunning",
    "NoAppContextError",
    "PendingChangesError",
    "PoolTimeoutError",
    "Session",
    "SettingError",
    "SetupError",
    "StepGuardError",
    "StepGuardWarning",
    "Transaction",
    "UnitOfWorkError",
    "WFSession",
    "WFSessionError",
    "WFSessionWarning",
    "long_running",
    "signals",
]
