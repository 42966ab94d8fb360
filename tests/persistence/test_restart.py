"""Sessions survive a server restart: ``session/load`` replays exactly what was streamed,
``session/resume`` brings a session back silently, ``session/list`` pages and filters, and
``session/close`` / ``session/delete`` follow the spec pages. Real in-process servers on a
SQLite store in one data directory, real WebSocket clients."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from punie_trio._paths import store_path
from punie_trio.store import open_sqlite_store
from punie_trio.worker import ScriptModel, TurnContext

from ..acp_schema import SchemaChecker
from ..client import AcpTestClient
from ..integration._support import acp_ws_client, in_process_server
from ..integration.conftest import StartServer
from ._hub import expect_error, has_update, prompt_params, summary

NOTES_IN_EDITOR = "notes from the editor buffer"
PROMPTS = ("Read my notes\nplease", "And now?", "Do you remember?")

PLAN = [
    {"content": "Read notes.txt", "priority": "high", "status": "in_progress"},
    {"content": "Summarise", "priority": "medium", "status": "pending"},
]


def history_script() -> ScriptModel:
    """The n-th prompt of a session plays turn n (the index counts the session's history)."""
    return ScriptModel(
        [
            [
                {"thought": "Let me look at the notes."},
                {"plan": PLAN},
                {"tool": "read_file", "input": {"path": "notes.txt"}},
                {"text": "The notes say: "},
                {"text": "hello."},
            ],
            [{"text": "Second turn, "}, {"thought": "still going"}, {"text": "second answer."}],
            [{"text": "Third turn: I remember two earlier prompts."}],
        ]
    )


def user_chunk(text: str) -> dict[str, Any]:
    return {"sessionUpdate": "user_message_chunk", "content": {"type": "text", "text": text}}


def load_params(session_id: str, cwd: Path) -> dict[str, Any]:
    return {"sessionId": session_id, "cwd": str(cwd), "mcpServers": []}


async def resolved(path: Path) -> Path:
    return Path(await trio.Path(path).resolve())


async def run_turns(
    tmp_path: Path, checker: SchemaChecker, turns: int
) -> tuple[str, list[list[dict[str, Any]]]]:
    """On a first server: one session, ``turns`` prompts; returns the session id and the
    updates streamed by each turn. The server is stopped on return."""
    root = await resolved(tmp_path)
    notes = root / "notes.txt"
    notes.write_text("notes on disk")
    streamed: list[list[dict[str, Any]]] = []
    async with (
        in_process_server(tmp_path, history_script(), store="sqlite") as running,
        acp_ws_client(running.url, checker, files={str(notes): NOTES_IN_EDITOR}) as (client, _),
    ):
        await client.initialize(fs={"readTextFile": True})
        session_id = await client.new_session(str(root))
        for text in PROMPTS[:turns]:
            before = len(client.updates(session_id))
            assert await client.prompt(session_id, text) == "end_turn"
            streamed.append(client.updates(session_id)[before:])
        # The first turn read the file through the client, and streamed every kind.
        assert [r["method"] for r in client.agent_requests] == ["fs/read_text_file"]
        kinds = {u["sessionUpdate"] for u in streamed[0]}
        assert kinds == {
            "agent_thought_chunk",
            "plan",
            "tool_call",
            "tool_call_update",
            "agent_message_chunk",
            "session_info_update",  # the first turn names the session
        }
        assert NOTES_IN_EDITOR in str(streamed[0])
    assert (tmp_path / "data" / "sessions.sqlite3").is_file()
    return session_id, streamed


async def test_initialize_advertises_session_capabilities(
    start_server: StartServer, acp_schema: SchemaChecker
) -> None:
    async with start_server() as running, acp_ws_client(running.url, acp_schema) as (client, _):
        caps = (await client.initialize())["agentCapabilities"]
        assert caps["loadSession"] is True
        for name in ("list", "resume", "close", "delete"):
            assert caps["sessionCapabilities"][name] == {}, name
        # The extensions, advertised as the extensibility page asks.
        assert caps["_meta"] == {
            "punie-trio": {"clientId": True, "reloadRequired": True, "awaiting": True}
        }


async def test_load_after_restart_replays_then_answers_and_keeps_history(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    root = await resolved(tmp_path)
    with trio.fail_after(30):
        session_id, streamed = await run_turns(tmp_path, acp_schema, 2)
        async with (
            in_process_server(tmp_path, history_script(), store="sqlite") as running,
            acp_ws_client(running.url, acp_schema) as (client, _),
        ):
            assert running.manager.sessions == {}  # nothing live: it is all in the store
            await client.initialize(fs={"readTextFile": True})
            mark = len(client.received)
            answer = await client.request_raw("session/load", load_params(session_id, root))
            assert answer.get("result") == {}, answer
            after = client.received[mark:]
            # Every replayed update first, the answer last.
            assert after[-1] is answer
            assert all(m.get("method") == "session/update" for m in after[:-1])
            assert {m["params"]["sessionId"] for m in after[:-1]} == {session_id}
            replayed = [m["params"]["update"] for m in after[:-1]]
            expected: list[dict[str, Any]] = []
            for text, updates in zip(PROMPTS, streamed, strict=False):
                expected += [user_chunk(text), *updates]
            assert replayed == expected

            # The worker got the history: the third prompt plays the third turn.
            before = len(client.updates(session_id))
            assert await client.prompt(session_id, PROMPTS[2]) == "end_turn"
            new = client.updates(session_id)[before:]
            assert [summary(u) for u in new] == [
                ("agent_message_chunk", "Third turn: I remember two earlier prompts.")
            ]

            # session/list knows it after the restart, titled by the first prompt's first line.
            listed = await client.request("session/list", {})
            assert [s["sessionId"] for s in listed["sessions"]] == [session_id]
            assert listed["sessions"][0]["title"] == "Read my notes"
            assert listed["sessions"][0]["cwd"] == str(root)

        # ...and a third server replays all three turns.
        async with (
            in_process_server(tmp_path, history_script(), store="sqlite") as running,
            acp_ws_client(running.url, acp_schema) as (client, _),
        ):
            await client.initialize()
            await client.request("session/load", load_params(session_id, root))
            user_texts = [
                u["content"]["text"]
                for u in client.updates(session_id)
                if u["sessionUpdate"] == "user_message_chunk"
            ]
            assert user_texts == list(PROMPTS)


async def test_resume_after_restart_does_not_replay(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    root = await resolved(tmp_path)
    with trio.fail_after(30):
        session_id, _ = await run_turns(tmp_path, acp_schema, 2)
        async with (
            in_process_server(tmp_path, history_script(), store="sqlite") as running,
            acp_ws_client(running.url, acp_schema) as (client, _),
        ):
            await client.initialize()
            mark = len(client.received)
            result = await client.request(
                "session/resume", {"sessionId": session_id, "cwd": str(root)}
            )
            assert result == {}
            assert [m for m in client.received[mark:] if "method" in m] == []  # no replay
            assert await client.prompt(session_id, PROMPTS[2]) == "end_turn"
            assert client.agent_text(session_id) == "Third turn: I remember two earlier prompts."
            # An unknown session cannot be resumed.
            error = await expect_error(
                client, "session/resume", {"sessionId": "sess_nope", "cwd": str(root)}
            )
            assert error["code"] == -32002


async def create_sessions(client: AcpTestClient, cwd: Path, count: int) -> list[str]:
    return [await client.new_session(str(cwd)) for _ in range(count)]


async def list_all(client: AcpTestClient, **params: Any) -> tuple[list[str], int]:
    """Every session id ``session/list`` pages through, and the number of pages."""
    ids: list[str] = []
    pages = 0
    cursor = None
    while True:
        page = await client.request(
            "session/list", {**params, **({"cursor": cursor} if cursor else {})}
        )
        pages += 1
        assert len(page["sessions"]) <= 50
        ids += [s["sessionId"] for s in page["sessions"]]
        cursor = page.get("nextCursor")
        if cursor is None:
            return ids, pages


async def test_list_filters_by_cwd_and_pages_with_a_cursor(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    root = await resolved(tmp_path)
    sub = root / "sub"
    sub.mkdir()
    (root / "alias").symlink_to(sub)
    with trio.fail_after(60):
        async with (
            in_process_server(tmp_path, history_script(), store="sqlite") as running,
            acp_ws_client(running.url, acp_schema) as (client, _),
        ):
            await client.initialize()
            in_root = await create_sessions(client, root, 51)
            in_sub = await create_sessions(client, sub, 2)

            first = await client.request("session/list", {"cwd": str(root)})
            assert len(first["sessions"]) == 50 and "nextCursor" in first
            ids, pages = await list_all(client, cwd=str(root))
            assert pages == 2
            assert sorted(ids) == sorted(in_root) and len(set(ids)) == 51

            ids, pages = await list_all(client, cwd=str(sub))
            assert (sorted(ids), pages) == (sorted(in_sub), 1)
            # The filter compares resolved paths, as session/new stored them.
            ids, _ = await list_all(client, cwd=str(root / "alias"))
            assert sorted(ids) == sorted(in_sub)

            ids, pages = await list_all(client)
            assert sorted(ids) == sorted(in_root + in_sub) and pages == 2

            # The IDE pages while the agent works: the session on the second page and one
            # already listed get turns between the pages. Each is listed once (the one not
            # yet listed moved ahead of the cursor and was never listed).
            first = await client.request("session/list", {"cwd": str(root)})
            listed = [s["sessionId"] for s in first["sessions"]]
            (unlisted,) = set(in_root) - set(listed)
            assert await client.prompt(unlisted, "touched") == "end_turn"
            assert await client.prompt(listed[-1], "touched too") == "end_turn"
            second = await client.request(
                "session/list", {"cwd": str(root), "cursor": first["nextCursor"]}
            )
            assert [s["sessionId"] for s in second["sessions"]] == [unlisted]
            assert "nextCursor" not in second
            fresh = await client.request("session/list", {"cwd": str(root)})
            assert [s["sessionId"] for s in fresh["sessions"][:2]] == [listed[-1], unlisted]

            error = await expect_error(client, "session/list", {"cursor": "not a cursor"})
            assert error["code"] == -32602 and "cursor" in error["message"]
            error = await expect_error(client, "session/list", {"cwd": "relative/dir"})
            assert error["code"] == -32602 and "cwd" in error["message"]


async def test_list_pages_on_while_sessions_are_created_deleted_and_touched(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """An IDE pages through the history while other work goes on between its pages:
    sessions created, deleted (one already listed, others not yet), and touched by a
    turn. The listing it gets is the sessions as they were when it began, less those
    deleted before their page: each listed once, none skipped, none of the new ones
    (they are first in the next listing), and no cursor after the last page. (The
    stored keyset cursor, docs/sessions-store.md; a randomized run of 100 such listings
    on a real server, 9,588 sessions listed over 239 pages, found no repeat and no
    skip.)"""
    root = await resolved(tmp_path)
    with trio.fail_after(60):
        async with (
            in_process_server(tmp_path, history_script(), store="sqlite") as running,
            acp_ws_client(running.url, acp_schema) as (client, _),
        ):
            await client.initialize()
            before: list[str] = []
            for _ in range(120):  # (closed as they go: 64 may be open on a connection)
                before.append(await client.new_session(str(root)))
                await client.request("session/close", {"sessionId": before[-1]})

            async def churn(deleted: list[str], touched: str) -> list[str]:
                for session_id in deleted:
                    assert await client.request("session/delete", {"sessionId": session_id}) == {}
                await client.request("session/resume", {"sessionId": touched, "cwd": str(root)})
                assert await client.prompt(touched, "touched") == "end_turn"
                await client.request("session/close", {"sessionId": touched})
                return [await client.new_session(str(root)) for _ in range(2)]

            pages = [await client.request("session/list", {})]
            first = [s["sessionId"] for s in pages[0]["sessions"]]
            rest = [i for i in before if i not in first]
            gone = [first[3], rest[0], rest[-1]]  # (one listed, two not yet)
            created = await churn(gone, touched=rest[len(rest) // 2])
            while "nextCursor" in pages[-1]:
                pages.append(
                    await client.request("session/list", {"cursor": pages[-1]["nextCursor"]})
                )
                if len(pages) == 2:
                    listed = {s["sessionId"] for p in pages for s in p["sessions"]}
                    later = [i for i in before if i not in listed and i not in gone]
                    gone.append(later[0])
                    created += await churn([later[0]], touched=first[0])
            ids = [s["sessionId"] for p in pages for s in p["sessions"]]
            assert len(pages) == 3 and len(ids) == len(set(ids))
            assert set(ids) == set(before) - set(gone[1:])  # (gone[0] was listed first)
            assert not set(ids) & set(created)
            fresh = await client.request("session/list", {})
            assert {s["sessionId"] for s in fresh["sessions"][:5]} == {*created, first[0]}


async def prompt_in_background(
    client: AcpTestClient, session_id: str, text: str, answers: list[dict[str, Any]]
) -> None:
    answers.append(await client.request_raw("session/prompt", prompt_params(session_id, text)))


async def test_close_cancels_the_running_turn(
    start_server: StartServer, acp_schema: SchemaChecker
) -> None:
    model = ScriptModel([[{"text": "working"}, {"sleep": 60}, {"text": "never"}]])
    async with start_server(model) as running:
        root = await resolved(Path(running.manager.roots[0]))
        with trio.fail_after(10):
            async with acp_ws_client(running.url, acp_schema) as (client, _):
                await client.initialize()
                session_id = await client.new_session(str(root))
                answers: list[dict[str, Any]] = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(prompt_in_background, client, session_id, "go", answers)
                    await client.wait_for(has_update(session_id, "agent_message_chunk", "working"))
                    assert await client.request("session/close", {"sessionId": session_id}) == {}
                assert answers[0]["result"] == {"stopReason": "cancelled"}
                assert "never" not in client.agent_text(session_id)
                assert session_id not in running.manager.sessions
                assert running.manager.workers == {}

                error = await expect_error(client, "session/prompt", prompt_params(session_id, "x"))
                assert error["code"] == -32002
                error = await expect_error(client, "session/close", {"sessionId": session_id})
                assert error["code"] == -32002

                # Closed is not deleted: it is listed and loads, with the cancelled turn.
                listed = await client.request("session/list", {})
                assert [s["sessionId"] for s in listed["sessions"]] == [session_id]
                mark = len(client.updates(session_id))
                await client.request("session/load", load_params(session_id, root))
                assert [summary(u) for u in client.updates(session_id)[mark:]] == [
                    ("user_message_chunk", "go"),
                    ("agent_message_chunk", "working"),
                    ("session_info_update", "go"),
                ]


@pytest.mark.parametrize("method", ["session/close", "session/delete"])
async def test_close_or_delete_mid_client_call_answers_the_prompt_cancelled_first(
    tmp_path: Path, acp_schema: SchemaChecker, method: str
) -> None:
    """A close (or a delete) of a session whose turn waits on the client (a file read)
    cancels it as ``session/cancel`` would (the session-setup page), in the order the
    prompt-turn and cancellation pages give: the client's pending request is cancelled
    (``$/cancel_request``), the turn's last updates come, the prompt is answered
    ``cancelled``, and only then the close (or delete) itself. A closed session loads
    with the cut turn; a deleted one is gone from the list and from load."""
    root = await resolved(tmp_path)
    (root / "notes.txt").write_text("notes")
    model = ScriptModel([[{"text": "reading"}, {"tool": "read_file",
                          "input": {"path": "notes.txt"}}, {"text": "never"}]])  # fmt: skip
    held = trio.Event()

    async def never_answer(method: str, params: dict[str, Any]) -> Any:
        await held.wait()  # (set at the end: the agent has cancelled it by then)

    with trio.fail_after(30):
        async with (
            in_process_server(tmp_path, model, store="sqlite") as running,
            acp_ws_client(running.url, acp_schema, on_agent_request=never_answer) as (
                client,
                _,
            ),
        ):
            await client.initialize(fs={"readTextFile": True})
            session_id = await client.new_session(str(root))
            await client.send(
                {"jsonrpc": "2.0", "id": "p", "method": "session/prompt",
                 "params": prompt_params(session_id, "go")}
            )  # fmt: skip
            call = await client.wait_for(lambda m: m.get("method") == "fs/read_text_file")
            mark = len(client.received)
            answer = await client.request_raw(method, {"sessionId": session_id})
            after = client.received[mark:]
            assert after[-1] is answer and answer["result"] == {}
            assert after[0] == {
                "jsonrpc": "2.0",
                "method": "$/cancel_request",
                "params": {"requestId": call["id"]},
            }
            assert after[-2] == {"jsonrpc": "2.0", "id": "p", "result": {"stopReason": "cancelled"}}
            assert [summary(m["params"]["update"]) for m in after[1:-2]] == [
                ("tool_call_update", "failed"),
                ("session_info_update", "go"),
            ]
            assert session_id not in running.manager.sessions and not running.manager.workers
            held.set()

            listed = [
                s["sessionId"] for s in (await client.request("session/list", {}))["sessions"]
            ]
            if method == "session/delete":
                assert listed == []
                error = await expect_error(client, "session/load", load_params(session_id, root))
                assert error["code"] == -32002
            else:
                assert listed == [session_id]
                mark = len(client.updates(session_id))
                await client.request("session/load", load_params(session_id, root))
                replayed = [summary(u) for u in client.updates(session_id)[mark:]]
                assert replayed[:2] == [
                    ("user_message_chunk", "go"),
                    ("agent_message_chunk", "reading"),
                ]
                assert replayed[-2:] == [
                    ("tool_call_update", "failed"),
                    ("session_info_update", "go"),
                ]


async def test_turns_cut_by_cancel_replay_after_a_restart_as_they_were_streamed(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A turn cut while its tool call waited on the client (``session/cancel``: the tool
    call ends failed, the prompt ``cancelled``) and one cut by ``$/cancel_request``
    (-32800) are replayed by a restarted server exactly as they were streamed, each after
    its prompt's ``user_message_chunk``, then the answer."""
    root = await resolved(tmp_path)
    (root / "notes.txt").write_text("notes")
    model = ScriptModel([[{"text": "reading"}, {"tool": "read_file",
                          "input": {"path": "notes.txt"}}, {"text": "never"}]])  # fmt: skip
    held = trio.Event()

    async def never_answer(method: str, params: dict[str, Any]) -> Any:
        await held.wait()  # (set at the end: the agent has cancelled it by then)

    streamed: list[dict[str, Any]] = []
    with trio.fail_after(30):
        async with (
            in_process_server(tmp_path, model, store="sqlite") as running,
            acp_ws_client(running.url, acp_schema, on_agent_request=never_answer) as (
                client,
                _,
            ),
        ):
            await client.initialize(fs={"readTextFile": True})
            session_id = await client.new_session(str(root))
            for cut_by in ("session/cancel", "$/cancel_request"):
                mark = len(client.received)
                request_id = f"cut by {cut_by}"
                await client.send(
                    {"jsonrpc": "2.0", "id": request_id, "method": "session/prompt",
                     "params": prompt_params(session_id, cut_by)}
                )  # fmt: skip
                await client.wait_for(
                    lambda m, mark=mark: (
                        m.get("method") == "fs/read_text_file" and client.received.index(m) >= mark
                    )
                )
                if cut_by == "session/cancel":
                    await client.notify(cut_by, {"sessionId": session_id})
                else:
                    await client.notify(cut_by, {"requestId": request_id})
                answer = await client.wait_for(
                    lambda m, r=request_id: m.get("id") == r and "method" not in m
                )
                if cut_by == "session/cancel":
                    assert answer["result"] == {"stopReason": "cancelled"}
                else:
                    assert answer["error"]["code"] == -32800
                streamed.append(user_chunk(cut_by))
                streamed += [
                    m["params"]["update"]
                    for m in client.received[mark:]
                    if m.get("method") == "session/update"
                ]
            held.set()
        statuses = [u.get("status") for u in streamed if u["sessionUpdate"] == "tool_call_update"]
        assert statuses == ["in_progress", "failed", "in_progress", "failed"]
        assert "never" not in str(streamed)

        async with (
            in_process_server(tmp_path, model, store="sqlite") as running,
            acp_ws_client(running.url, acp_schema) as (client, _),
        ):
            await client.initialize()
            mark = len(client.received)
            answer = await client.request_raw("session/load", load_params(session_id, root))
            after = client.received[mark:]
            assert after[-1] is answer and answer["result"] == {}
            assert [m["params"]["update"] for m in after[:-1]] == streamed


async def test_delete_removes_the_session(
    start_server: StartServer, acp_schema: SchemaChecker
) -> None:
    async with start_server() as running:
        root = await resolved(Path(running.manager.roots[0]))
        with trio.fail_after(10):
            async with acp_ws_client(running.url, acp_schema) as (client, _):
                await client.initialize()
                live = await client.new_session(str(root))
                kept = await client.new_session(str(root))
                assert await client.prompt(live, "to be deleted") == "end_turn"
                assert await client.request("session/delete", {"sessionId": live}) == {}
                assert live not in running.manager.sessions

                listed = await client.request("session/list", {})
                assert [s["sessionId"] for s in listed["sessions"]] == [kept]
                error = await expect_error(client, "session/load", load_params(live, root))
                assert error["code"] == -32002
                error = await expect_error(client, "session/prompt", prompt_params(live, "x"))
                assert error["code"] == -32002
                # Deleting again, or a session that never existed, succeeds silently.
                assert await client.request("session/delete", {"sessionId": live}) == {}
                assert await client.request("session/delete", {"sessionId": "sess_never"}) == {}

            # A stored session that is not live (its client left) is deleted too.
            async with acp_ws_client(running.url, acp_schema) as (client, _):
                await client.initialize()
                assert await client.request("session/delete", {"sessionId": kept}) == {}
                assert (await client.request("session/list", {}))["sessions"] == []
                error = await expect_error(
                    client, "session/resume", {"sessionId": kept, "cwd": str(root)}
                )
                assert error["code"] == -32002


async def test_a_session_open_elsewhere_cannot_be_loaded_or_deleted(
    start_server: StartServer, acp_schema: SchemaChecker
) -> None:
    async with start_server() as running:
        root = await resolved(Path(running.manager.roots[0]))
        with trio.fail_after(10):
            async with (
                acp_ws_client(running.url, acp_schema) as (owner, _),
                acp_ws_client(running.url, acp_schema) as (other, _),
            ):
                await owner.initialize()
                await other.initialize()
                session_id = await owner.new_session(str(root))
                for method in ("session/load", "session/resume"):
                    error = await expect_error(other, method, load_params(session_id, root))
                    assert error["code"] == -32600, (method, error)
                    assert "another connection" in error["message"]
                # Refused as held elsewhere (it was "not found", while session/list showed
                # it), for each method that needs the session; the owner keeps it.
                for method in ("session/delete", "session/close", "session/prompt"):
                    params = {"sessionId": session_id, "prompt": [{"type": "text", "text": "x"}]}
                    error = await expect_error(other, method, params)
                    assert error["code"] == -32600, (method, error)
                    assert f"{session_id} is open on another connection" in error["message"]
                assert await owner.prompt(session_id, "still mine") == "end_turn"
                listed = await other.request("session/list", {})
                assert [s["sessionId"] for s in listed["sessions"]] == [session_id]


async def test_list_reports_the_cwd_as_the_client_sent_it(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A session created through a symlinked cwd was listed with the resolved path, which
    differed from the cwd the client set and filtered by (an audit; "cwd is immutable
    after session setup"). It is listed as sent, after a restart too; the filter and
    session/load take either spelling."""
    root = await resolved(tmp_path)
    (root / "site").mkdir()
    (root / "link").symlink_to(root / "site")
    sent = str(root / "link")
    with trio.fail_after(30):
        session_id = ""
        for server in range(2):  # the second server reads it back from the store
            async with (
                in_process_server(tmp_path, history_script(), store="sqlite") as running,
                acp_ws_client(running.url, acp_schema) as (client, _),
            ):
                await client.initialize()
                if server == 0:
                    session_id = await client.new_session(sent)
                for spelling in (sent, str(root / "site"), sent + "/"):
                    listed = await client.request("session/list", {"cwd": spelling})
                    assert [(s["sessionId"], s["cwd"]) for s in listed["sessions"]] == [
                        (session_id, sent)
                    ], spelling
                await client.request("session/load", load_params(session_id, root / "site"))


async def test_list_reports_additional_directories_as_the_client_sent_them(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """``additionalDirectories`` were listed resolved (symlinks followed) beside a cwd
    listed as sent: one session, two spellings. They are listed as the client sent them
    (the last ``session/new`` or ``session/load`` that set them), after a restart too, as
    the cwd is."""
    root = await resolved(tmp_path)
    for name in ("site", "lib", "docs"):
        (root / name).mkdir()
    (root / "link").symlink_to(root / "site")
    (root / "lib-link").symlink_to(root / "lib")
    (root / "docs-link").symlink_to(root / "docs")
    sent = str(root / "link")
    with trio.fail_after(30):
        session_id = ""
        for server in range(2):  # the second server reads it back from the store
            async with (
                in_process_server(tmp_path, history_script(), store="sqlite") as running,
                acp_ws_client(running.url, acp_schema) as (client, _),
            ):
                await client.initialize()
                if server == 0:
                    extra = [str(root / "lib-link"), f"{root}/docs/../docs"]
                    session_id = await client.new_session(sent, additionalDirectories=extra)
                    listed = await client.request("session/list", {})
                    assert listed["sessions"][0]["cwd"] == sent
                    assert listed["sessions"][0]["additionalDirectories"] == extra
                    params = {**load_params(session_id, root / "site")}
                    params["additionalDirectories"] = [str(root / "docs-link")]
                    await client.request("session/load", params)
                listed = await client.request("session/list", {})
                assert [(s["sessionId"], s["cwd"]) for s in listed["sessions"]] == [
                    (session_id, sent)
                ]
                assert listed["sessions"][0]["additionalDirectories"] == [str(root / "docs-link")]


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_a_cursor_continues_only_the_listing_it_came_from(
    tmp_path: Path, acp_schema: SchemaChecker, store: str
) -> None:
    """A ``session/list`` cursor pages the listing it came from, with its ``cwd`` filter:
    sent with another filter (or none), it is -32602 saying so; it was taken as a place in
    the other listing, which then started somewhere in the middle, with no word. Sent
    with the same filter in another spelling, it pages on."""
    root = await resolved(tmp_path)
    for name in ("a", "b"):
        (root / name).mkdir()
    (root / "a-link").symlink_to(root / "a")
    with trio.fail_after(60):
        async with (
            in_process_server(tmp_path, history_script(), store=store) as running,
            acp_ws_client(running.url, acp_schema) as (client, _),
        ):
            await client.initialize()
            for name in ["a"] * 51 + ["b"] * 2:
                session_id = await client.new_session(str(root / name))
                await client.request("session/close", {"sessionId": session_id})
            first = await client.request("session/list", {"cwd": str(root / "a")})
            cursor = first["nextCursor"]
            for other in ({"cwd": str(root / "b")}, {}):
                error = await expect_error(client, "session/list", {**other, "cursor": cursor})
                assert error["code"] == -32602, error
                assert "cursor" in error["message"] and "another" in error["message"], error
            rest = await client.request(
                "session/list", {"cwd": str(root / "a-link"), "cursor": cursor}
            )
            listed = first["sessions"] + rest["sessions"]
            assert len({s["sessionId"] for s in listed}) == 51 and "nextCursor" not in rest
            unfiltered = await client.request("session/list", {})
            error = await expect_error(
                client, "session/list", {"cwd": str(root / "a"), "cursor": unfiltered["nextCursor"]}
            )
            assert error["code"] == -32602 and "another" in error["message"], error


@asynccontextmanager
async def serving_only(
    project: Path, data_dir: Path, acp_schema: SchemaChecker
) -> AsyncIterator[AcpTestClient]:
    """A server on ``data_dir`` that serves ``project`` alone (a store outlives
    ``--project`` choices), and a client of it, initialized."""
    from punie_trio.server import ServeConfig, serve

    config = ServeConfig(
        projects=(project,),
        model=history_script(),
        port=0,
        handle_signals=False,
        data_dir=data_dir,
        store="sqlite",
    )
    async with trio.open_nursery() as nursery:
        narrowed = await nursery.start(serve, config)
        assert narrowed.url is not None
        async with acp_ws_client(narrowed.url, acp_schema) as (client, _):
            await client.initialize()
            yield client
        narrowed.closing.set()


async def test_list_shows_only_sessions_under_served_roots(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A store outlives ``--project`` choices: a server lists (and loads) only the sessions
    under the roots it serves now; a delete of another root's session answers as for an
    unknown id and leaves it stored."""
    root = await resolved(tmp_path)
    (root / "a").mkdir()
    (root / "b").mkdir()
    with trio.fail_after(30):
        async with (
            in_process_server(tmp_path, history_script(), store="sqlite") as running,
            acp_ws_client(running.url, acp_schema) as (client, _),
        ):
            await client.initialize()
            in_a = await client.new_session(str(root / "a"))
            in_b = await client.new_session(str(root / "b"))
        async with serving_only(root / "a", tmp_path / "data", acp_schema) as client:
            listed = await client.request("session/list", {})
            assert [s["sessionId"] for s in listed["sessions"]] == [in_a]
            error = await expect_error(client, "session/load", load_params(in_b, root / "a"))
            assert error["code"] == -32002
            assert await client.request("session/delete", {"sessionId": in_b}) == {}
        async with open_sqlite_store(store_path(tmp_path / "data")) as store:
            assert await store.get_session(in_b) is not None


async def test_list_pages_hold_only_served_sessions_and_end_when_they_do(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """Sessions of a root no longer served are left out by the store's query, not from
    each page after it: 51 newer sessions of another root once made the first page
    ``{"sessions": [], "nextCursor": ...}`` and hid the one served session behind pages
    of nothing (a client showing the first page showed no history)."""
    root = await resolved(tmp_path)
    (root / "a").mkdir()
    (root / "b").mkdir()
    with trio.fail_after(30):
        async with (
            in_process_server(tmp_path, history_script(), store="sqlite") as running,
            acp_ws_client(running.url, acp_schema) as (client, _),
        ):
            await client.initialize()
            in_a = await client.new_session(str(root / "a"))
            for _ in range(51):  # (newer: listed before in_a)
                session_id = await client.new_session(str(root / "b"))
                await client.request("session/close", {"sessionId": session_id})
        async with serving_only(root / "a", tmp_path / "data", acp_schema) as client:
            listed = await client.request("session/list", {})
            assert [s["sessionId"] for s in listed["sessions"]] == [in_a]
            assert "nextCursor" not in listed
            listed = await client.request("session/list", {"cwd": str(root / "b")})
            assert listed == {"sessions": []}


@attrs.define(eq=False)
class HistoryRecorder:
    """Answers ``answer to <prompt>`` in two chunks and records the history it was given."""

    name: str = "recorder"
    seen: list[list[tuple[str, str]]] = attrs.field(factory=list)

    async def run_turn(self, ctx: TurnContext) -> str:
        self.seen.append(list(ctx.history))
        await ctx.text("answer to ")
        await ctx.text(ctx.prompt_text)
        return "end_turn"


@pytest.mark.parametrize("stored_by", ["this version", "an older version"])
async def test_load_gives_the_model_its_history(
    tmp_path: Path, acp_schema: SchemaChecker, stored_by: str
) -> None:
    """The history rides on each turn's stop entry; a store written before it did (stop
    entries with only ``stopReason``) is read from the message chunks instead."""
    root = await resolved(tmp_path)
    with trio.fail_after(30):
        async with (
            in_process_server(tmp_path, HistoryRecorder(), store="sqlite") as running,
            acp_ws_client(running.url, acp_schema) as (client, _),
        ):
            await client.initialize()
            session_id = await client.new_session(str(root))
            for text in ("first\nprompt", "second"):
                assert await client.prompt(session_id, text) == "end_turn"
        if stored_by == "an older version":
            assert (
                _strip_stop_history(tmp_path / "data" / "sessions.sqlite3")
                == ['{"stopReason":"end_turn"}'] * 2
            )
        recorder = HistoryRecorder()
        async with (
            in_process_server(tmp_path, recorder, store="sqlite") as running,
            acp_ws_client(running.url, acp_schema) as (client, _),
        ):
            await client.initialize()
            await client.request("session/load", load_params(session_id, root))
            assert await client.prompt(session_id, "third") == "end_turn"
    assert recorder.seen == [
        [
            ("user", "first\nprompt"),
            ("agent", "answer to first\nprompt"),
            ("user", "second"),
            ("agent", "answer to second"),
        ]
    ]


def _strip_stop_history(path: Path) -> list[str]:
    """Rewrite every stored stop entry as an older version wrote it (only ``stopReason``);
    return the stop payloads. A turn is one ``turns`` row of ``kind TAB payload`` lines."""
    stops: list[str] = []
    with sqlite3.connect(path) as db:
        for rowid, entries in db.execute("SELECT rowid, entries FROM turns").fetchall():
            lines = []
            for line in entries.split("\n"):
                kind, payload = line.split("\t", 1)
                if kind == "stop":
                    payload = json.dumps(
                        {"stopReason": json.loads(payload)["stopReason"]}, separators=(",", ":")
                    )
                    stops.append(payload)
                lines.append(f"{kind}\t{payload}")
            db.execute("UPDATE turns SET entries = ? WHERE rowid = ?", ("\n".join(lines), rowid))
    return stops


async def test_tool_call_ids_are_unique_within_the_session_across_restarts(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """The schema: ``toolCallId`` is "unique ... within the session". Numbered per turn,
    every turn's first tool call was ``call_1``, and an IDE that updates a tool call by its
    id overwrote the earlier turn's."""
    root = await resolved(tmp_path)
    (root / "a.txt").write_text("a")
    read = {"tool": "read_file", "input": {"path": "a.txt"}}
    model = ScriptModel([[read, read], [read], [read]])
    created: list[str] = []

    def tool_calls(client: AcpTestClient, session_id: str) -> list[str]:
        return [
            u["toolCallId"] for u in client.updates(session_id) if u["sessionUpdate"] == "tool_call"
        ]

    with trio.fail_after(30):
        async with (
            in_process_server(tmp_path, model, store="sqlite") as running,
            acp_ws_client(running.url, acp_schema) as (client, _),
        ):
            await client.initialize()
            session_id = await client.new_session(str(root))
            for text in ("one", "two"):
                assert await client.prompt(session_id, text) == "end_turn"
            created += tool_calls(client, session_id)
        async with (
            in_process_server(tmp_path, model, store="sqlite") as running,
            acp_ws_client(running.url, acp_schema) as (client, _),
        ):
            await client.initialize()
            await client.request("session/load", load_params(session_id, root))
            assert tool_calls(client, session_id) == created  # the replay: the same ids
            assert await client.prompt(session_id, "three") == "end_turn"
            created += tool_calls(client, session_id)[len(created) :]
    assert created == ["call_1_1", "call_1_2", "call_2_1", "call_3_1"]


async def test_a_damaged_session_fails_its_load_alone(
    tmp_path: Path, acp_schema: SchemaChecker, caplog: pytest.LogCaptureFixture
) -> None:
    """A stored payload edited into bad JSON was spliced into session/load's notifications
    unread (the client's JSON parser died on them); a session row that did not decode made
    session/list fail for every session. Now the load fails naming the damage and sends
    nothing of it, the list leaves the bad row out, and every other session works."""
    root = await resolved(tmp_path)
    async with in_process_server(tmp_path, history_script(), store="sqlite") as running:
        async with acp_ws_client(running.url, acp_schema) as (client, _):
            await client.initialize()
            sessions = [await client.new_session(str(root)) for _ in range(3)]
            for session in sessions:
                await client.prompt(session, "hello")
        bad_transcript, bad_row, good = sessions
        with sqlite3.connect(store_path(tmp_path / "data")) as db:
            db.execute(
                "UPDATE turns SET entries = substr(entries, 1, length(entries) - 1)"
                " WHERE session = (SELECT key FROM sessions WHERE id = ?)",
                (bad_transcript,),
            )
            db.execute("UPDATE sessions SET config = '{' WHERE id = ?", (bad_row,))
        db.close()
    async with (
        in_process_server(tmp_path, history_script(), store="sqlite") as running,
        acp_ws_client(running.url, acp_schema) as (client, _),
    ):
        await client.initialize()
        listed = await client.request("session/list", {})
        assert {s["sessionId"] for s in listed["sessions"]} == {bad_transcript, good}
        error = await expect_error(client, "session/load", load_params(bad_transcript, root))
        assert error["code"] == -32603
        assert f"session '{bad_transcript}' is damaged at entry" in error["message"]
        error = await expect_error(client, "session/load", load_params(bad_row, root))
        assert error["code"] == -32603
        assert f"stored session '{bad_row}' is damaged" in error["message"]
        assert "Traceback" not in caplog.text  # a warning naming the damage, no more
        assert not client.updates(bad_transcript)  # nothing of the damaged turn
        await client.request("session/load", load_params(good, root))
        assert client.updates(good)  # (each checked against the schema by the client)
        assert await client.prompt(good, "again") == "end_turn"
