"""The example app, on every backend: chat, streaming, workflows, jobs, a burst."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import shutil
import threading
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask

from example_app import create_app, demo, wfs
from example_app.fake_llm import FakeLLM, answer_for
from example_app.jobs import start_summary
from example_app.models import Base, NodeResult, WorkflowRun
from example_app.repositories import SQLAlchemyRunRepository
from example_app.workflow import Node, Workflow, WorkflowEngine
from flask_wfsession import HeldConnectionWarning, signals

from .conftest import engine_options


@pytest.fixture
def fake_llm() -> t.Iterator[FakeLLM]:
    with FakeLLM(latency=0.2) as llm:
        yield llm


def drop_tables(uri: str) -> None:
    engine = sa.create_engine(uri, poolclass=sa.pool.NullPool)
    Base.metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
def make_example(backend: str, uri: str, fake_llm: FakeLLM) -> t.Iterator[t.Callable[..., Flask]]:
    apps: list[Flask] = []

    def factory(**config: t.Any) -> Flask:
        app = create_app(
            {
                "TESTING": True,
                "WFSESSION_DATABASE_URI": uri,
                "WFSESSION_ENGINE_OPTIONS": engine_options(backend),
                "LLM_URL": fake_llm.url,
                **config,
            }
        )
        apps.append(app)
        return app

    yield factory
    for app in apps:
        with app.app_context():
            engine = wfs.engine
        assert t.cast(sa.pool.QueuePool, engine.pool).checkedout() == 0
        engine.dispose()
    drop_tables(uri)


@pytest.fixture
def example(make_example: t.Callable[..., Flask]) -> Flask:
    return make_example()


def new_conversation(app: Flask) -> int:
    response = app.test_client().post("/api/conversations", json={"title": "test"})
    assert response.status_code == 201
    return t.cast(int, response.get_json()["id"])


def expected_answer(prompt: str) -> str:
    return "".join(answer_for(prompt)).strip()


def test_chat_stores_both_sides_and_holds_nothing_during_the_call(example: Flask) -> None:
    client = example.test_client()
    cid = new_conversation(example)
    reply = client.post(f"/api/conversations/{cid}/chat", json={"message": "hi there"})
    assert reply.get_json() == {"answer": expected_answer("user: hi there"), "messages": 2}
    messages = client.get(f"/api/conversations/{cid}").get_json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    pool = client.get("/api/pool").get_json()
    assert pool["llm_waits"] == 1 and pool["llm_waits_holding_a_connection"] == 0


def test_streamed_answer_arrives_token_by_token(example: Flask) -> None:
    cid = new_conversation(example)
    response = example.test_client().get(
        f"/api/conversations/{cid}/stream",
        query_string={"message": "stream me"},
        buffered=False,
    )
    assert response.mimetype == "text/event-stream"
    events = b"".join(response.response).decode().strip().split("\n\n")
    response.close()
    tokens = [json.loads(e.removeprefix("data: "))["token"] for e in events[:-1]]
    assert "".join(tokens).strip() == expected_answer("stream me")
    assert events[-1].startswith("event: done")
    pool = example.test_client().get("/api/pool").get_json()
    assert pool["llm_waits"] >= len(tokens)
    assert pool["llm_waits_holding_a_connection"] == 0
    messages = example.test_client().get(f"/api/conversations/{cid}").get_json()["messages"]
    assert messages[-1] == {"role": "assistant", "content": expected_answer("stream me")}


def test_workflow_endpoint_runs_and_persists_every_node(example: Flask) -> None:
    result = example.test_client().post("/api/workflows/research", json={"topic": "tea"})
    body = result.get_json()
    assert body["status"] == "succeeded"
    assert set(body["results"]) == {"facts", "risks", "answer"}
    assert body["results"]["facts"] == expected_answer("facts about tea")


def test_workflow_nodes_run_in_parallel_through_repositories(example: Flask) -> None:
    both_running = threading.Barrier(2, timeout=10)

    def parallel(name: str) -> Node:
        return Node(name, lambda results: f"{name} after {both_running.wait()}")

    workflow = Workflow(
        "parallel",
        (parallel("a"), parallel("b"), Node("c", lambda r: r["a"][:1] + r["b"][:1], ("a", "b"))),
    )
    with example.app_context():
        factory = wfs.sessionmaker
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        run_id = WorkflowEngine(SQLAlchemyRunRepository(factory), executor).run(workflow, {})
    with factory() as session:
        run = session.get_one(WorkflowRun, run_id)
        assert run.status == "succeeded"
        outputs = {r.node: r.output for r in run.results}
    assert outputs["c"] == "ab"


def test_failed_workflow_is_recorded_as_failed(example: Flask) -> None:
    def broken(results: dict[str, str]) -> str:
        raise ConnectionError("provider down")

    with example.app_context():
        factory = wfs.sessionmaker
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        engine = WorkflowEngine(SQLAlchemyRunRepository(factory), executor)
        with pytest.raises(ConnectionError):
            engine.run(Workflow("broken", (Node("x", broken),)), {})
    with factory() as session:
        assert session.scalars(sa.select(WorkflowRun.status)).all() == ["failed"]
        assert session.scalars(sa.select(NodeResult)).all() == []


EAGER_CELERY = {
    "CELERY_BROKER_URL": "memory://",
    "CELERY": {"task_always_eager": True, "task_eager_propagates": True},
}


@pytest.mark.parametrize("runner", ["thread", "celery-eager"])
def test_background_summary(make_example: t.Callable[..., Flask], runner: str) -> None:
    app = make_example(**(EAGER_CELERY if runner == "celery-eager" else {}))
    cid = new_conversation(app)
    app.test_client().post(f"/api/conversations/{cid}/chat", json={"message": "one two"})
    with app.app_context():
        assert ("example_celery" in app.extensions) == (runner == "celery-eager")
        start_summary(cid).wait(timeout=30)
    conversation = app.test_client().get(f"/api/conversations/{cid}").get_json()
    transcript = "\n".join(f"{m['role']}: {m['content']}" for m in conversation["messages"])
    assert transcript == f"user: one two\nassistant: {expected_answer('user: one two')}"
    assert conversation["summary"] == expected_answer(f"Summarise this conversation:\n{transcript}")


def test_summary_endpoint_starts_the_job(make_example: t.Callable[..., Flask]) -> None:
    app = make_example(**EAGER_CELERY)  # eager: the job is done when the response is
    cid = new_conversation(app)
    assert app.test_client().post(f"/api/conversations/{cid}/summary").status_code == 202
    assert app.test_client().get(f"/api/conversations/{cid}").get_json()["summary"]
    assert app.test_client().post("/api/conversations/999/summary").status_code == 404


# Without release, every chat's held connection is reported; here they are counted.
@pytest.mark.filterwarnings("ignore::flask_wfsession.HeldConnectionWarning")
def test_burst_on_a_tiny_pool(fake_llm: FakeLLM, uri: str) -> None:
    try:
        released = demo.burst(True, 8, fake_llm.url, uri)
        pinned = demo.burst(False, 4, fake_llm.url, uri)
    finally:
        drop_tables(uri)
    assert released["served"] == 8 and released["errors"] == 0
    assert released["waits"] == 8 and released["holding"] == 0
    assert pinned["holding"] == pinned["served"] > 0  # the contrast: each call pins one


@pytest.mark.filterwarnings("ignore::flask_wfsession.HeldConnectionWarning")
@pytest.mark.parametrize("release", [True, False])
def test_the_pool_panel_names_who_holds_a_connection(
    make_example: t.Callable[..., Flask], release: bool
) -> None:
    """``/api/pool`` (the page's panel) asked while a chat waits for the LLM."""
    example = make_example(RELEASE_DURING_LLM=release)
    cid = new_conversation(example)
    waiting, answered = threading.Event(), threading.Event()
    llm = example.extensions["example_llm"]
    count = llm.observe

    def observe() -> None:  # runs in the chat's request, as the LLM call starts
        count()
        if not waiting.is_set():
            waiting.set()
            assert answered.wait(10)

    llm.observe = observe
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        chat = pool.submit(
            example.test_client().post,
            f"/api/conversations/{cid}/chat",
            json={"message": "hi"},
        )
        assert waiting.wait(10)
        try:
            panel = example.test_client().get("/api/pool").get_json()
        finally:
            answered.set()
        assert chat.result().status_code == 200
    assert panel["size"] == engine_options("sqlite")["pool_size"]
    held = [(h["endpoint"], h["state"], h["began_at"]) for h in panel["holders"]]
    if release:
        assert held == [] and panel["checked_out"] == 0
    else:  # one unit of work around the call: the extension had to keep it
        assert held == [("chat.chat", "held by the 'hold' policy through step 'llm'", held[0][2])]
        assert held[0][2].startswith("example_app/views.py:")


def ask(app: Flask, path: str, cid: int, message: str, query: dict[str, str]) -> str:
    """Ask through the chat or the stream endpoint, as the page does; the answer."""
    client = app.test_client()
    if path == "chat":
        url = f"/api/conversations/{cid}/chat"
        reply = client.post(url, json={"message": message}, query_string=query)
        return t.cast(str, reply.get_json()["answer"])
    response = client.get(
        f"/api/conversations/{cid}/stream",
        query_string={**query, "message": message},
        buffered=False,
    )
    events = b"".join(response.response).decode().strip().split("\n\n")
    response.close()
    assert events[-1].startswith("event: done")
    return t.cast(str, json.loads(events[-1].split("data: ", 1)[1])["answer"])


@pytest.mark.parametrize("path", ["chat", "stream"])
@pytest.mark.parametrize("release", ["1", "0", None])
def test_the_page_switch_runs_the_same_chat_holding_a_connection(
    example: Flask, path: str, release: str | None
) -> None:
    """``?release=0`` (the page's switch off): one unit of work around the LLM
    call, so the connection is held through it, counted in X, and reported."""
    cid = new_conversation(example)
    llm = example.extensions["example_llm"]
    count = llm.observe
    checked_out: list[int] = []

    def observe() -> None:  # inside the step: as the call starts, as each token arrives
        count()
        checked_out.append(t.cast(sa.pool.QueuePool, wfs.engine.pool).checkedout())

    llm.observe = observe
    held: list[str | None] = []

    def on_release(sender: Flask, step: str | None, action: str, **kwargs: t.Any) -> None:
        if action == "held":
            held.append(step)

    query = {} if release is None else {"release": release}
    reported = pytest.warns(HeldConnectionWarning) if release == "0" else contextlib.nullcontext()
    with signals.session_released.connected_to(on_release, example), reported:
        answer = ask(example, path, cid, "hi there", query)
    pool = example.test_client().get("/api/pool").get_json()
    waits, holding = pool["llm_waits"], pool["llm_waits_holding_a_connection"]
    assert waits == len(checked_out) > 0
    if release == "0":
        assert holding == waits and set(checked_out) == {1}
        assert {"llm" if path == "chat" else "llm-stream"} <= set(held)
    else:
        assert holding == 0 and set(checked_out) == {0} and held == []
    # The same chat either way: both sides stored, the same answer.
    prompt = "user: hi there" if path == "chat" else "hi there"
    assert answer == expected_answer(prompt)
    messages = example.test_client().get(f"/api/conversations/{cid}").get_json()["messages"]
    assert messages == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": answer},
    ]


def test_page_serves_the_chat(make_example: t.Callable[..., Flask]) -> None:
    page = make_example().test_client().get("/")
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert "EventSource" in text and "/api/pool" in text
    # Each figure is explained in plain words, and the switch is there, on.
    for explained in (
        "Pool size: <span",
        "How many database connections the app keeps",
        "Checked out now: <span",
        "a request is using right now",
        "LLM waits holding a connection: <span",
        "0 means no connection sat idle while the LLM was thinking.",
    ):
        assert explained in text
    assert '<input type="checkbox" id="release" checked>' in text
    assert "release=${release}" in text
    plain = make_example(RELEASE_DURING_LLM=False).test_client().get("/")
    assert '<input type="checkbox" id="release">' in plain.get_data(as_text=True)


# The second chat runs with the switch off: its held connection is reported.
@pytest.mark.filterwarnings("ignore::flask_wfsession.HeldConnectionWarning")
def test_a_person_chats_in_a_real_browser(example: Flask) -> None:
    """Headless Chromium types a message, sends it, and sees the answer stream in;
    then unticks the switch, chats again, and sees X count up."""
    from playwright.sync_api import sync_playwright
    from werkzeug.serving import make_server

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Chromium is missing: the test command installs Debian's 'chromium'.")
    server = make_server("127.0.0.1", 0, example, threaded=True)
    serving = threading.Thread(target=server.serve_forever)
    serving.start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.server_port}/")
            page.fill("#message", "hello from a browser")
            page.click("#send")
            page.wait_for_selector(".assistant[data-done='true']", timeout=30_000)
            answer = page.text_content(".assistant")
            # With the release (the default), no wait held a connection: "0 of N".
            page.wait_for_function(WAITS_MATCH, arg=r"^0 of [1-9]", timeout=10_000)
            low_contrast = page.evaluate(LOW_CONTRAST)
            page.uncheck("#release")
            page.fill("#message", "and again")
            page.click("#send")
            page.wait_for_selector(".assistant[data-done='true'] >> nth=1", timeout=30_000)
            page.wait_for_function(WAITS_MATCH, arg=r"^[1-9]\d* of ", timeout=10_000)
            size = page.text_content("#pool-size")
            browser.close()
    finally:
        server.shutdown()
        serving.join()
    assert answer is not None and answer.strip() == expected_answer("hello from a browser")
    assert size == str(engine_options("sqlite")["pool_size"])
    assert low_contrast == []


# True once the page's "LLM waits holding a connection" figure matches a pattern.
WAITS_MATCH = "(p) => new RegExp(p).test(document.getElementById('llm-waits').textContent)"

# Every element showing text (and the input's placeholder) whose colour has less
# than WCAG AA's 4.5:1 contrast with the background behind it.
LOW_CONTRAST = """() => {
  const channels = (colour) => colour.match(/[\\d.]+/g).map(Number);
  const luminance = ([r, g, b]) => {
    const linear = (v) => (v /= 255) <= 0.04045 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    return 0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b);
  };
  const background = (el) => {
    for (; el; el = el.parentElement) {
      const c = channels(getComputedStyle(el).backgroundColor);
      if (c.length < 4 || c[3] > 0) return c;
    }
    return [255, 255, 255];
  };
  const ratio = (fg, bg) => {
    const [hi, lo] = [luminance(fg), luminance(bg)].sort((a, b) => b - a);
    return (hi + 0.05) / (lo + 0.05);
  };
  const shown = [...document.body.querySelectorAll("*")].filter((el) =>
    el.tagName !== "SCRIPT" &&
    [...el.childNodes].some((n) => n.nodeType === Node.TEXT_NODE && n.textContent.trim()));
  const found = shown.map((el) => [el, getComputedStyle(el).color]);
  const input = document.getElementById("message");
  found.push([input, getComputedStyle(input, "::placeholder").color]);
  return found
    .map(([el, colour]) => [el.outerHTML.slice(0, 60), ratio(channels(colour), background(el))])
    .filter(([, r]) => r < 4.5);
}"""


# As root in a container, without the network: no sandbox, no background calls.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_scale_load_generator_counts_streams_first_tokens_and_cuts() -> None:
    """The scale benchmark's client, against a tiny SSE server: one that answers
    whole streams and one that cuts every stream after its first token."""
    import asyncio
    import time

    from example_app.scale_load import Cell, Load

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cut = (await reader.readuntil(b"\r\n\r\n")).startswith(b"GET /cut")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for event in (b"event: token\ndata: 1", b"event: done\ndata: 1")[: 1 if cut else 2]:
            await asyncio.sleep(0.02)
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        if not cut:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()  # one stream per connection: the client reconnects

    async def run(path: str) -> Cell:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        load = Load(port, path, clients=4, timeout=5)
        start = time.monotonic()
        await load.run(0.05, start + 0.5, start + 2)
        server.close()
        return Cell("test", path, 4, (start, start + 0.5), load.streams)

    whole = asyncio.run(run("/ok"))
    assert whole.throughput > 10 and not whole.errors
    assert 0.02 <= whole.ttft(0.5) < 0.5
    cut = asyncio.run(run("/cut"))
    assert cut.throughput == 0 and set(cut.errors) == {"cut"}
    assert cut.ttft(0.5) < 0.5
