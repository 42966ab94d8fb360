"""session/load when something happens half-way: a load or a prompt from elsewhere, a
delete from another connection, a ``$/cancel_request``, a close, a failed write of the
roots. A load claims the session first; the session a failed load opened is dropped (no
leaked session or worker, nothing left open without its history); one that was open keeps
what it had."""

from __future__ import annotations

import contextlib
import gc
import json
import threading
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from punie_trio.hub import ClientConnection
from punie_trio.store import MemoryStore, StoreError, UnknownSessionError
from punie_trio.worker import EchoModel, ScriptModel

from ..acp_schema import SchemaChecker
from ..client import AcpTestClient
from ..models import RefusesBad
from ..persistence._hub import Hub, has_update, initialize, open_hub, prompt_params, send_prompt


@attrs.define(eq=False)
class Gate:
    """Where a store operation waits, once ``armed``, until the test opens it."""

    armed: bool = False
    entered: trio.Event = attrs.field(factory=trio.Event)
    opened: trio.Event = attrs.field(factory=trio.Event)

    async def pass_through(self) -> None:
        if self.armed:
            self.entered.set()
            await self.opened.wait()


class GatedStore:
    """A memory store whose transcript reads, deletes and session updates can be held (a
    slow disk), and whose session updates can fail (a full one)."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.gets = Gate()
        self.reads = Gate()
        self.deletes = Gate()
        self.updates = Gate()
        self.appends = Gate()
        self.updates_fail = False
        self.reads_fail = False
        self.appends_fail = False
        self.lists_fail = False
        self.deletes_fail = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get_session(self, session_id: str) -> Any:
        await self.gets.pass_through()
        return await self.inner.get_session(session_id)

    async def transcript_rows(
        self, session_id: str, page_size: int = 1000
    ) -> AsyncIterator[list[tuple[int, str, str]]]:
        await self.reads.pass_through()
        if self.reads_fail:  # another process deleted the session meanwhile
            raise UnknownSessionError(f"unknown session {session_id!r}")
        async for rows in self.inner.transcript_rows(session_id, page_size):
            yield rows

    async def append_turn(self, *args: Any, **kwargs: Any) -> None:
        # Not interruptible once begun (the Store protocol): only a caller cancelled
        # before the call is refused.
        await trio.lowlevel.checkpoint_if_cancelled()
        with trio.CancelScope(shield=True):
            await self.appends.pass_through()
        if self.appends_fail:
            self.appends_fail = False  # (once)
            raise StoreError("disk full")
        await self.inner.append_turn(*args, **kwargs)

    async def list_sessions(self, **kwargs: Any) -> Any:
        if self.lists_fail:
            raise StoreError("session store: database disk image is malformed")
        return await self.inner.list_sessions(**kwargs)

    async def delete_session(self, session_id: str) -> bool:
        await self.deletes.pass_through()
        if self.deletes_fail:
            raise StoreError("session store: disk I/O error")
        return await self.inner.delete_session(session_id)

    async def update_session(self, *args: Any, **kwargs: Any) -> None:
        await self.updates.pass_through()
        if self.updates_fail:
            raise StoreError("disk full")
        await self.inner.update_session(*args, **kwargs)


class ReadsEarly(GatedStore):
    """A gated store whose session reads take their snapshot before they wait (the owner
    thread's read done, its result not yet handed back)."""

    async def get_session(self, session_id: str) -> Any:
        record = await self.inner.get_session(session_id)
        await self.gets.pass_through()
        return record


async def answer_into(
    answers: dict[str, Any], key: str, client: AcpTestClient, method: str, params: Any
) -> None:
    """A request a test runs in the background: its raw answer lands in ``answers[key]``."""
    answers[key] = await client.request_raw(method, params)


async def clients(hub: Hub, count: int) -> list[AcpTestClient]:
    links = [await hub.connect() for _ in range(count)]
    for link in links:
        await initialize(link.client)
    return [link.client for link in links]


def load_params(session: str, root: Path, *extra: Path) -> dict[str, Any]:
    params: dict[str, Any] = {"sessionId": session, "cwd": str(root), "mcpServers": []}
    if extra:
        params["additionalDirectories"] = [str(p) for p in extra]
    return params


async def slow_turn_running(hub: Hub) -> tuple[AcpTestClient, str]:
    """A client whose session runs prompt "p", once its first chunk ("slow") has come."""
    (client,) = await clients(hub, 1)
    session = await client.new_session(str(hub.root))
    await send_prompt(client, "p", session, "go")
    await client.wait_for(has_update(session, "agent_message_chunk", "slow"))
    return client, session


@pytest.mark.parametrize("held", [False, True], ids=["closed", "held"])
async def test_requests_pipelined_behind_a_load_that_reads_the_store_hear_it_is_loading(
    tmp_path: Path, acp_schema: SchemaChecker, held: bool
) -> None:
    """A prompt, a close and a delete sent right behind a ``session/load`` or
    ``session/resume``, while it still reads the stored session (before it claims it), are
    refused as "still loading", as they are once it has claimed it: the session exists.
    (The prompt and the close got -32002 "Session not found"; the delete removed the
    session under the load.) So are they when the connection reloads a session it holds
    (``held``): the prompt ran, or the close dropped the session, under the load. The
    load then succeeds and the session takes prompts."""
    store = GatedStore()
    async with open_hub(tmp_path, acp_schema, EchoModel(), store=store) as hub:  # type: ignore[arg-type]
        root = hub.root
        (client,) = await clients(hub, 1)
        for method in ("session/load", "session/resume"):
            session = await client.new_session(str(root))
            if not held:
                await client.request("session/close", {"sessionId": session})
            store.gets = Gate(armed=True)
            answers: dict[str, Any] = {}

            async def load(
                method: str = method, session: str = session, answers: dict[str, Any] = answers
            ) -> None:
                answers["load"] = await client.request_raw(method, load_params(session, root))

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(load)
                    await store.gets.entered.wait()  # the load reads the stored session
                    store.gets.armed = False  # (only the load waits there)
                    answers["prompt"] = await client.request_raw(
                        "session/prompt", prompt_params(session, "hi")
                    )
                    for name in ("close", "delete"):
                        answers[name] = await client.request_raw(
                            f"session/{name}", {"sessionId": session}
                        )
                    store.gets.opened.set()
            assert answers["load"]["result"] == {}, method
            for name in ("prompt", "close", "delete"):
                error = answers[name]["error"]
                assert error == {
                    "code": -32600,
                    "message": f"Session {session} is still loading",
                }, (method, name)
            assert await client.prompt(session, "now") == "end_turn"


async def test_a_load_claims_the_session_before_it_writes_its_roots(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """While a load writes its roots, a second connection's load and the same connection's
    prompt are refused, and the refused load writes nothing: the store, the live session
    and session/list agree. (The roots were once written before the claim, so a refused
    load could leave its roots in the store.)"""
    store = GatedStore()
    async with open_hub(tmp_path, acp_schema, EchoModel(), store=store) as hub:  # type: ignore[arg-type]
        root = hub.root
        x, y = root / "x", root / "y"
        x.mkdir()
        y.mkdir()
        a, b = await clients(hub, 2)
        session = await a.new_session(str(root))
        await a.request("session/close", {"sessionId": session})
        store.updates.armed = True
        answers: dict[str, Any] = {}

        async def load(name: str, client: AcpTestClient, extra: Path) -> None:
            answers[name] = await client.request_raw(
                "session/load", load_params(session, root, extra)
            )

        async with trio.open_nursery() as loads:
            loads.start_soon(load, "a", a, x)
            await store.updates.entered.wait()  # a's write is under way
            # Refused while it is (each load checks its paths in a thread first: awaited
            # here, not just started).
            async with trio.open_nursery() as refused:
                refused.start_soon(load, "b", b, y)
                refused.start_soon(load, "again", a, x)  # pipelined by the same client
                answers["prompt"] = await a.request_raw(
                    "session/prompt", prompt_params(session, "hi")
                )
            store.updates.opened.set()
        assert answers["a"]["result"] == {}
        assert "open on another connection" in answers["b"]["error"]["message"]
        assert "still loading" in answers["prompt"]["error"]["message"]
        # (It was "has a prompt running", while none was.)
        assert answers["again"]["error"]["message"] == f"Session {session} is still loading"
        stored = await store.get_session(session)
        assert stored is not None and stored.additional_directories == (str(x),)
        assert hub.manager.sessions[session].additional_directories == (str(x),)
        listed = await a.request("session/list", {})
        assert listed["sessions"][0]["additionalDirectories"] == [str(x)]


async def test_a_load_that_fails_in_its_replay_drops_what_it_opened(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """Another process deletes the session while the load replays it."""
    store = GatedStore()
    async with open_hub(tmp_path, acp_schema, EchoModel(), store=store) as hub:  # type: ignore[arg-type]
        manager, root = hub.manager, hub.root
        (a,) = await clients(hub, 1)
        session = await a.new_session(str(root))
        await a.request("session/close", {"sessionId": session})
        assert session not in manager.sessions and not manager.workers
        store.reads.armed = True
        store.reads_fail = True
        answers: dict[str, Any] = {}

        async with trio.open_nursery() as n:
            n.start_soon(
                answer_into, answers, "load", a, "session/load", load_params(session, root)
            )
            await store.reads.entered.wait()  # the load has opened the session, replays
            assert session in manager.sessions
            store.reads.opened.set()
        assert answers["load"]["error"]["code"] == -32002  # the load failed ...
        # ... and the session it opened is dropped, its worker with it:
        assert session not in manager.sessions
        assert not manager.workers


async def test_a_load_during_a_delete_is_refused(tmp_path: Path, acp_schema: SchemaChecker) -> None:
    """A delete that found the session not live, then removed its row, once let a load
    make it live in between: left live with nothing stored, every later turn of it failed
    to save (-32603)."""
    store = GatedStore()
    async with open_hub(tmp_path, acp_schema, EchoModel(), store=store) as hub:  # type: ignore[arg-type]
        manager, root = hub.manager, hub.root
        a, b = await clients(hub, 2)
        session = await a.new_session(str(root))
        await a.request("session/close", {"sessionId": session})
        store.deletes.armed = True
        answers: dict[str, Any] = {}

        async with trio.open_nursery() as n:
            n.start_soon(
                answer_into, answers, "delete", b, "session/delete", {"sessionId": session}
            )
            await store.deletes.entered.wait()  # b's delete is removing the row
            answers["load"] = await a.request_raw("session/load", load_params(session, root))
            store.deletes.opened.set()
        assert answers["delete"]["result"] == {}
        assert answers["load"]["error"]["code"] == -32002
        assert "being deleted" in answers["load"]["error"]["message"]
        assert session not in manager.sessions and not manager.workers
        assert await store.get_session(session) is None


async def test_a_prompt_during_a_close_is_refused(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A close waits for the running turn to end; a prompt read after the turn's relay
    finished but before the close resumed once started on the session about to be
    dropped, and ran on after close was answered. The close claims the session first."""
    model = ScriptModel([[{"text": "slow"}, {"sleep": 5}]])
    store = GatedStore()
    async with open_hub(tmp_path, acp_schema, model, store=store) as hub:  # type: ignore[arg-type]
        a, session = await slow_turn_running(hub)
        store.appends.armed = True  # the cancelled turn is held while it is recorded
        answers: dict[str, Any] = {}

        async with trio.open_nursery() as n:
            n.start_soon(answer_into, answers, "close", a, "session/close", {"sessionId": session})
            await store.appends.entered.wait()  # the turn is cancelled and winding down
            answers["prompt"] = await a.request_raw("session/prompt", prompt_params(session, "x"))
            store.appends.opened.set()
        assert answers["close"]["result"] == {}
        assert "is closing" in answers["prompt"]["error"]["message"]
        prompt_answer = await a.wait_for(lambda m: m.get("id") == "p")
        assert prompt_answer["result"] == {"stopReason": "cancelled"}
        assert session not in hub.manager.sessions


async def test_a_cancelled_load_drops_what_it_opened(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    store = GatedStore()
    async with open_hub(tmp_path, acp_schema, EchoModel(), store=store) as hub:  # type: ignore[arg-type]
        (a,) = await clients(hub, 1)
        session = await a.new_session(str(hub.root))
        await a.request("session/close", {"sessionId": session})
        store.reads.armed = True
        await a.send(
            {
                "jsonrpc": "2.0",
                "id": "L",
                "method": "session/load",
                "params": load_params(session, hub.root),
            }
        )
        await store.reads.entered.wait()
        await a.notify("$/cancel_request", {"requestId": "L"})
        answer = await a.wait_for(lambda m: m.get("id") == "L")
        assert "error" in answer and answer["error"]["code"] == -32800
        assert session not in hub.manager.sessions  # not left open without its history


@pytest.mark.parametrize("live", [False, True], ids=["closed", "live"])
async def test_a_cancelled_load_leaves_the_stored_roots_as_they_were(
    tmp_path: Path, acp_schema: SchemaChecker, live: bool
) -> None:
    """A load asking for other ``additionalDirectories`` wrote them to the store before
    its replay. Cancelled in the replay, the session was dropped (or kept the roots it
    had), but the store, and so ``session/list``, reported the new roots. They are
    written once the load has succeeded."""
    store = GatedStore()
    async with open_hub(tmp_path, acp_schema, EchoModel(), store=store) as hub:  # type: ignore[arg-type]
        (hub.root / "x").mkdir()
        (a,) = await clients(hub, 1)
        session = await a.new_session(str(hub.root))
        if not live:
            await a.request("session/close", {"sessionId": session})
        store.reads.armed = True
        params = load_params(session, hub.root, hub.root / "x")
        await a.send({"jsonrpc": "2.0", "id": "L", "method": "session/load", "params": params})
        await store.reads.entered.wait()
        await a.notify("$/cancel_request", {"requestId": "L"})
        answer = await a.wait_for(lambda m: m.get("id") == "L")
        assert answer["error"]["code"] == -32800
        assert (await store.inner.get_session(session)).additional_directories == ()
        if live:
            assert hub.manager.sessions[session].additional_directories == ()
        store.reads.armed = False
        await a.request("session/load", params)  # and a load that succeeds writes them
        stored = (await store.inner.get_session(session)).additional_directories
        assert stored == (str(hub.root / "x"),)


async def test_a_close_during_a_load_is_refused(tmp_path: Path, acp_schema: SchemaChecker) -> None:
    store = GatedStore()
    async with open_hub(tmp_path, acp_schema, EchoModel(), store=store) as hub:  # type: ignore[arg-type]
        manager, root = hub.manager, hub.root
        (a,) = await clients(hub, 1)
        await a.new_session(str(root))  # keeps the worker alive
        session = await a.new_session(str(root))
        await a.prompt(session, "hello")
        await a.request("session/close", {"sessionId": session})
        store.reads.armed = True
        answers: dict[str, Any] = {}

        async with trio.open_nursery() as n:
            n.start_soon(
                answer_into, answers, "load", a, "session/load", load_params(session, root)
            )
            await store.reads.entered.wait()
            answers["close"] = await a.request_raw("session/close", {"sessionId": session})
            store.reads.opened.set()
        await trio.testing.wait_all_tasks_blocked()
        # Refused as a prompt is (it once went ahead, and the load then seeded the worker
        # with the history of a session no longer open): the load completes.
        assert answers["close"]["error"]["code"] == -32600
        assert "still loading" in answers["close"]["error"]["message"]
        assert answers["load"]["result"] == {}
        worker = manager.workers[str(root)].worker
        assert session in manager.sessions and session in worker._history
        await a.request("session/close", {"sessionId": session})  # and closes after it


async def test_a_failed_roots_write_rolls_back(tmp_path: Path, acp_schema: SchemaChecker) -> None:
    """The store cannot write the roots: a session the load opened is dropped, and one
    already open keeps the roots it had."""
    store = GatedStore()
    async with open_hub(tmp_path, acp_schema, EchoModel(), store=store) as hub:  # type: ignore[arg-type]
        manager, root = hub.manager, hub.root
        (root / "x").mkdir()
        (a,) = await clients(hub, 1)
        session = await a.new_session(str(root))
        await a.request("session/close", {"sessionId": session})
        store.updates_fail = True
        params = load_params(session, root, root / "x")
        ans = await a.request_raw("session/load", params)
        assert "error" in ans
        assert session not in manager.sessions and not manager.workers
        store.updates_fail = False
        await a.request("session/load", load_params(session, root))
        store.updates_fail = True
        ans = await a.request_raw("session/load", params)
        assert "error" in ans and manager.sessions[session].additional_directories == ()
        assert not manager.sessions[session].loading


@pytest.mark.parametrize("prompt", ["bad", "boom"])
async def test_a_loaded_session_leaves_refused_and_failed_turns_out_of_the_history(
    tmp_path: Path, acp_schema: SchemaChecker, prompt: str
) -> None:
    """As before the load: a refused turn "won't be included in the next prompt" (the
    schema's StopReason), and the live session leaves out a turn whose model failed, so
    the history seeded from the store skips them too (a failed turn once came back)."""
    model = RefusesBad()
    async with open_hub(tmp_path, acp_schema, model) as hub:
        (a,) = await clients(hub, 1)
        session = await a.new_session(str(hub.root))
        assert await a.prompt(session, "good") == "end_turn"
        ans = await a.request_raw("session/prompt", prompt_params(session, prompt))
        if prompt == "bad":
            assert ans["result"] == {"stopReason": "refusal"}
        else:
            assert "the model failed: RuntimeError" in ans["error"]["message"]
        assert await a.prompt(session, "live") == "end_turn"
        await a.request("session/close", {"sessionId": session})
        await a.request("session/load", load_params(session, hub.root))
        assert await a.prompt(session, "again") == "end_turn"
    good = [("user", "good"), ("agent", "answer to good")]
    assert model.seen[-2] == good
    assert model.seen[-1] == [*good, ("user", "live"), ("agent", "answer to live")]


async def test_a_cancelled_close_leaves_the_session_usable(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A close cancelled ($/cancel_request) while its turn wound down once left the session
    marked closing: every later prompt and load was refused."""
    model = ScriptModel([[{"text": "slow"}, {"sleep": 5}], [{"text": "again"}]])
    store = GatedStore()
    async with open_hub(tmp_path, acp_schema, model, store=store) as hub:  # type: ignore[arg-type]
        a, session = await slow_turn_running(hub)
        store.appends.armed = True
        close = {"jsonrpc": "2.0", "id": "C", "method": "session/close"}
        await a.send({**close, "params": {"sessionId": session}})
        await store.appends.entered.wait()  # the close waits for the cancelled turn
        await a.notify("$/cancel_request", {"requestId": "C"})
        answer = await a.wait_for(lambda m: m.get("id") == "C")
        assert answer["error"]["code"] == -32800
        store.appends.armed = False
        store.appends.opened.set()
        await a.wait_for(lambda m: m.get("id") == "p")
        assert session in hub.manager.sessions and not hub.manager.sessions[session].closing
        assert await a.prompt(session, "again") == "end_turn"


async def test_tool_call_ids_stay_unique_after_a_turn_failed_to_save(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """Tool call ids count the session's turns; counting only the recorded ones, the turn
    after one that failed to save reused the ids the client had just seen."""
    (tmp_path / "a.txt").write_text("a")
    model = ScriptModel([[{"tool": "read_file", "input": {"path": "a.txt"}}]])
    store = GatedStore()
    async with open_hub(tmp_path, acp_schema, model, store=store) as hub:  # type: ignore[arg-type]
        (a,) = await clients(hub, 1)
        session = await a.new_session(str(hub.root))
        store.appends_fail = True
        failed = await a.request_raw("session/prompt", prompt_params(session, "one"))
        assert "not saved" in failed["error"]["message"]
        assert await a.prompt(session, "two") == "end_turn"
        ids = [u["toolCallId"] for u in a.updates(session) if u["sessionUpdate"] == "tool_call"]
    assert ids == ["call_1_1", "call_2_1"]


async def test_a_turn_that_was_not_saved_is_not_in_the_live_history_either(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """The model's history kept a turn whose transcript was not saved: the live session's
    next turn saw it, the same session reloaded from the store did not. It is left out, as
    a turn whose model failed is."""
    model = RefusesBad()
    store = GatedStore()
    async with open_hub(tmp_path, acp_schema, model, store=store) as hub:  # type: ignore[arg-type]
        (a,) = await clients(hub, 1)
        session = await a.new_session(str(hub.root))
        assert await a.prompt(session, "one") == "end_turn"
        store.appends_fail = True
        failed = await a.request_raw("session/prompt", prompt_params(session, "two"))
        assert "not saved" in failed["error"]["message"]
        assert await a.prompt(session, "three") == "end_turn"
        await a.request("session/close", {"sessionId": session})
        await a.request("session/load", load_params(session, hub.root))
        assert await a.prompt(session, "four") == "end_turn"
    one = [("user", "one"), ("agent", "answer to one")]
    three = [("user", "three"), ("agent", "answer to three")]
    assert model.seen[2] == one  # the live turn after the unsaved one
    assert model.seen[3] == one + three  # the reloaded session's: the same turns


async def test_a_turn_that_was_not_saved_does_not_name_the_session(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """The title is sent once the turn that gives it is recorded: a load replays what the
    client was sent (a failed turn's title was sent but never stored)."""
    store = GatedStore()
    async with open_hub(tmp_path, acp_schema, EchoModel(), store=store) as hub:  # type: ignore[arg-type]
        (a,) = await clients(hub, 1)
        session = await a.new_session(str(hub.root))
        store.appends_fail = True
        failed = await a.request_raw("session/prompt", prompt_params(session, "one"))
        assert "not saved" in failed["error"]["message"]
        store.appends_fail = False
        assert await a.prompt(session, "two") == "end_turn"
        titles = [u["title"] for u in a.updates(session) if "title" in u]
        assert titles == ["two"]
        rec = await store.inner.get_session(session)
        assert rec is not None and rec.title == "two"
        kinds = [e.kind for e in await store.inner.transcript(session)]
        assert kinds == ["user_message_chunk", "agent_message_chunk", "session_info_update", "stop"]


async def test_the_title_is_recorded_with_its_turn_not_by_a_write_of_its_own(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """The first prompt's title goes into its turn's commit: a store whose session updates
    fail names the session all the same (the title was once saved by an update after the
    commit; a failed one left the session untitled, the next turn naming it again), and
    the next turns name nothing."""
    store = GatedStore()
    async with open_hub(tmp_path, acp_schema, EchoModel(), store=store) as hub:  # type: ignore[arg-type]
        (a,) = await clients(hub, 1)
        session = await a.new_session(str(hub.root))
        store.updates_fail = True
        assert await a.prompt(session, "hello there") == "end_turn"
        rec = await store.inner.get_session(session)
        assert rec is not None and rec.turns == 1 and rec.title == "hello there"
        kinds = [e.kind for e in await store.inner.transcript(session)]
        assert kinds == ["user_message_chunk", "agent_message_chunk", "session_info_update", "stop"]
        assert await a.prompt(session, "second words") == "end_turn"  # named: no title update
        assert [u["title"] for u in a.updates(session) if "title" in u] == ["hello there"]
        rec = await store.inner.get_session(session)
        assert rec is not None and rec.turns == 2 and rec.title == "hello there"


class DiesAfterCommit(GatedStore):
    """A store whose process dies (here: never comes back) the moment a turn's commit has
    returned: what it holds then is what a restart after a ``kill -9`` there finds."""

    def __init__(self) -> None:
        super().__init__()
        self.committed = trio.Event()

    async def append_turn(self, *args: Any, **kwargs: Any) -> None:
        await self.inner.append_turn(*args, **kwargs)
        self.committed.set()
        await trio.sleep_forever()


async def test_a_crash_right_after_the_first_turn_s_commit_leaves_the_session_named(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """The title is recorded in the transaction of the turn that gives it. It was saved by
    a write of its own once that turn was committed: a kill -9 between the two (a soak saw
    it twice) left a transcript whose replay names the session and a session/list that
    lists it untitled, and the session's next turn then named it after that later prompt."""
    store = DiesAfterCommit()
    async with open_hub(tmp_path, acp_schema, EchoModel(), store=store) as hub:  # type: ignore[arg-type]
        (a,) = await clients(hub, 1)
        session = await a.new_session(str(hub.root))
        await send_prompt(a, "p", session, "name me\nplease")
        await store.committed.wait()
        # (The process dies here: nothing after the commit happens.)
        titles = [
            json.loads(e.payload)["title"] if isinstance(e.payload, str) else e.payload["title"]
            for e in await store.inner.transcript(session)
            if e.kind == "session_info_update"
        ]
        assert titles == ["name me"]
        rec = await store.inner.get_session(session)
        assert rec is not None and rec.turns == 1 and rec.title == "name me"
        hub.nursery.cancel_scope.cancel()


async def test_a_store_failing_a_list_is_an_internal_error_not_a_bad_cursor(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """Every StoreError of a listing was reported as -32602 "cursor is not valid", with no
    cursor sent at all."""
    store = GatedStore()
    async with open_hub(tmp_path, acp_schema, EchoModel(), store=store) as hub:  # type: ignore[arg-type]
        (a,) = await clients(hub, 1)
        bad = await a.request_raw("session/list", {"cursor": "nope"})
        assert bad["error"]["code"] == -32602
        store.lists_fail = True
        ans = await a.request_raw("session/list", {})
        assert ans["error"] == {
            "code": -32603,
            "message": "Internal error: session store: database disk image is malformed",
        }


async def test_a_store_failing_a_delete_is_an_internal_error_and_the_session_stays(
    tmp_path: Path, acp_schema: SchemaChecker, caplog: pytest.LogCaptureFixture
) -> None:
    """A delete the store failed was a handler crash: a traceback in the log and the
    generic -32603. It now names the store's trouble, as every other store failure does,
    and the session (closed by the delete before the store was asked) stays loadable."""
    store = GatedStore()
    async with open_hub(tmp_path, acp_schema, EchoModel(), store=store) as hub:  # type: ignore[arg-type]
        (a,) = await clients(hub, 1)
        session = await a.new_session(str(hub.root))
        store.deletes_fail = True
        ans = await a.request_raw("session/delete", {"sessionId": session})
        assert ans["error"] == {
            "code": -32603,
            "message": "Internal error: session store: disk I/O error",
        }
        assert "Traceback" not in caplog.text
        store.deletes_fail = False
        await a.request("session/load", load_params(session, hub.root))
        assert await a.prompt(session, "still here") == "end_turn"


async def test_a_load_whose_store_read_waited_into_shutdown_opens_nothing(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """The server starts shutting down while a session/load reads the stored session: the
    load is answered "Server is shutting down" and opens nothing (it went on to open the
    session, start a worker for it and replay, on a server cancelling every turn). The
    answer is -32800, the schema's code for a request aborted by a shutdown (it was
    -32603, an internal error)."""
    store = GatedStore()
    async with open_hub(tmp_path, acp_schema, EchoModel(), store=store) as hub:  # type: ignore[arg-type]
        (client,) = await clients(hub, 1)
        session = await client.new_session(str(hub.root))
        await client.request("session/close", {"sessionId": session})
        store.gets = Gate(armed=True)
        answers: dict[str, Any] = {}

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    answer_into,
                    answers,
                    "load",
                    client,
                    "session/load",
                    load_params(session, hub.root),
                )
                await store.gets.entered.wait()
                hub.manager.closing.set()
                await trio.testing.wait_all_tasks_blocked()
                store.gets.opened.set()
        assert answers["load"]["error"] == {"code": -32800, "message": "Server is shutting down"}
        assert session not in hub.manager.sessions and not hub.manager.workers


async def test_a_new_session_whose_path_check_waited_into_shutdown_is_cancelled(
    tmp_path: Path, acp_schema: SchemaChecker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session/new whose cwd check (in a thread) is still walking when the server starts
    shutting down opens nothing, and is answered -32800: the ErrorCode of the schema is
    for "execution of the method ... aborted ... because of resource constraints or
    shutdown", and the cancellation page asks for it on any internal cancellation (a
    client treats it as cancelled, not as the agent failing). It was -32603."""
    from punie_trio._paths import resolved
    from punie_trio.hub import _lifecycle

    entered, release = threading.Event(), threading.Event()

    def slow(path: str) -> str:
        entered.set()
        release.wait(timeout=10)
        return resolved(path)

    async with open_hub(tmp_path, acp_schema, EchoModel()) as hub:
        (client,) = await clients(hub, 1)
        monkeypatch.setattr(_lifecycle, "resolved", slow)
        answers: dict[str, Any] = {}
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                params = {"cwd": str(hub.root), "mcpServers": []}
                nursery.start_soon(answer_into, answers, "new", client, "session/new", params)
                await trio.to_thread.run_sync(entered.wait)
                hub.manager.closing.set()
                await trio.testing.wait_all_tasks_blocked()
                release.set()
        assert answers["new"]["error"] == {"code": -32800, "message": "Server is shutting down"}
        assert hub.manager.sessions == {} and not hub.manager.workers


@asynccontextmanager
async def _a_slow_turn_running(
    tmp_path: Path, acp_schema: SchemaChecker
) -> AsyncIterator[tuple[Hub, ReadsEarly, Any, AcpTestClient, str]]:
    """A hub on a ``ReadsEarly`` store where connection ``a`` (no client id) has a session
    whose first turn streamed "slow" and sleeps; ``b`` is a second client, initialized:
    (hub, store, a, b, session id)."""
    store = ReadsEarly()
    model = ScriptModel([[{"text": "slow"}, {"sleep": 60}], [{"text": "second"}]])
    async with open_hub(tmp_path, acp_schema, model, store=store) as hub:  # type: ignore[arg-type]
        with trio.fail_after(10):
            a = await hub.connect()
            await initialize(a.client)
            session = await a.client.new_session(str(hub.root))
            await send_prompt(a.client, "p", session, "go")
            await a.client.wait_for(has_update(session, "agent_message_chunk", "slow"))
            (b,) = await clients(hub, 1)
        yield hub, store, a, b, session


async def test_a_load_whose_store_read_outlived_the_session_counts_the_turn_recorded_meanwhile(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A session/load reads the stored session while the session is still live on another
    connection, with a turn running; that connection drops (no client id: the session is
    dropped and its cut turn recorded) before the read returns. The load then found no cut
    turn to wait for and opened the session with the turn count it had read (0), while its
    replay, read afterwards, held the cut turn: the loaded session's next turn reused
    number 0 and was answered -32603 "the turn was not saved: ... already has turn 0
    recorded" (a kill -9 soak, reloading a session at once on a new connection after
    dropping the old one mid-turn)."""

    async with _a_slow_turn_running(tmp_path, acp_schema) as (hub, store, a, b, session):
        with trio.fail_after(10):
            store.gets = Gate(armed=True)
            answers: dict[str, Any] = {}

            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    answer_into, answers, "load", b, "session/load", load_params(session, hub.root)
                )
                await store.gets.entered.wait()  # the load reads the stored session...
                store.gets.armed = False
                await a.drop()  # ...while its owner leaves and the cut turn is recorded
                await hub.settle()
                assert session not in hub.manager.sessions and not hub.manager._ending
                assert len(await store.inner.transcript(session)) == 4  # user, slow, title, stop
                store.gets.opened.set()
            assert answers["load"]["result"] == {}, answers
            assert [u["sessionUpdate"] for u in b.updates(session)] == [
                "user_message_chunk",
                "agent_message_chunk",
                "session_info_update",
            ]
            assert hub.manager.sessions[session].turns == 1
            # The next turn is turn 1: recorded, and played as the second.
            answer = await b.request_raw("session/prompt", prompt_params(session, "next"))
            assert answer.get("result") == {"stopReason": "end_turn"}, answer
            assert b.agent_text(session) == "slowsecond"
            # Named by its first turn already (the title read again too): not named again.
            assert [u["sessionUpdate"] for u in b.updates(session)[3:]] == ["agent_message_chunk"]
            assert [e.turn for e in await store.inner.transcript(session)] == [0] * 4 + [1] * 3


async def test_a_load_whose_store_read_a_cut_turns_commit_lands_in_waits_for_it_first(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A session/load arrives while a dropped session's cut turn is still being recorded
    (``_ending``). It read the store first and looked for the cut turn after: the commit
    landed while the read was under way, so the read missed the turn and the look found
    nothing left to wait for. The load opened the session with the turn count before
    it, the replay (read later) held it, and the next turn reused its number: -32603
    "already has turn 0 recorded" (20 times in 635 drop-and-reload rounds of a stress
    run). It now waits for a cut turn before it reads."""
    async with _a_slow_turn_running(tmp_path, acp_schema) as (hub, store, a, b, session):
        with trio.fail_after(10):
            store.appends = Gate(armed=True)  # the cut turn's commit waits...
            await a.drop()
            await store.appends.entered.wait()
            assert session in hub.manager._ending
            store.gets = Gate(armed=True)
            answers: dict[str, Any] = {}

            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    answer_into, answers, "load", b, "session/load", load_params(session, hub.root)
                )
                await hub.settle()  # ...while the load starts (and read, before the fix)
                store.appends.opened.set()
                await hub.settle()  # the cut turn is recorded
                assert not hub.manager._ending
                store.gets.opened.set()
            assert answers["load"]["result"] == {}, answers
            assert hub.manager.sessions[session].turns == 1
            answer = await b.request_raw("session/prompt", prompt_params(session, "next"))
            assert answer.get("result") == {"stopReason": "end_turn"}, answer
            assert b.agent_text(session) == "slowsecond"


async def test_a_load_cancelled_in_its_replay_closes_the_transcript_read(
    tmp_path: Path, acp_schema: SchemaChecker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replay reads the transcript through the store's async generator, a page at a
    time. Cancelled between two pages (a ``$/cancel_request``, a drop, the shutdown), it
    left the generator suspended, to be finalized whenever the garbage collector got to
    it: Trio warned ("Async generator 'SqliteStore.transcript_rows' was garbage collected
    before it had been exhausted"), and the store's read-ahead of the next page ran on
    unowned. It is closed as the load ends, however it ends."""
    from punie_trio.hub import _lifecycle

    monkeypatch.setattr(_lifecycle, "REPLAY_PAGE", 1)
    model = ScriptModel([[{"text": f"chunk {i} "} for i in range(40)]])
    closed: list[str] = []

    class Watched(MemoryStore):
        async def transcript_rows(
            self, session_id: str, page_size: int = 1000
        ) -> AsyncIterator[list[tuple[int, str, str]]]:
            try:
                inner = super().transcript_rows(session_id, page_size)
                async with contextlib.aclosing(inner):
                    async for rows in inner:
                        yield rows
            finally:
                closed.append(trio.lowlevel.current_task().name)

    held = Gate()
    real_send = ClientConnection.send_encoded_many
    pages = 0

    async def send_encoded_many(self: ClientConnection, texts: list[str]) -> None:
        nonlocal pages
        if held.armed:
            pages += 1
            if pages == 2:
                await held.pass_through()  # (a client slow to read: the send waits)
        await real_send(self, texts)

    monkeypatch.setattr(ClientConnection, "send_encoded_many", send_encoded_many)
    gc.collect()  # (what earlier tests left, an unclosed socket, warns before, not here)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await _load_cut_in_its_replay(tmp_path, acp_schema, model, Watched(), held)
        gc.collect()
    assert [str(w.message) for w in caught] == []
    # Closed by the load itself (its handler's task), not left for the garbage collector.
    assert len(closed) == 1 and "asyncgen" not in closed[0], closed


async def _load_cut_in_its_replay(
    tmp_path: Path, acp_schema: SchemaChecker, model: ScriptModel, store: MemoryStore, held: Gate
) -> None:
    async with open_hub(tmp_path, acp_schema, model, store=store) as hub:
        (a,) = await clients(hub, 1)
        session = await a.new_session(str(hub.root))
        await a.prompt(session, "go")
        await a.request("session/close", {"sessionId": session})
        seen = len(a.received)
        held.armed = True
        await a.send(
            {
                "jsonrpc": "2.0",
                "id": "L",
                "method": "session/load",
                "params": load_params(session, hub.root),
            }
        )
        await held.entered.wait()  # the replay's second page waits to be sent
        await a.notify("$/cancel_request", {"requestId": "L"})
        answer = await a.wait_for(lambda m: m.get("id") == "L")
        assert answer["error"]["code"] == -32800
        replayed = [m for m in a.received[seen:] if m.get("method") == "session/update"]
        assert len(replayed) == 1  # cut half-way
