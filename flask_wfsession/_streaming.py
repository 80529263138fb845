"""Streamed responses: no connection held while the body is sent.

When a view returns a streamed response, the request's sessions are released
before the first chunk is produced, and again after each chunk, so work the
body does between chunks does not stay pinned while the client reads or the
next LLM token arrives. Closing the response (the client went away) closes
the body, which ends a ``stream_with_context`` context and so its sessions.
"""

from __future__ import annotations

import typing as t

from werkzeug.wrappers import Response


def releasing(release: t.Callable[[], object], chunks: t.Iterable[t.Any]) -> t.Iterator[t.Any]:
    """Yield ``chunks``, calling ``release`` after each; close ``chunks`` at the end."""
    try:
        for chunk in chunks:
            release()
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def wrap_streamed(response: Response, release: t.Callable[[], object]) -> Response:
    """Release now, and between the chunks of streamed ``response``."""
    release()
    response.response = releasing(release, response.response)
    return response
