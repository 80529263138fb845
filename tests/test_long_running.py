"""Long-running steps: the connection goes back to the pool before slow work."""

from __future__ import annotations

import asyncio
import threading
import typing as t
from contextlib import nullcontext

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_wfsession import (
    DiscardedWritesWarning,
    HeldConnectionWarning,
    PendingChangesError,
    SettingError,
    WFSession,
    long_running,
    signals,
)

from .conftest import Setup, checked_out, idle_in_transaction
from .models import Conversation, Message


def count(setup: Setup, model: type[t.Any]) -> int:
    with setup.wfs.detached(setup.app) as session:
        return session.scalar(sa.select(sa.func.count()).select_from(model)) or 0


def test_no_connection_held_during_the_step(setup: Setup, backend: str, uri: str) -> None:
    seen: dict[str, int] = {}

    @long_running("llm")
    def ask_llm() -> None:
        seen["checked out"] = checked_out(setup.engine)
        if backend == "postgresql":
            seen["idle in transaction"] = idle_in_transaction(uri)

    with setup.app.app_context():
        setup.wfs.session.scalars(sa.select(Conversation)).all()
        assert checked_out(setup.engine) == 1
        ask_llm()
    assert seen["checked out"] == 0
    assert seen.get("idle in transaction", 0) == 0


def test_objects_stay_usable_after_the_step(setup: Setup, conversation_id: int) -> None:
    with setup.wfs.detached(setup.app) as session:
        session.add(Message(conversation_id=conversation_id, content="hi"))

    with setup.app.app_context():
        conversation = setup.wfs.session.get_one(Conversation, conversation_id)
        with long_running("llm"):
            assert checked_out(setup.engine) == 0
            assert conversation.title == "hello"  # loaded: no query, no guard
        assert [m.content for m in conversation.messages] == ["hi"]  # lazy load works
        assert setup.wfs.session.in_transaction()  # a new, short transaction


def test_expire_on_release_reloads_fresh(
    make: t.Callable[..., Setup], conversation_id: int
) -> None:
    setup = make(WFSESSION_EXPIRE_ON_RELEASE=True)
    with setup.app.app_context():
        conversation = setup.wfs.session.get_one(Conversation, conversation_id)
        with long_running("llm"):
            with setup.wfs.detached() as session:
                session.get_one(Conversation, conversation_id).title = "renamed"
        assert conversation.title == "renamed"


PENDING_WRITES: dict[str, t.Callable[[Setup, int], None]] = {
    "new": lambda s, cid: s.wfs.session.add(Conversation(title="new")),
    "changed": lambda s, cid: setattr(s.wfs.session.get_one(Conversation, cid), "title", "x"),
    "deleted": lambda s, cid: s.wfs.session.delete(s.wfs.session.get_one(Conversation, cid)),
    "flushed": lambda s, cid: (s.wfs.session.add(Conversation(title="f")), s.wfs.session.flush()),
    "raw SQL": lambda s, cid: s.wfs.session.execute(
        sa.text("UPDATE wfs_test_conversation SET title = 'raw'")
    ),
    "Core": lambda s, cid: s.wfs.session.execute(
        sa.insert(Conversation.__table__).values(title="core")  # type: ignore[arg-type]
    ),
}
SENT = "writes already sent in the open transaction (the database says so)"
DESCRIBED = {
    "new": "new Conversation (not yet inserted)",
    "changed": "changed Conversation",
    "deleted": "deleted Conversation",
    "flushed": SENT,
    "raw SQL": SENT,
    "Core": SENT,
}
UNFLUSHED = ("new", "changed", "deleted")


def titles(setup: Setup) -> list[str]:
    with setup.wfs.detached(setup.app) as session:
        return sorted(session.scalars(sa.select(Conversation.title)))


@pytest.mark.parametrize("write", PENDING_WRITES)
def test_pending_writes_are_held_or_kept_by_default(
    setup: Setup, conversation_id: int, write: str
) -> None:
    """The default changes nothing the app would see: the same rows at the end.

    Unflushed changes need no connection: they wait in the session and the
    connection goes back. Writes already sent keep theirs, reported.
    """
    with setup.app.app_context():
        PENDING_WRITES[write](setup, conversation_id)
        expected = titles_after_commit(setup, flush=write not in UNFLUSHED)
        held = []
        with pytest.warns(HeldConnectionWarning) if write not in UNFLUSHED else nullcontext():
            with long_running("llm"):
                held.append(checked_out(setup.engine))
        setup.wfs.session.commit()
    assert held == [0 if write in UNFLUSHED else 1]
    assert titles(setup) == expected


@pytest.mark.parametrize("write", PENDING_WRITES)
def test_pending_writes_raise_under_the_raise_policy(
    make: t.Callable[..., Setup], conversation_id: int, write: str
) -> None:
    setup = make(WFSESSION_PENDING="raise")
    ran = []
    with setup.app.app_context():
        PENDING_WRITES[write](setup, conversation_id)
        with pytest.raises(PendingChangesError) as info:
            long_running("llm")(ran.append)(1)
        setup.wfs.session.rollback()
    assert ran == []
    message = str(info.value)
    assert DESCRIBED[write] in message
    assert "long-running step 'llm'" in message
    assert "session.commit()" in message and 'pending="hold"' in message
    assert titles(setup) == ["hello"]


@pytest.mark.parametrize("write", PENDING_WRITES)
def test_pending_commit_policy_commits(setup: Setup, conversation_id: int, write: str) -> None:
    """Unflushed changes too: the expected rows are computed without flushing them."""
    with setup.app.app_context():
        PENDING_WRITES[write](setup, conversation_id)
        expected = titles_after_commit(setup, flush=write not in UNFLUSHED)
        assert bool(
            setup.wfs.session.new or setup.wfs.session.dirty or setup.wfs.session.deleted
        ) == (write in UNFLUSHED)
        with long_running("llm", pending="commit"):
            assert checked_out(setup.engine) == 0
        assert titles(setup) == expected  # committed before the step, not at teardown
    assert titles(setup) == expected


def titles_after_commit(setup: Setup, *, flush: bool = True) -> list[str]:
    """What the table will hold once the current scoped session commits.

    Without ``flush``, computed without sending anything: from the table as it
    is and the session's unflushed changes.
    """
    session = setup.wfs.session
    if flush:
        session.flush()
        return sorted(session.scalars(sa.select(Conversation.title)))
    with setup.wfs.detached() as other:
        rows = {c.id: c.title for c in other.scalars(sa.select(Conversation))}
    for obj in session.deleted:
        rows.pop(obj.id)
    for obj in session.dirty:
        rows[obj.id] = obj.title
    return sorted([*rows.values(), *(o.title for o in session.new)])


@pytest.mark.parametrize("write", PENDING_WRITES)
def test_pending_rollback_policy_discards_and_reports(
    setup: Setup, conversation_id: int, write: str
) -> None:
    reports: list[dict[str, t.Any]] = []
    with signals.session_discarded.connected_to(lambda app, **kw: reports.append(kw), setup.app):
        with setup.app.app_context(), pytest.warns(DiscardedWritesWarning):
            PENDING_WRITES[write](setup, conversation_id)
            with long_running("llm", pending="rollback"):
                assert checked_out(setup.engine) == 0
    assert titles(setup) == ["hello"]
    assert len(reports) == 1
    assert reports[0]["reason"] == "released for the long-running step 'llm'"
    assert any(DESCRIBED[write] in change for change in reports[0]["changes"])


def test_app_default_policy(make: t.Callable[..., Setup]) -> None:
    setup = make(WFSESSION_PENDING="commit")
    with setup.app.app_context():
        setup.wfs.session.add(Conversation(title="committed by policy"))
        with long_running("llm"):
            pass
    assert titles(setup) == ["committed by policy"]


@pytest.mark.parametrize("policy", ["Raise", "comit", "", 1])
def test_a_misspelled_policy_is_refused_where_it_is_given(setup: Setup, policy: t.Any) -> None:
    with pytest.raises(SettingError, match=r"long_running\(pending=...\) is .* 'hold', 'raise'"):
        long_running("llm", pending=policy)
    with setup.app.app_context():
        setup.wfs.session.add(Conversation(title="x"))
        with pytest.raises(SettingError, match=r"release\(pending=...\) is"):
            setup.wfs.release(pending=policy)
        with pytest.raises(SettingError, match="pending is"):
            signals.long_running_started.send(setup.app, step="by hand", pending=policy)
        assert setup.wfs.session.new  # nothing was committed or dropped
        setup.wfs.session.rollback()
    assert titles(setup) == []


def test_per_step_policy_overrides_app_default(make: t.Callable[..., Setup]) -> None:
    setup = make(WFSESSION_PENDING="commit")
    with setup.app.app_context():
        setup.wfs.session.add(Conversation(title="x"))
        with pytest.raises(PendingChangesError), long_running("llm", pending="raise"):
            pass
        setup.wfs.session.rollback()


def test_read_only_release_is_silent(setup: Setup) -> None:
    released: list[dict[str, t.Any]] = []
    discarded: list[object] = []
    with (
        signals.session_released.connected_to(lambda app, **kw: released.append(kw), setup.app),
        signals.session_discarded.connected_to(lambda app, **kw: discarded.append(kw)),
        setup.app.app_context(),
    ):
        setup.wfs.session.execute(sa.text("SELECT 1"))
        with long_running("llm"):
            pass
    assert [(r["step"], r["action"]) for r in released] == [("llm", "released")]
    assert discarded == []


def test_explicit_begin_block_is_held_whole(setup: Setup) -> None:
    with setup.app.app_context():
        with setup.wfs.session.begin():
            setup.wfs.session.execute(sa.select(Conversation))
            setup.wfs.session.add(Conversation(title="in the block"))
            with pytest.warns(HeldConnectionWarning, match=r"'session.begin\(\)'"):
                with long_running("llm"):
                    assert checked_out(setup.engine) == 1
        assert checked_out(setup.engine) == 0
    assert titles(setup) == ["in the block"]


def test_explicit_begin_block_is_refused_under_raise(make: t.Callable[..., Setup]) -> None:
    setup = make(WFSESSION_PENDING="raise")
    with setup.app.app_context():
        with setup.wfs.session.begin():
            with pytest.raises(PendingChangesError, match="End the block before the step starts"):
                with long_running("llm"):
                    pass
        assert checked_out(setup.engine) == 0


@pytest.mark.parametrize("policy", ["hold", "commit", "rollback"])
def test_open_savepoint_is_never_split(setup: Setup, policy: t.Any) -> None:
    with setup.app.app_context():
        setup.wfs.session.add(Conversation(title="outer"))
        with setup.wfs.session.begin_nested():
            setup.wfs.session.add(Conversation(title="inner"))
            with pytest.warns(HeldConnectionWarning, match=r"begin_nested\(\)"):
                with long_running("llm", pending=policy):
                    assert checked_out(setup.engine) == 1
        setup.wfs.session.rollback()
    assert titles(setup) == []


def test_detached_sessions_open_in_the_thread_are_released(setup: Setup) -> None:
    with setup.app.app_context(), setup.wfs.detached() as session:
        session.execute(sa.text("SELECT 1"))
        with long_running("llm"):
            assert checked_out(setup.engine) == 0


def test_signals_name_the_step_and_report_duration_and_exception(setup: Setup) -> None:
    events: list[tuple[str, dict[str, t.Any]]] = []
    with (
        signals.long_running_started.connected_to(
            lambda app, **kw: events.append(("started", kw)), setup.app
        ),
        signals.long_running_finished.connected_to(
            lambda app, **kw: events.append(("finished", kw)), setup.app
        ),
        setup.app.app_context(),
    ):
        with pytest.raises(TimeoutError), long_running("http"):
            raise TimeoutError
    assert [name for name, _ in events] == ["started", "finished"]
    assert events[0][1] == {"step": "http", "pending": None}
    assert events[1][1]["step"] == "http"
    assert isinstance(events[1][1]["exception"], TimeoutError)
    assert events[1][1]["duration"] >= 0


def test_sending_the_signals_by_hand_releases(setup: Setup) -> None:
    """An HTTP client hook can release sessions without importing the extension."""
    with setup.app.app_context():
        setup.wfs.session.execute(sa.text("SELECT 1"))
        signals.long_running_started.send(setup.app, step="hook")
        try:
            assert checked_out(setup.engine) == 0
        finally:
            signals.long_running_finished.send(setup.app, step="hook", duration=0.0, exception=None)


def test_nested_steps_release_once(setup: Setup) -> None:
    released: list[object] = []
    with (
        signals.session_released.connected_to(lambda app, **kw: released.append(kw), setup.app),
        setup.app.app_context(),
    ):
        setup.wfs.session.execute(sa.text("SELECT 1"))
        with long_running("outer"), long_running("inner"):
            assert checked_out(setup.engine) == 0
        setup.wfs.session.execute(sa.text("SELECT 1"))  # guard lifted after both
    assert len(released) == 1


def test_unnamed_steps_are_named_after_the_function(setup: Setup) -> None:
    steps: list[str] = []

    @long_running
    def summarize(text: str) -> str:
        return text.upper()

    @long_running()
    def translate(text: str) -> str:
        return text.lower()

    with (
        signals.long_running_started.connected_to(
            lambda app, **kw: steps.append(kw["step"]), setup.app
        ),
        setup.app.app_context(),
    ):
        assert summarize("hi") == "HI"
        assert translate("HI") == "hi"
        with long_running():
            pass
    assert steps == [summarize.__qualname__, translate.__qualname__, "long-running"]


def test_transparent_outside_an_app_context() -> None:
    @long_running("llm")
    def core_function(x: int) -> int:
        return x * 2

    assert core_function(21) == 42
    with long_running("http"):
        pass


def test_explicit_release(setup: Setup) -> None:
    with setup.app.app_context():
        setup.wfs.session.add(Conversation(title="kept"))
        with pytest.raises(PendingChangesError, match=r"before 'release\(\)'"):
            setup.wfs.release(pending="raise")
        released = setup.wfs.release(pending="commit")
        assert released == [setup.wfs.session]
        assert checked_out(setup.engine) == 0
        setup.wfs.session.execute(sa.text("SELECT 1"))  # no guard outside a step
    assert titles(setup) == ["kept"]


def test_generator_step_holds_no_connection_between_items(setup: Setup) -> None:
    @long_running("stream")
    def tokens() -> t.Iterator[str]:
        for token in ("a", "b", "c"):
            assert checked_out(setup.engine) == 0
            yield token

    with setup.app.app_context():
        out = []
        for token in tokens():
            # The caller queries between items; the next resume releases it.
            setup.wfs.session.execute(sa.text("SELECT 1"))
            assert checked_out(setup.engine) == 1
            out.append(token)
        assert out == ["a", "b", "c"]


def test_one_with_object_serves_several_threads_at_once(make: t.Callable[..., Setup]) -> None:
    """A ``long_running()`` object made once and entered by two threads whose
    blocks overlap (the first leaves while the second is inside): each thread
    ends its own step, for its own app."""
    first_app, second_app = make().app, make().app
    step = long_running("llm")
    finished: list[tuple[str, Flask]] = []
    first_inside, second_inside, first_left = (threading.Event() for _ in range(3))

    def record(sender: Flask, **kwargs: t.Any) -> None:
        finished.append((threading.current_thread().name, sender))

    def first() -> None:
        with first_app.app_context(), step:
            first_inside.set()
            assert second_inside.wait(10)
        first_left.set()

    def second() -> None:
        assert first_inside.wait(10)
        with second_app.app_context(), step:
            second_inside.set()
            assert first_left.wait(10)

    errors: list[BaseException] = []

    def run(fn: t.Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(fn,), name=fn.__name__) for fn in (first, second)]
    with signals.long_running_finished.connected_to(record):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert sorted(finished, key=lambda f: f[0]) == [("first", first_app), ("second", second_app)]


def test_generator_step_passes_sent_values_and_return(setup: Setup) -> None:
    @long_running("echo")
    def echo() -> t.Generator[int, int, str]:
        received = yield 1
        yield received * 10
        return "done"

    with setup.app.app_context():
        gen = echo()
        assert next(gen) == 1
        assert gen.send(4) == 40
        with pytest.raises(StopIteration) as stop:
            next(gen)
        assert stop.value.value == "done"


def test_async_function_step(setup: Setup) -> None:
    @long_running("llm")
    async def ask() -> int:
        await asyncio.sleep(0)
        return checked_out(setup.engine)

    with setup.app.app_context():
        setup.wfs.session.execute(sa.text("SELECT 1"))
        assert asyncio.run(ask()) == 0


def test_async_generator_step(setup: Setup) -> None:
    @long_running("stream")
    async def tokens() -> t.AsyncIterator[int]:
        for _ in range(3):
            await asyncio.sleep(0)
            yield checked_out(setup.engine)

    async def consume() -> list[int]:
        seen = []
        async for held in tokens():
            setup.wfs.session.execute(sa.text("SELECT 1"))
            seen.append(held)
        return seen

    with setup.app.app_context():
        setup.wfs.session.execute(sa.text("SELECT 1"))
        assert asyncio.run(consume()) == [0, 0, 0]


def concurrent_slow_requests(
    app: Flask, wfs: WFSession, *, decorated: bool, n: int, timeout: float = 10
) -> list[int]:
    """``n`` requests that each query, then wait inside a slow step for all the others.

    The barrier is only passed if every request is inside its step at once,
    which on a pool of 2 means no request holds a connection there.
    """
    barrier = threading.Barrier(n, timeout=timeout)

    def wait_for_everyone() -> None:
        barrier.wait()

    step = long_running("llm")(wait_for_everyone) if decorated else wait_for_everyone

    @app.get("/chat")
    def chat() -> str:
        titles = wfs.session.scalars(sa.select(Conversation.title)).all()
        step()
        return ",".join(titles)

    statuses: list[int] = []

    def client() -> None:
        statuses.append(app.test_client().get("/chat").status_code)

    threads = [threading.Thread(target=client) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def test_many_concurrent_slow_requests_on_a_pool_of_two(setup: Setup) -> None:
    assert concurrent_slow_requests(setup.app, setup.wfs, decorated=True, n=12) == [200] * 12


@pytest.mark.filterwarnings("ignore::flask_wfsession.IdleInTransactionWarning")  # as intended
def test_without_the_decorator_the_same_requests_exhaust_the_pool(
    make: t.Callable[..., Setup],
) -> None:
    setup = make()
    setup.app.config["PROPAGATE_EXCEPTIONS"] = False
    statuses = concurrent_slow_requests(setup.app, setup.wfs, decorated=False, n=4, timeout=2)
    assert statuses.count(500) >= 2
