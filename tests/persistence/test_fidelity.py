"""What survives a restart, as the client saw it: real ``serve`` subprocesses on one data
directory, a scripted model that streams every kind of update, prompts of every content
block the agent takes. ``session/load`` after a restart replays each turn exactly as it
was streamed (every update as JSON, key order included, in order), after its prompt's
blocks as ``user_message_chunk``s; what was refused is nowhere; the session's metadata
reads the same in ``session/list`` and the CLI."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import sqlite3
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from punie_trio.hub import Limits
from punie_trio.hub._turns import CUT_TOOL_CALL
from punie_trio.store import MemoryStore
from punie_trio.worker import ScriptModel

from ..acp_schema import SchemaChecker
from ..client import AcpTestClient
from ..integration._support import (
    TOKEN,
    acp_ws_client,
    in_process_server,
    run_punie,
    server_process,
    write_script,
)
from ._hub import expect_error, has_update, initialize, open_hub, prompt_params
from .test_reconnect import open_raw, raw_call, send_unread

BIG = "x" * 70_000 + "\n"  # past the 64 KiB a tool call shows

SCRIPT = [
    [
        {"thought": "The user wants notes. "},
        {"plan": ["Read notes", {"content": "Write todo", "priority": "high"}]},
        {"tool": "read_file", "input": {"path": "notes.txt", "line": 1, "limit": 2}},
        {"tool": "write_file", "input": {"path": "sub/todo.txt", "content": "- ship\n"}},
        {"plan": [{"content": "Read notes", "status": "completed"},
                  {"content": "Write todo", "status": "completed", "priority": "low"}]},
        {"text": "Done: "},
        {"text": "caf\u00e9 \U0001f600 \ud800 \"quoted\"\n\ttab"},
    ],
    [
        {"tool": "read_file", "input": {"path": "../outside.txt"}},
        {"tool": "run_shell", "input": {"command": "ls"}},
        {"tool": "read_file", "input": {"path": "big.txt"}},
        {"text": "this got lon"},
        {"stop": "max_tokens"},
    ],
    [{"stop": "max_turn_requests"}],
    [{"text": "I can't help with that."}, {"stop": "refusal"}],
    [{"text": "working "}, {"sleep": 600}, {"text": "never sent"}],
    [{"thought": "after the cancel"}, {"text": "still here"}],
]  # fmt: skip

# Every content block the agent takes (promptCapabilities: embeddedContext), with the
# optional fields the schema allows.
PROMPTS: list[list[dict[str, Any]]] = [
    [
        {"type": "text", "text": "Read my notes\nand write a todo"},
        {
            "type": "resource_link",
            "name": "notes.txt",
            "uri": "file:///notes.txt",
            "title": "Notes",
            "description": "the notes",
            "mimeType": "text/plain",
            "size": 42,
            "annotations": {"audience": ["user"], "priority": 0.5},
            "_meta": {"editor": {"line": 3}},
        },
    ],
    [
        {"type": "text", "text": "embedded", "annotations": {"lastModified": "2026-01-01"}},
        {
            "type": "resource",
            "resource": {"uri": "file:///a.py", "mimeType": "text/x-python", "text": "x = 1\n"},
        },
        {"type": "resource", "resource": {"uri": "file:///b.bin", "blob": "AAEC"}},
    ],
    [{"type": "text", "text": "third"}],
    [{"type": "text", "text": "refuse this"}],
    [{"type": "text", "text": "cancel this"}],
    [{"type": "text", "text": "after"}],
]


def dumped(updates: list[dict[str, Any]]) -> list[str]:
    """Each update as JSON text, key order kept (what the client parsed, written back)."""
    return [json.dumps(u, ensure_ascii=False) for u in updates]


def user_chunks(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"sessionUpdate": "user_message_chunk", "content": b} for b in blocks]


async def prompt_raw(
    client: AcpTestClient, session_id: str, blocks: list[dict[str, Any]]
) -> dict[str, Any]:
    return await client.request_raw("session/prompt", {"sessionId": session_id, "prompt": blocks})


async def test_every_update_kind_is_replayed_after_a_restart_as_it_was_streamed(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    root = Path(await trio.Path(tmp_path).resolve())
    (root / "sub").mkdir()
    (root / "extra").mkdir()
    (root / "notes.txt").write_text("on disk\n")
    (root / "big.txt").write_text(BIG)
    script = write_script(tmp_path / "script.json", SCRIPT)
    data_dir = tmp_path / "data"
    editor = {str(root / "notes.txt"): "line one\nline two\n"}
    expected: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    with trio.fail_after(60):
        async with (
            server_process(tmp_path, "--model", f"script:{script}") as server,
            acp_ws_client(server.url, acp_schema, token=TOKEN, files=editor) as (client, _),
        ):
            await client.initialize(fs={"readTextFile": True})
            result = await client.request(
                "session/new",
                {
                    "cwd": str(root),
                    "mcpServers": [],
                    "additionalDirectories": [str(root / "extra")],
                },
            )
            session_id = result["sessionId"]
            # Refused at once: an image (promptCapabilities.image is false).
            image = [{"type": "image", "data": "iVBORw0KGgo=", "mimeType": "image/png"}]
            error = await expect_error(
                client, "session/prompt", {"sessionId": session_id, "prompt": image}
            )
            assert error["code"] == -32602
            for blocks in PROMPTS[:4]:
                mark = len(client.updates(session_id))
                answers.append(await prompt_raw(client, session_id, blocks))
                expected += user_chunks(blocks) + client.updates(session_id)[mark:]
            # A turn cancelled while it sleeps.
            mark = len(client.updates(session_id))
            async with trio.open_nursery() as nursery:

                async def cancelled() -> None:
                    answers.append(await prompt_raw(client, session_id, PROMPTS[4]))

                nursery.start_soon(cancelled)
                await client.wait_for(has_update(session_id, "agent_message_chunk", "working "))
                # A prompt while one runs is refused, and leaves nothing.
                error = await expect_error(
                    client, "session/prompt", {"sessionId": session_id, "prompt": PROMPTS[5]}
                )
                assert error["code"] == -32600
                await client.notify("session/cancel", {"sessionId": session_id})
            expected += user_chunks(PROMPTS[4]) + client.updates(session_id)[mark:]
            mark = len(client.updates(session_id))
            answers.append(await prompt_raw(client, session_id, PROMPTS[5]))
            expected += user_chunks(PROMPTS[5]) + client.updates(session_id)[mark:]
            assert [a["result"]["stopReason"] for a in answers] == [
                "end_turn", "max_tokens", "max_turn_requests", "refusal", "cancelled", "end_turn",
            ]  # fmt: skip
            kinds = {u["sessionUpdate"] for u in expected}
            assert kinds == {
                "user_message_chunk",
                "agent_message_chunk",
                "agent_thought_chunk",
                "plan",
                "tool_call",
                "tool_call_update",
                "session_info_update",
            }
            listed_before = await client.request("session/list", {})
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0, server.stderr

        # The CLI reads the same session: its export is the transcript as streamed.
        exported = await run_punie("sessions", "export", session_id, "--data-dir", str(data_dir))
        assert exported.returncode == 0, exported.stderr
        export = json.loads(exported.stdout)
        stored = [e["payload"] for e in export["transcript"] if e["kind"] != "stop"]
        assert dumped(stored) == dumped(expected)
        stops = [e["payload"]["stopReason"] for e in export["transcript"] if e["kind"] == "stop"]
        assert stops == [a["result"]["stopReason"] for a in answers]
        assert export["session"]["title"] == "Read my notes"
        assert export["session"]["additional_directories"] == [str(root / "extra")]

        async with (
            server_process(tmp_path, "--model", f"script:{script}") as server,
            acp_ws_client(server.url, acp_schema, token=TOKEN) as (client, _),
        ):
            await client.initialize()
            assert await client.request("session/list", {}) == listed_before
            mark = len(client.received)
            answer = await client.request_raw(
                "session/load", {"sessionId": session_id, "cwd": str(root), "mcpServers": []}
            )
            assert answer.get("result") == {}, answer
            after = client.received[mark:]
            assert after[-1] is answer
            assert dumped([m["params"]["update"] for m in after[:-1]]) == dumped(expected)
            # The session goes on where it was: the seventh prompt plays turn 0 again, and
            # its tool calls are numbered after the stored ones.
            mark = len(client.updates(session_id))
            assert await client.prompt(session_id, "again") == "end_turn"
            again = client.updates(session_id)[mark:]
            assert [u["toolCallId"] for u in again if u["sessionUpdate"] == "tool_call"] == [
                "call_7_1",
                "call_7_2",
            ]
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0, server.stderr


async def test_a_turn_cut_by_sigterm_is_replayed_as_the_client_saw_it(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    root = Path(await trio.Path(tmp_path).resolve())
    (root / "notes.txt").write_text("notes")
    script = write_script(
        tmp_path / "script.json",
        [[{"text": "reading "}, {"tool": "read_file", "input": {"path": "notes.txt"}},
          {"text": "never sent"}]],
    )  # fmt: skip
    held = trio.Event()

    async def never_answer(method: str, params: dict[str, Any]) -> Any:
        await held.wait()

    with trio.fail_after(60):
        async with (
            server_process(tmp_path, "--model", f"script:{script}") as server,
            acp_ws_client(server.url, acp_schema, token=TOKEN, on_agent_request=never_answer) as (
                client,
                _,
            ),
        ):
            await client.initialize(fs={"readTextFile": True})
            session_id = await client.new_session(str(root))
            await client.send(
                {"jsonrpc": "2.0", "id": "p", "method": "session/prompt",
                 "params": {"sessionId": session_id, "prompt": [{"type": "text", "text": "go"}]}}
            )  # fmt: skip
            await client.wait_for(lambda m: m.get("method") == "fs/read_text_file")
            server.process.send_signal(signal.SIGTERM)
            answer = await client.wait_for(lambda m: m.get("id") == "p" and "method" not in m)
            seen = client.updates(session_id)
            assert await server.process.wait() == 0, server.stderr
            held.set()
        assert answer.get("result") == {"stopReason": "cancelled"}, answer
        statuses = [u.get("status") for u in seen if u["sessionUpdate"] == "tool_call_update"]
        assert statuses == ["in_progress", "failed"], seen

        async with (
            server_process(tmp_path, "--model", f"script:{script}") as server,
            acp_ws_client(server.url, acp_schema, token=TOKEN) as (client, _),
        ):
            await client.initialize()
            await client.request(
                "session/load", {"sessionId": session_id, "cwd": str(root), "mcpServers": []}
            )
            replayed = client.updates(session_id)
            assert dumped(replayed) == dumped(user_chunks([{"type": "text", "text": "go"}]) + seen)


CRASH_SCRIPT = [
    [{"thought": "look"}, {"plan": ["Read notes"]},
     {"tool": "read_file", "input": {"path": "notes.txt"}}, {"text": "a "}, {"text": "b"}],
    [{"text": "short"}],
    [{"text": "one "}, {"tool": "run_shell"}, {"text": "two "}, {"text": "three"}],
]  # fmt: skip
CRASH_CLIENTS = 4


def stored_turns(data_dir: Path) -> dict[str, list[list[tuple[str, dict[str, Any]]]]]:
    """Every session's stored turns, each as its ``(kind, payload)`` entries, read from the
    file as the schema describes it (a turn a row, an entry a line)."""
    turns: dict[str, list[list[tuple[str, dict[str, Any]]]]] = {}
    with contextlib.closing(sqlite3.connect(data_dir / "sessions.sqlite3")) as db:
        for session_id, turn, count, entries in db.execute(
            "SELECT s.id, t.turn, t.count, t.entries FROM turns AS t"
            " JOIN sessions AS s ON s.key = t.session ORDER BY s.id, t.turn"
        ):
            lines = entries.split("\n") if entries else []
            assert len(lines) == count, (session_id, turn)
            parsed = [(k, json.loads(p)) for k, p in (line.split("\t", 1) for line in lines)]
            held = turns.setdefault(session_id, [])
            assert turn == len(held), (session_id, turn)  # no turn missing before it
            held.append(parsed)
    return turns


@pytest.mark.parametrize("seed", range(5))
async def test_kill_9_at_a_random_moment_keeps_every_answered_turn_whole(
    tmp_path: Path, acp_schema: SchemaChecker, seed: int
) -> None:
    """Several clients prompt back to back; ``kill -9`` after a random number of updates
    (seeded). After it: every turn whose prompt was answered is stored, whole and exactly
    as streamed; every stored turn is whole (one the server committed but did not answer
    too: all its script's updates and its stop); the store passes its integrity check;
    a new server's load replays exactly the stored turns."""
    rng = random.Random(seed)
    kill_after = rng.randint(1, 150)  # updates seen over all clients
    root = Path(await trio.Path(tmp_path).resolve())
    (root / "notes.txt").write_text("notes")
    script = write_script(tmp_path / "script.json", CRASH_SCRIPT)
    data_dir = tmp_path / "data"
    # By session: (prompt text, updates streamed, answer) of each answered turn.
    answered: dict[str, list[tuple[str, list[dict[str, Any]], dict[str, Any]]]] = {}
    clients: list[AcpTestClient] = []

    async def prompting(client: AcpTestClient, session_id: str) -> None:
        with contextlib.suppress(ConnectionClosed):  # (the kill)
            for n in range(1000):
                mark = len(client.updates(session_id))
                text = f"{session_id[-4:]} p{n}"
                answer = await prompt_raw(client, session_id, [{"type": "text", "text": text}])
                answered[session_id].append((text, client.updates(session_id)[mark:], answer))

    updates_seen = 0
    enough = trio.Event()

    async def counting(client: AcpTestClient) -> None:
        def count(msg: dict[str, Any]) -> bool:
            nonlocal updates_seen
            updates_seen += msg.get("method") == "session/update"
            return updates_seen >= kill_after

        with contextlib.suppress(AssertionError):  # (closed first: another client counted)
            await client.wait_for(count)
        enough.set()

    with trio.fail_after(60):
        async with (
            server_process(tmp_path, "--model", f"script:{script}") as server,
            contextlib.AsyncExitStack() as stack,
        ):
            sessions = []
            for _ in range(CRASH_CLIENTS):
                client, _ = await stack.enter_async_context(
                    acp_ws_client(server.url, acp_schema, token=TOKEN)
                )
                await client.initialize()
                session_id = await client.new_session(str(root))
                answered[session_id] = []
                clients.append(client)
                sessions.append(session_id)
            async with trio.open_nursery() as nursery:
                for client, session_id in zip(clients, sessions, strict=True):
                    nursery.start_soon(prompting, client, session_id)
                    nursery.start_soon(counting, client)
                await enough.wait()
                server.process.send_signal(signal.SIGKILL)
                assert await server.process.wait() == -signal.SIGKILL
                for client in clients:
                    await client.closed.wait()
                nursery.cancel_scope.cancel()

        stored = stored_turns(data_dir)
        for session_id in sessions:
            turns = stored.get(session_id, [])
            done = answered[session_id]
            assert len(turns) in (len(done), len(done) + 1), (session_id, len(turns), len(done))
            for t, entries in enumerate(turns):
                kinds = [k for k, _ in entries]
                assert kinds[-1] == "stop", (session_id, t)
                assert [k for k in kinds[:-1] if k != "session_info_update"][1:] == [
                    k for k, _ in _script_kinds(t)
                ], (session_id, t, kinds)
                if t < len(done):
                    text, streamed, answer = done[t]
                    assert answer["result"] == {"stopReason": entries[-1][1]["stopReason"]}
                    assert dumped([p for _, p in entries[:-1]]) == dumped(
                        user_chunks([{"type": "text", "text": text}]) + streamed
                    )

        async with (
            server_process(tmp_path, "--model", f"script:{script}") as server,
            acp_ws_client(server.url, acp_schema, token=TOKEN) as (client, _),
        ):
            await client.initialize()
            for session_id in sessions:
                await client.request(
                    "session/load", {"sessionId": session_id, "cwd": str(root), "mcpServers": []}
                )
                replayed = client.updates(session_id)
                assert dumped(replayed) == dumped(
                    [p for turn in stored.get(session_id, []) for k, p in turn if k != "stop"]
                )
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0, server.stderr
    with contextlib.closing(sqlite3.connect(data_dir / "sessions.sqlite3")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def _script_kinds(turn: int) -> list[tuple[str, str]]:
    """The updates turn ``turn`` of :data:`CRASH_SCRIPT` streams, as (kind, status)."""
    kinds: list[tuple[str, str]] = []
    for step in CRASH_SCRIPT[turn % len(CRASH_SCRIPT)]:
        if "text" in step:
            kinds.append(("agent_message_chunk", ""))
        elif "thought" in step:
            kinds.append(("agent_thought_chunk", ""))
        elif "plan" in step:
            kinds.append(("plan", ""))
        elif step["tool"] == "read_file":
            kinds += [("tool_call", ""), ("tool_call_update", ""), ("tool_call_update", "")]
        else:  # an unsupported tool: failed at once
            kinds += [("tool_call", ""), ("tool_call_update", "")]
    return kinds


@attrs.define(eq=False)
class Streamer:
    """Streams ``c0 c1 c2 ...`` without end to a prompt "stream" (until cancelled), fails
    after a chunk to "boom", refuses "bad", answers anything else in one chunk; records
    the history each turn is given."""

    name: str = "streamer"
    seen: list[list[tuple[str, str]]] = attrs.field(factory=list)

    async def run_turn(self, ctx: Any) -> str:
        self.seen.append(list(ctx.history))
        if ctx.prompt_text == "stream":
            for i in range(1_000_000):
                await ctx.text(f"c{i} ")
        await ctx.text(f"answer to {ctx.prompt_text}")
        if ctx.prompt_text == "boom":
            raise RuntimeError("the model exploded")
        return "refusal" if ctx.prompt_text == "bad" else "end_turn"


async def test_the_history_after_a_restart_is_the_live_one_a_cancelled_stream_included(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """The design: a cancelled turn stays in the model's history with the output it had
    streamed (a refused turn and one whose model failed do not). Live, the history held
    a chunk more than the client saw: the chunk the model was emitting when the cancel
    came was counted before it was sent, and never sent or stored, so after a restart
    the same session gave the model another history."""
    root = Path(await trio.Path(tmp_path).resolve())
    live = Streamer()
    with trio.fail_after(30):
        async with (
            in_process_server(tmp_path, live, store="sqlite") as running,
            acp_ws_client(running.url, acp_schema) as (client, _),
        ):
            await client.initialize()
            session_id = await client.new_session(str(root))
            assert await client.prompt(session_id, "hello") == "end_turn"
            answers: list[dict[str, Any]] = []
            async with trio.open_nursery() as nursery:

                async def streaming() -> None:
                    answers.append(
                        await prompt_raw(client, session_id, [{"type": "text", "text": "stream"}])
                    )

                nursery.start_soon(streaming)
                await client.wait_for(has_update(session_id, "agent_message_chunk", "c40 "))
                await client.notify("session/cancel", {"sessionId": session_id})
            assert answers == [answers[0]] and answers[0]["result"] == {"stopReason": "cancelled"}
            streamed = client.agent_text(session_id).removeprefix("answer to hello")
            assert (await prompt_raw(client, session_id, [{"type": "text", "text": "bad"}]))[
                "result"
            ] == {"stopReason": "refusal"}
            failed = await prompt_raw(client, session_id, [{"type": "text", "text": "boom"}])
            assert "the model exploded" in failed["error"]["message"]
            assert await client.prompt(session_id, "last") == "end_turn"
        restarted = Streamer()
        async with (
            in_process_server(tmp_path, restarted, store="sqlite") as running,
            acp_ws_client(running.url, acp_schema) as (client, _),
        ):
            await client.initialize()
            await client.request(
                "session/load", {"sessionId": session_id, "cwd": str(root), "mcpServers": []}
            )
            assert await client.prompt(session_id, "last") == "end_turn"
    expected = [
        ("user", "hello"),
        ("agent", "answer to hello"),
        ("user", "stream"),
        ("agent", streamed),  # what the client saw of it
    ]
    assert live.seen[-1] == expected
    assert restarted.seen[-1] == [*expected, ("user", "last"), ("agent", "answer to last")]


async def test_cancelled_refused_and_failed_turns_replay_after_a_restart_as_streamed(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """Each turn as the client saw it, whatever its end: cancelled mid-stream (its chunks
    up to the cancel), refused, failed by the model (its output, then the -32603 answer),
    answered; a prompt refused at once (too large) leaves nothing."""
    root = Path(await trio.Path(tmp_path).resolve())
    seen: list[dict[str, Any]] = []
    with trio.fail_after(30):
        async with (
            in_process_server(
                tmp_path, Streamer(), store="sqlite", limits=Limits(max_prompt_bytes=1000)
            ) as running,
            acp_ws_client(running.url, acp_schema) as (client, _),
        ):
            await client.initialize()
            session_id = await client.new_session(str(root))
            for text in ("hello", "stream", "bad", "boom", "x" * 2000, "last"):
                blocks = [{"type": "text", "text": text}]
                mark = len(client.updates(session_id))
                if text == "stream":
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(prompt_raw, client, session_id, blocks)
                        await client.wait_for(has_update(session_id, "agent_message_chunk", "c9 "))
                        await client.notify("session/cancel", {"sessionId": session_id})
                else:
                    answer = await prompt_raw(client, session_id, blocks)
                    if "error" in answer:
                        assert answer["error"]["code"] == (-32602 if text[0] == "x" else -32603)
                        if text[0] == "x":
                            continue
                seen += user_chunks(blocks) + client.updates(session_id)[mark:]
        async with (
            in_process_server(tmp_path, Streamer(), store="sqlite") as running,
            acp_ws_client(running.url, acp_schema) as (client, _),
        ):
            await client.initialize()
            await client.request(
                "session/load", {"sessionId": session_id, "cwd": str(root), "mcpServers": []}
            )
            assert dumped(client.updates(session_id)) == dumped(seen)


async def test_the_history_after_a_restart_holds_a_prompt_s_links_and_resources(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """The model is given a prompt as text: its text blocks, its resource links as
    ``[name](uri)``, its embedded resources by content; the live history keeps it so. The
    history a load gives was the text blocks alone: after a restart the model no longer
    saw which files an earlier prompt had pointed it at, nor what they held."""
    root = Path(await trio.Path(tmp_path).resolve())
    blocks: list[dict[str, Any]] = [
        {"type": "text", "text": "Look at these"},
        {"type": "resource_link", "name": "notes.txt", "uri": "file:///notes.txt"},
        {"type": "resource", "resource": {"uri": "file:///a.py", "text": "x = 1\n"}},
        {"type": "resource", "resource": {"uri": "file:///b.bin", "blob": "AAEC"}},
    ]
    said = "Look at these\n[notes.txt](file:///notes.txt)\nx = 1\n\n<file:///b.bin>"
    live, restarted = Streamer(), Streamer()
    with trio.fail_after(30):
        for model in (live, restarted):
            async with (
                in_process_server(tmp_path, model, store="sqlite") as running,
                acp_ws_client(running.url, acp_schema) as (client, _),
            ):
                await client.initialize()
                if model is live:
                    session_id = await client.new_session(str(root))
                    await prompt_raw(client, session_id, blocks)
                else:
                    await client.request(
                        "session/load",
                        {"sessionId": session_id, "cwd": str(root), "mcpServers": []},
                    )
                assert await client.prompt(session_id, "last") == "end_turn"
    assert live.seen[-1] == [("user", said), ("agent", f"answer to {said}")]
    assert restarted.seen[-1][:2] == live.seen[-1], (restarted.seen[-1], live.seen[-1])


async def test_a_tool_call_cut_with_its_relay_ends_failed_in_the_store(
    tmp_path: Path, acp_schema: SchemaChecker, autojump_clock: trio.testing.MockClock
) -> None:
    """A shutdown whose time ran out while a turn's updates waited on a client that reads
    nothing: the turn was cancelled with its tool call running (waiting for the client's
    fs/read_text_file), and its relay was cut before the worker's last update (the call
    ended failed) came through. The turn was stored with the call ``pending`` or
    ``in_progress``, and every load replayed it running for ever. How many chunks come
    first decides where the relay is cut, so the test tries each count. (The clock waits
    for the tool's path check, in a thread: see the ``autojump_clock`` fixture.)"""
    (tmp_path / "notes.txt").write_text("notes")
    store = MemoryStore()
    sessions = []
    for count in range(8, 40):
        turn = [{"text": f"{i} "} for i in range(count)]
        turn += [{"tool": "read_file", "input": {"path": "notes.txt"}}, {"text": "never"}]
        model = ScriptModel([turn])
        async with open_hub(
            tmp_path, acp_schema, model, store=store, limits=Limits(outbox_limit=8)
        ) as hub:
            raw = await open_raw(hub)
            caps = {"fs": {"readTextFile": True}}
            await raw_call(raw, 1, "initialize", {"protocolVersion": 1, "clientCapabilities": caps})
            new = await raw_call(raw, 2, "session/new", {"cwd": str(hub.root), "mcpServers": []})
            sessions.append(new["sessionId"])
            await send_unread(raw, "p", "session/prompt", prompt_params(new["sessionId"], "go"))
            await trio.sleep(1)  # (the clock jumps once the tool's path check is done too)
            hub.manager.closing.set()
            await trio.sleep(1)
        # (then the hub's nursery is cancelled: the shutdown's time is out)
    tool_calls = cut = 0
    async with open_hub(tmp_path, acp_schema, ScriptModel([[]]), store=store) as hub:
        link = await hub.connect()
        await initialize(link.client)
        for session_id in sessions:
            await link.client.request(
                "session/load", {"sessionId": session_id, "cwd": str(hub.root), "mcpServers": []}
            )
            statuses: dict[str, list[str]] = {}
            for u in link.client.updates(session_id):
                if u["sessionUpdate"] in ("tool_call", "tool_call_update") and "status" in u:
                    statuses.setdefault(u["toolCallId"], []).append(u["status"])
            for tool_id, seen in statuses.items():
                assert seen[-1] == "failed", (session_id, tool_id, seen)
                tool_calls += 1
                ended = link.client.updates(session_id)[-2]  # (before the title)
                cut += CUT_TOOL_CALL in str(ended)  # (ended by the relay, not the worker)
            await link.client.request("session/close", {"sessionId": session_id})
    assert tool_calls > cut > 0  # (the counts reach the tool call, some before the cut)
