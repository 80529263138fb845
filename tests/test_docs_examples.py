"""The code in the README, the quickstart, the migration guide and the units of
work page runs as written.

A page's ``python`` blocks build on each other: they run in order, in one
module, as they would pasted into one file. Each block has a test of its own,
which runs the page up to that block. After the last block of a section, the
section's check, if it has one, uses what the section built as a reader
would: requests, rows, connections. A section that makes a Flask app must have
a check. A block indented in a list item runs like the others, dedented.
``console`` blocks are not run, but their ``pip install`` lines must
install from the clone, with extras and groups that exist.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
import textwrap
import threading
import types
import typing as t
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_wfsession import HeldConnectionWarning

ROOT = Path(__file__).parent.parent
PAGES = ("README.md", "docs/quickstart.md", "docs/migration.md", "docs/units-of-work.md")
KINDS = {"python", "console", "text"}  # a block of another kind would go unchecked

_FENCE = re.compile(
    r"^(?P<indent> *)```(?P<kind>[^\n`]*)\n(?P<code>.*?)^(?P=indent)```$", re.M | re.S
)
_HEADING = re.compile(r"^#+ (.+)$", re.M)


@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    line: int  # the page's line of the block's first line of code
    section: str  # the heading the block is under
    kind: str
    code: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    """The fenced code blocks of ``page``, in order. Headings are looked for
    between blocks only: a comment at the start of a line of code is not one."""
    text = (ROOT / page).read_text()
    found, section, end = [], "", 0
    for fence in _FENCE.finditer(text):
        for heading in _HEADING.finditer(text, end, fence.start()):
            section = heading.group(1)
        line = text.count("\n", 0, fence.start("code")) + 1
        code = textwrap.dedent(fence["code"])
        found.append(Block(page, line, section, fence["kind"].strip(), code))
        end = fence.end()
    return found


PYTHON = [b for page in PAGES for b in blocks(page) if b.kind == "python"]


class Pasted:
    """Runs a page's blocks as one module whose file would be in ``tmp_path``,
    the working directory, and disposes the engines of the apps they make."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self._tmp_path = tmp_path
        self._monkeypatch = monkeypatch
        self._apps: list[Flask] = []
        self._modules: list[types.ModuleType] = []

    def run(self, last: Block) -> t.Any:
        """Run ``last``'s page from its first block through ``last``."""
        module = types.ModuleType("pasted")
        module.__file__ = str(self._tmp_path / "pasted.py")  # Flask's root path
        self._monkeypatch.setitem(sys.modules, "pasted", module)
        self._modules.append(module)
        for block in [b for b in PYTHON if b.page == last.page]:
            # Line numbers as on the page, so a traceback points into it; no
            # __future__ flags inherited from this file.
            source = "\n" * (block.line - 1) + block.code
            exec(compile(source, str(ROOT / block.page), "exec", dont_inherit=True), vars(module))
            if block == last:
                return module
        raise AssertionError(f"{last} was not found on its page")

    def app(self, module: t.Any) -> Flask:
        """The page's ``create_app()``, called."""
        app: Flask = module.create_app()
        self._apps.append(app)
        return app

    def close(self) -> None:
        apps = self._apps + [
            v for m in self._modules for v in vars(m).values() if isinstance(v, Flask)
        ]
        for app in apps:
            with app.app_context():
                engines = []
                if "sqlalchemy" in app.extensions:
                    engines += app.extensions["sqlalchemy"].engines.values()
                if "wfsession" in app.extensions:
                    engines += app.extensions["wfsession"].engines.values()
                for engine in engines:
                    engine.dispose()


@pytest.fixture
def pasted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> t.Iterator[Pasted]:
    monkeypatch.chdir(tmp_path)  # relative SQLite paths end up here
    runner = Pasted(tmp_path, monkeypatch)
    yield runner
    runner.close()


Check = t.Callable[[Pasted, t.Any, pytest.MonkeyPatch], None]
CHECKS: dict[tuple[str, str], Check] = {}


def check(page: str, *sections: str) -> t.Callable[[Check], Check]:
    """Register the check run after the last block of each of ``page``'s ``sections``."""

    def register(fn: Check) -> Check:
        for section in sections:
            CHECKS[page, section] = fn
        return fn

    return register


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_block_runs(block: Block, pasted: Pasted, monkeypatch: pytest.MonkeyPatch) -> None:
    module = pasted.run(block)
    section = [b for b in PYTHON if (b.page, b.section) == (block.page, block.section)]
    if block != section[-1]:
        return
    section_check = CHECKS.get((block.page, block.section))
    if section_check is None:
        assert not any("Flask(" in b.code for b in section), (
            f"{block.page}, section {block.section!r} makes an app: add a check that uses it"
        )
        return
    section_check(pasted, module, monkeypatch)


def test_every_check_has_its_section() -> None:
    """A renamed heading must not silently drop its check."""
    sections = {(b.page, b.section) for b in PYTHON}
    assert set(CHECKS) <= sections


def test_blocks_are_of_known_kinds() -> None:
    """A ``py`` or ``pycon`` block would not be run: say ``python``."""
    for page in PAGES:
        for block in blocks(page):
            assert block.kind in KINDS, f"{block}: a {block.kind!r} block"


def test_install_lines_install_from_the_clone() -> None:
    """The package is not on PyPI: every ``pip install`` installs a path, and the
    extras and dependency groups it names exist."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    groups = set(pyproject["dependency-groups"])
    lines = [
        (block, line)
        for page in PAGES
        for block in blocks(page)
        if block.kind == "console"
        for line in block.code.splitlines()
        if "pip install" in line
    ]
    assert {block.page for block, _ in lines} >= {"README.md", "docs/quickstart.md"}
    for block, line in lines:
        args = iter(shlex.split(line.split("pip install", 1)[1]))
        for arg in args:
            if arg == "--group":
                assert next(args) in groups, f"{block}: {line}"
            elif not arg.startswith("-"):
                target = re.fullmatch(r"(?P<path>[^\[]+)(?:\[(?P<extras>[^\]]+)\])?", arg)
                assert target is not None, f"{block}: {line}"
                assert target["path"].startswith("."), f"{block}: not a path: {line}"
                named = set((target["extras"] or "").split(",")) - {""}
                assert named <= extras, f"{block}: no such extra: {line}"


# -- README.md


@check("README.md", "Example")
def check_readme(pasted: Pasted, module: t.Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app = pasted.app(module)
    with app.app_context():
        module.db.session.add(module.Conversation(id=1, title="hi"))
        module.db.session.commit()
    client = app.test_client()
    assert client.get("/conversations/1").get_json() == {"title": "hi"}
    assert client.get("/conversations/2").status_code == 404  # not a 500
    with app.app_context():
        assert module.db.session.scalars(sa.select(module.Visit.conversation_id)).all() == [1]

    # The slow call gives the request's connection back; what it read stays readable.
    with app.test_request_context():
        pool = module.db.engine.pool
        conversation = module.db.get_or_404(module.Conversation, 1)
        assert pool.checkedout() == 1
        module.ask_llm("Hello?")
        assert pool.checkedout() == 0
        assert conversation.title == "hi"
        assert pool.checkedout() == 0  # no reload


# -- docs/quickstart.md


@check("docs/quickstart.md", "With Flask-SQLAlchemy", "Without Flask-SQLAlchemy")
def check_quickstart_app(pasted: Pasted, module: t.Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app = pasted.app(module)
    client = app.test_client()
    created = client.post("/conversations", json={"title": "First"})
    assert created.status_code == 201
    assert client.get(f"/conversations/{created.json['id']}").json == {"title": "First"}
    assert client.get("/conversations/99").status_code == 404
    with app.app_context():
        assert module.wfs.pool_status()[None]["checked_out"] == 0


@check("docs/quickstart.md", "Using the sessions")
def check_quickstart_detached(
    pasted: Pasted, module: t.Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with module.app.app_context():
        entries = module.db.session.scalars(sa.select(module.AuditEntry.action)).all()
    assert entries == ["import"]


# -- docs/migration.md


def slow_step(module: t.Any, monkeypatch: pytest.MonkeyPatch, app: Flask) -> list[str]:
    """Make the page's stand-in LLM call instant, and log the SQL statements
    sent and, for the call, the connections checked out while it runs."""
    with app.app_context():
        engine = module.db.engine
    log: list[str] = []
    monkeypatch.setattr(
        module.time, "sleep", lambda seconds: log.append(f"step: {engine.pool.checkedout()} held")
    )
    sa.event.listen(engine, "before_cursor_execute", lambda *args: log.append(args[2]))
    return log


def add_conversation(app: Flask, module: t.Any) -> None:
    with app.app_context():
        module.db.session.add(module.Conversation(id=1, title="Help"))
        module.db.session.commit()


def assert_question_kept_when_the_llm_fails(
    client: t.Any, app: t.Any, module: t.Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LLM call raises: the view answers 500, and the question is stored."""

    def fail(seconds: float) -> None:
        raise TimeoutError("the LLM did not answer")

    monkeypatch.setattr(module.time, "sleep", fail)
    assert client.post("/conversations/1/chat", json={"message": "Again?"}).status_code == 500
    assert messages(app, module)[-1] == ("user", "Again?")


def messages(app: Flask, module: t.Any) -> list[tuple[str, str]]:
    with app.app_context():
        return [
            (m.role, m.content)
            for m in module.db.session.scalars(sa.select(module.Message).order_by("id"))
        ]


def after_step(log: list[str]) -> list[str]:
    step = next(i for i, entry in enumerate(log) if entry.startswith("step:"))
    return [" ".join(statement.split()) for statement in log[step + 1 :]]


@check("docs/migration.md", "Before")
def check_before(pasted: Pasted, module: t.Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app = pasted.app(module)
    add_conversation(app, module)
    log = slow_step(module, monkeypatch, app)
    response = app.test_client().post("/conversations/1/chat", json={"message": "Hi?"})
    assert response.json == {"answer": "You asked: Hi?"}
    assert "step: 1 held" in log  # the problem the page starts from
    assert messages(app, module) == [("user", "Hi?"), ("assistant", "You asked: Hi?")]


@check("docs/migration.md", "After")
def check_after(pasted: Pasted, module: t.Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app = pasted.app(module)
    add_conversation(app, module)
    log = slow_step(module, monkeypatch, app)
    client = app.test_client()
    response = client.post("/conversations/1/chat", json={"message": "Hi?"})
    assert response.json == {"answer": "You asked: Hi?"}
    assert "step: 0 held" in log
    # Expired at the commit: the conversation and its messages are reloaded after the step.
    reload_conversation, reload_messages, insert = after_step(log)
    assert reload_conversation.startswith("SELECT") and "FROM conversation" in reload_conversation
    assert reload_messages.startswith("SELECT") and "FROM message" in reload_messages
    assert insert.startswith("INSERT INTO message")
    assert messages(app, module) == [("user", "Hi?"), ("assistant", "You asked: Hi?")]

    # The first commit keeps the question when the LLM call fails.
    assert_question_kept_when_the_llm_fails(client, app, module, monkeypatch)

    # Without the first commit: released all the same, the question carried
    # in the session and inserted by the final commit.
    log = slow_step(module, monkeypatch, app)
    with app.test_request_context():
        db, Message = module.db, module.Message
        conversation = db.get_or_404(module.Conversation, 1)
        conversation.messages.append(Message(role="user", content="Still there?"))
        answer = module.ask_llm("Still there?")
        conversation.messages.append(Message(role="assistant", content=answer))
        db.session.commit()
    assert "step: 0 held" in log
    assert messages(app, module)[-2:] == [
        ("user", "Still there?"),
        ("assistant", "You asked: Still there?"),
    ]


@check("docs/migration.md", "Objects after a commit")
def check_no_expiry(pasted: Pasted, module: t.Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app = pasted.app(module)  # the "After" app, with the new db
    add_conversation(app, module)
    log = slow_step(module, monkeypatch, app)
    response = app.test_client().post("/conversations/1/chat", json={"message": "Hi?"})
    assert response.json == {"answer": "You asked: Hi?"}
    assert "step: 0 held" in log
    assert [s.split(" (")[0] for s in after_step(log)] == ["INSERT INTO message"]  # no reload
    assert messages(app, module) == [("user", "Hi?"), ("assistant", "You asked: Hi?")]


# -- docs/units-of-work.md


def instant_llm(module: t.Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the page's stand-in LLM call instant; return, for each call, the
    connections checked out while it ran."""
    with module.app.app_context():
        pool = module.db.engine.pool
    held: list[int] = []
    monkeypatch.setattr(module.time, "sleep", lambda seconds: held.append(pool.checkedout()))
    return held


def audit_rows(module: t.Any) -> tuple[list[str], list[str]]:
    with module.app.app_context():
        session = module.db.session
        titles = session.scalars(sa.select(module.Conversation.title)).all()
        actions = session.scalars(sa.select(module.AuditEntry.action).order_by("id")).all()
    return list(titles), list(actions)


@check("docs/units-of-work.md", "Units of work")
def check_units(pasted: Pasted, module: t.Any, monkeypatch: pytest.MonkeyPatch) -> None:
    add_conversation(module.app, module)
    with module.app.app_context():
        module.rename(1, "Billing")
        module.audit("exported")  # by itself: commits its entry
    assert audit_rows(module) == (["Billing"], ["renamed conversation 1", "exported"])

    # An inner unit that raises: the rename is rolled back with its audit entry.
    @module.wfs.transaction
    def failing_audit(action: str) -> None:
        module.wfs.session.add(module.AuditEntry(action=action))
        raise RuntimeError("the audit failed")

    monkeypatch.setattr(module, "audit", failing_audit)
    with module.app.app_context(), pytest.raises(RuntimeError):
        module.rename(1, "Lost")
    assert audit_rows(module) == (["Billing"], ["renamed conversation 1", "exported"])


@check("docs/units-of-work.md", "The rules")
def check_savepoint(pasted: Pasted, module: t.Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with module.app.app_context():
        first = module.start("First", "help").id
        module.start("Second", "help")  # the name is taken: no tag, the conversation stays
        session = module.db.session
        tags = session.execute(sa.select(module.Tag.name, module.Tag.conversation_id)).all()
    assert [tuple(tag) for tag in tags] == [("help", first)]
    assert audit_rows(module) == (["First", "Second"], [])


@check("docs/units-of-work.md", "After the commit: `wfs.on_commit`")
def check_on_commit(pasted: Pasted, module: t.Any, monkeypatch: pytest.MonkeyPatch) -> None:
    add_conversation(module.app, module)
    held = instant_llm(module, monkeypatch)
    workers: list[threading.Thread] = []
    spawn = module.wfs.spawn
    monkeypatch.setattr(module.wfs, "spawn", lambda *args: workers.append(spawn(*args)))
    with module.app.app_context():
        module.ask(1, "Hi?")
    assert len(workers) == 1
    workers[0].join(10)
    assert messages(module.app, module) == [("user", "Hi?"), ("assistant", "You asked: Hi?")]
    assert held == [0]

    # Rolled back: the callback never runs.
    with module.app.app_context(), pytest.raises(RuntimeError):
        with module.wfs.transaction():
            module.ask(1, "Lost?")
            raise RuntimeError("the request failed")
    assert len(workers) == 1
    assert messages(module.app, module)[-1] == ("assistant", "You asked: Hi?")


@check("docs/units-of-work.md", "Slow steps and units")
def check_unit_steps(pasted: Pasted, module: t.Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app, db, Message = module.app, module.db, module.Message
    add_conversation(app, module)
    held = instant_llm(module, monkeypatch)
    client = app.test_client()
    response = client.post("/conversations/1/chat", json={"message": "Hi?"})
    assert response.json == {"answer": "You asked: Hi?"}
    assert held == [0]
    assert messages(app, module) == [("user", "Hi?"), ("assistant", "You asked: Hi?")]

    # The LLM fails: the question is stored all the same.
    assert_question_kept_when_the_llm_fails(client, app, module, monkeypatch)

    # The whole view in one unit: released while the question is unflushed,
    # held (and reported) once a query has flushed it.
    def whole_view_in_one_unit(query: bool) -> None:
        with app.test_request_context(), module.wfs.transaction():
            conversation = db.get_or_404(module.Conversation, 1)
            conversation.messages.append(Message(role="user", content="Whole?"))
            if query:
                db.session.scalars(sa.select(module.Tag)).all()  # autoflush
            answer = module.ask_llm("Whole?")
            conversation.messages.append(Message(role="assistant", content=answer))

    held = instant_llm(module, monkeypatch)
    whole_view_in_one_unit(query=False)
    with pytest.warns(HeldConnectionWarning):
        whole_view_in_one_unit(query=True)
    assert held == [0, 1]
    assert messages(app, module)[-2:] == [("user", "Whole?"), ("assistant", "You asked: Whole?")]
