"""Where in the user's code something happened, as ``"path/to/file.py:LINE"``.

Reports name the first frame that is not in this package, SQLAlchemy, Flask,
Werkzeug, blinker, a WSGI server or the standard library's plumbing
(``contextlib``, ``threading``, ``asyncio``...). No traceback is ever built.

Telemetry asks on every statement, so a caller may pass a ``key`` (its own
hook). Each path found from that hook is remembered as the number of frames
up to the user's frame and the code of the plumbing frame just below it (the
SQLAlchemy or Flask-SQLAlchemy function the user called). A remembered path
is taken when that same code sits at that depth and a user's frame above it:
two frames looked at instead of every frame of SQLAlchemy's call stack.
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
        "gunicorn",
        "waitress",
    )
    for where in _installed(name)
)


def _shown(path: str) -> str:
    cwd = os.getcwd() + os.sep
    return path[len(cwd) :] if path.startswith(cwd) else path


def _plumbing(filename: str) -> bool:
    plumbing = _is_plumbing.get(filename)
    if plumbing is None:
        # "<...>": generated code (SQLAlchemy's wrappers, frozen modules).
        plumbing = filename.startswith((*_PLUMBING, "<"))
        if not plumbing:
            # Before it is marked as the user's: other threads read it once it is.
            _shown_as[filename] = _shown(filename)
        _is_plumbing[filename] = plumbing
    return plumbing


def user_frame(depth: int = 1, key: object = None) -> str | None:
    """The first frame above the caller that is the user's code, as ``file:line``.

    :param depth: frames to skip above the caller first.
    :param key: the caller's hook, to remember the paths found (see above).
    """
    if key is not None:
        for steps, code in _paths.get(key, ()):
            try:
                under = sys._getframe(depth + steps)
            except ValueError:  # the stack is shallower here
                continue
            if under.f_code is code:
                frame = under.f_back
                if frame is not None and _is_plumbing.get(frame.f_code.co_filename) is False:
                    return f"{_shown_as[frame.f_code.co_filename]}:{frame.f_lineno}"
    found: types.FrameType | None = sys._getframe(depth)
    below: types.FrameType | None = None
    steps = -1
    while found is not None:
        filename = found.f_code.co_filename
        if not _plumbing(filename):
            if key is not None and below is not None:
                path = (steps, below.f_code)
                paths = _paths.get(key, ())
                if path not in paths:  # a new tuple: other threads may be reading the old one
                    _paths[key] = (path, *paths)[:_REMEMBERED]
            return f"{_shown_as[filename]}:{found.f_lineno}"
        below, found = found, found.f_back
        steps += 1
    return None


_REMEMBERED = 16  # paths per key: one per way into SQLAlchemy, in practice a few
_is_plumbing: dict[str, bool] = {}
_shown_as: dict[str, str] = {}  # the user's files, relative to the working directory
_paths: dict[object, tuple[tuple[int, types.CodeType], ...]] = {}
"""Per key: how many frames up the user's frame was found, and the code of the
plumbing frame just below it."""
