"""Call sites in reports: the user's ``file:line``, from any thread."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import typing as t
from pathlib import Path

import pytest

from flask_wfsession import _callsite
from flask_wfsession._callsite import user_frame


def user_module(tmp_path: Path, source: str) -> dict[str, t.Any]:
    """Run ``source`` as a module of the user's that no report has seen yet."""
    filename = str(tmp_path / "user_code.py")
    namespace: dict[str, t.Any] = {"user_frame": user_frame}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


def test_names_the_first_frame_outside_the_plumbing(tmp_path: Path) -> None:
    """Frames of the standard library's plumbing (here ``contextlib``) are skipped."""
    module = user_module(
        tmp_path,
        "def where():\n"
        "    return user_frame()\n"
        "def through(manager):\n"
        "    with manager():\n"  # line 4: contextlib calls the generator below
        "        pass\n",
    )

    @contextlib.contextmanager
    def manager() -> t.Iterator[None]:
        seen.append(user_frame())  # this file is the user's too: the test is the caller
        yield

    seen: list[str | None] = []
    assert module["where"]().endswith("user_code.py:2")
    module["through"](manager)
    assert seen[0] is not None and seen[0].endswith("test_callsite.py:38")


def test_a_remembered_path_is_checked_against_the_frames(tmp_path: Path) -> None:
    """A path remembered for a key never names a frame that is not the caller's."""
    module = user_module(
        tmp_path,
        "def direct(key):\n"
        "    return user_frame(1, key)\n"  # line 2
        "def via(hook, key):\n"
        "    return hook(key)\n",  # line 4
    )
    key = object()

    def hook(key: object) -> str | None:  # plumbing: lives in the package's own module
        return user_frame(1, key)

    hook.__code__ = hook.__code__.replace(co_filename=_callsite.__file__)
    assert module["via"](hook, key).endswith("user_code.py:4")
    assert module["via"](hook, key).endswith("user_code.py:4")  # the remembered path
    # The same key from a caller one frame shallower: not the remembered path's line.
    assert module["direct"](key).endswith("user_code.py:2")


def test_a_file_first_seen_by_two_threads_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one thread records a new file of the user's, another asks about it.

    The second must get the call site, not a ``KeyError`` from a half-made
    cache entry (seen as a 500 under gunicorn: the telemetry of a statement
    failed the statement).
    """
    inside, go = threading.Event(), threading.Event()
    shown = _callsite._shown

    def slow_shown(path: str) -> str:
        if not inside.is_set():  # the first thread to record the file waits here
            inside.set()
            assert go.wait(10)
        return shown(path)

    monkeypatch.setattr(_callsite, "_shown", slow_shown)
    module = user_module(tmp_path, "def where():\n    return user_frame()\n")
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        first = executor.submit(module["where"])
        assert inside.wait(10)
        try:
            second = module["where"]()
        finally:
            go.set()
        assert first.result().endswith("user_code.py:2")
    assert second.endswith("user_code.py:2")
