"""Where in the user's code something happened, as ``"path/to/file.py:LINE"``.

Reports name the first frame that is not in this package, SQLAlchemy, Flask,
Werkzeug, blinker or the standard library's plumbing (``contextlib``,
``threading``, ``asyncio``...). Only one frame is looked at per level, and
only when a report is made: no traceback is ever built.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib.util
import os
import sys
import threading
import types
import typing as t

import blinker
import flask
import sqlalchemy
import werkzeug


def _where(module: t.Any) -> str:
    path = os.path.abspath(str(module.__file__))
    return os.path.dirname(path) + os.sep if path.endswith("__init__.py") else path


def _installed(name: str) -> tuple[str, ...]:
    """Where package ``name`` would be imported from, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        return ()
    return (_where(t.cast(t.Any, types.SimpleNamespace(__file__=spec.origin))),)


_PLUMBING = tuple(
    _where(m)
    for m in (
        sys.modules[__package__],
        sqlalchemy,
        flask,
        werkzeug,
        blinker,
        asyncio,
        concurrent.futures,
        contextlib,
        functools,
        threading,
    )
) + tuple(
    # Libraries an app calls the database through, or runs its code on.
    where
    for name in (
        "flask_sqlalchemy",
        "flask_sqlalchemy_lite",
        "asgiref",
        "gevent",
        "greenlet",
        "celery",
    )
    for where in _installed(name)
)


def _shown(path: str) -> str:
    cwd = os.getcwd() + os.sep
    return path[len(cwd) :] if path.startswith(cwd) else path


def user_frame(depth: int = 1) -> str | None:
    """The first frame above the caller that is the user's code, as ``file:line``."""
    frame: types.FrameType | None = sys._getframe(depth)
    while frame is not None:
        filename = frame.f_code.co_filename
        plumbing = _is_plumbing.get(filename)
        if plumbing is None:
            # "<...>": generated code (SQLAlchemy's wrappers, frozen modules).
            plumbing = _is_plumbing[filename] = filename.startswith((*_PLUMBING, "<"))
        if not plumbing:
            return f"{_shown(filename)}:{frame.f_lineno}"
        frame = frame.f_back
    return None


_is_plumbing: dict[str, bool] = {}
