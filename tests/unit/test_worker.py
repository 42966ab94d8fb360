"""The project worker, driven directly through its command channel (no manager)."""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import io
import itertools
import os
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from punie_trio.acp import ClientCapabilities
from punie_trio.worker import (
    CancelTurn,
    ClientCall,
    ClientReply,
    Command,
    EchoModel,
    ForgetSession,
    ForgetTurn,
    Model,
    ProjectWorker,
    ScriptModel,
    SeedHistory,
    StartTurn,
    ToolCallLimiter,
    TurnContext,
    TurnEnv,
    TurnEvent,
    TurnFinished,
    Update,
)
from punie_trio.worker import _tools as tools_module
from punie_trio.worker._tools import SHOWN_OUTPUT_CHARS, _take_lines
from punie_trio.worker._worker import COMMANDS_PER_STEP, EMIT_YIELD_EVERY

from ..models import RefusesBad

_turn_ids = itertools.count(1)


@attrs.define(eq=False)
class Harness:
    worker: ProjectWorker
    commands: trio.MemorySendChannel[Command]
    root: Path
    numbers: collections.Counter[str] = attrs.field(factory=collections.Counter)

    def env(
        self,
        session_id: str = "s1",
        *,
        cwd: Path | None = None,
        read: bool = False,
        write: bool = False,
    ) -> TurnEnv:
        return TurnEnv(
            session_id,
            str(cwd or self.root),
            (str(self.root),),
            ClientCapabilities(read_text_file=read, write_text_file=write),
        )

    async def start(
        self, prompt: str = "hi", env: TurnEnv | None = None, buffer: int = 64
    ) -> tuple[int, trio.MemoryReceiveChannel[TurnEvent]]:
        send, receive = trio.open_memory_channel[TurnEvent](buffer)
        turn_id = next(_turn_ids)
        blocks = ({"type": "text", "text": prompt},)
        env = env or self.env()
        number = self.numbers[env.session_id]  # (the manager counts recorded turns)
        self.numbers[env.session_id] += 1
        start = StartTurn(turn_id, env, prompt, blocks, send, number)
        await self.commands.send(start)
        return turn_id, receive

    async def run_turn(
        self, prompt: str = "hi", env: TurnEnv | None = None
    ) -> tuple[list[dict[str, Any]], TurnFinished]:
        _, events = await self.start(prompt, env)
        return await collect(events)


async def collect(
    events: trio.MemoryReceiveChannel[TurnEvent],
) -> tuple[list[dict[str, Any]], TurnFinished]:
    """Read a turn's events (no client calls expected) to its TurnFinished."""
    updates: list[dict[str, Any]] = []
    with trio.fail_after(60):
        async for event in events:
            if isinstance(event, Update):
                updates.append(event.update)
            elif isinstance(event, TurnFinished):
                # The worker closes the channel right after.
                with pytest.raises(trio.EndOfChannel):
                    await events.receive()
                return updates, event
            else:
                raise AssertionError(f"unexpected {event!r}")
    raise AssertionError("event channel closed without TurnFinished")


@asynccontextmanager
async def running_worker(root: Path, model: Model) -> AsyncIterator[Harness]:
    send, receive = trio.open_memory_channel[Command](16)
    worker = ProjectWorker(str(root), model, receive)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        async with send:
            yield Harness(worker, send, root)
        # Closing the command channel ends run(); the nursery then exits by itself.


def script(*turns: list[dict[str, Any]]) -> ScriptModel:
    return ScriptModel([list(t) for t in turns])


# -- turns ------------------------------------------------------------------------------------


async def test_echo_turn(tmp_path: Path) -> None:
    async with running_worker(tmp_path, EchoModel()) as h:
        updates, finished = await h.run_turn("hello brave new world")
    assert finished == TurnFinished("end_turn")
    assert all(u["sessionUpdate"] == "agent_message_chunk" for u in updates)
    assert "".join(u["content"]["text"] for u in updates) == "hello brave new world"


async def test_scripted_turn_emits_updates_in_order(tmp_path: Path) -> None:
    model = script(
        [
            {"thought": "let me think"},
            {"plan": ["read", {"content": "answer", "priority": "high", "status": "in_progress"}]},
            {"text": "Hello, "},
            {"text": "world"},
            {"stop": "max_tokens"},
            {"text": "not sent"},
        ]
    )
    async with running_worker(tmp_path, model) as h:
        updates, finished = await h.run_turn()
    assert finished == TurnFinished("max_tokens")
    assert updates == [
        {
            "sessionUpdate": "agent_thought_chunk",
            "content": {"type": "text", "text": "let me think"},
        },
        {
            "sessionUpdate": "plan",
            "entries": [
                {"content": "read", "priority": "medium", "status": "pending"},
                {"content": "answer", "priority": "high", "status": "in_progress"},
            ],
        },
        {"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": "Hello, "}},
        {"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": "world"}},
    ]


async def test_turns_cycle_per_session_turn_number(tmp_path: Path) -> None:
    """The script model plays the session's n-th turn for its n-th prompt: the turn
    number the manager counts (recorded turns, so a loaded session goes on from there)."""
    model = script([{"text": "first"}], [{"text": "second"}])

    def text(updates: list[dict[str, Any]]) -> str:
        return "".join(u["content"]["text"] for u in updates)

    async with running_worker(tmp_path, model) as h:
        a1, _ = await h.run_turn(env=h.env("a"))
        a2, _ = await h.run_turn(env=h.env("a"))
        b1, _ = await h.run_turn(env=h.env("b"))
        a3, _ = await h.run_turn(env=h.env("a"))
        h.numbers["c"] = 1  # a session loaded with one recorded turn
        c1, _ = await h.run_turn(env=h.env("c"))
    assert [text(u) for u in (a1, a2, b1, a3, c1)] == [
        "first",
        "second",
        "first",
        "first",
        "second",
    ]


async def test_a_refused_turn_is_left_out_of_the_next_turns_history(tmp_path: Path) -> None:
    """The schema's StopReason: after a refusal, "the user prompt and everything that
    comes after it won't be included in the next prompt"."""
    model = RefusesBad()
    async with running_worker(tmp_path, model) as h:
        for prompt in ("good", "bad", "again"):
            await h.run_turn(prompt)
        # A loaded session's history is seeded; a forgotten one starts empty.
        await h.commands.send(SeedHistory("c", (("user", "q"), ("agent", "a"))))
        await h.run_turn("more", env=h.env("c"))
        await h.commands.send(ForgetSession("s1"))
        await h.run_turn("anew")
    assert model.seen[2] == [("user", "good"), ("agent", "answer to good")]
    assert model.seen[3] == [("user", "q"), ("agent", "a")]
    assert model.seen[4] == []


async def test_forget_turn_drops_only_the_last_kept_turn_it_names(tmp_path: Path) -> None:
    """A turn whose transcript was not saved leaves the history (the hub's ForgetTurn);
    one that is not the last kept (a stale or repeated command) changes nothing."""
    model = RefusesBad()
    async with running_worker(tmp_path, model) as h:
        first, events = await h.start("one")
        await collect(events)
        second, events = await h.start("two")
        await collect(events)
        await h.commands.send(ForgetTurn("s1", first))  # not the last: kept
        await h.commands.send(ForgetTurn("s1", second))
        await h.commands.send(ForgetTurn("s1", second))  # again: nothing more goes
        await h.run_turn("three")
    assert model.seen[2] == [("user", "one"), ("agent", "answer to one")]


async def test_cancel_during_sleep(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    model = script([{"text": "before"}, {"sleep": 30}, {"text": "after"}])
    async with running_worker(tmp_path, model) as h:
        turn_id, events = await h.start()
        first = await events.receive()
        assert isinstance(first, Update)
        assert first.update["content"]["text"] == "before"
        await trio.testing.wait_all_tasks_blocked()
        assert h.worker.running_turns == 1
        started = trio.current_time()
        await h.commands.send(CancelTurn(turn_id))
        updates, finished = await collect(events)
        assert trio.current_time() - started < 30
        assert h.worker.running_turns == 0
        # Cancelling a finished or unknown turn is harmless.
        await h.commands.send(CancelTurn(turn_id))
        await h.commands.send(CancelTurn(99999))
    assert updates == []
    assert finished == TurnFinished("cancelled")


async def test_a_cancelled_turn_ends_its_running_tool_call_failed(tmp_path: Path) -> None:
    """A tool call left in_progress by a cancel spins in the IDE for ever (both live and
    in a session/load replay): the turn reports it failed before it finishes."""
    (tmp_path / "a.txt").write_text("a")
    read = {"tool": "read_file", "input": {"path": "a.txt"}}
    model = script([read, read])  # the first finishes, the second waits for the client
    async with running_worker(tmp_path, model) as h:
        turn_id, events = await h.start(env=h.env(read=True))
        first_call = None
        while True:
            event = await events.receive()
            if isinstance(event, ClientCall):
                if first_call is None:
                    first_call = event
                    await h.commands.send(
                        ClientReply(turn_id, event.call_id, result={"content": "a"})
                    )
                    continue
                break  # the second call: its client never answers
        await h.commands.send(CancelTurn(turn_id))
        updates, finished = await collect(events)
    assert finished == TurnFinished("cancelled")
    assert updates == [
        {
            "sessionUpdate": "tool_call_update",
            "toolCallId": "call_1_2",
            "status": "failed",
            "content": [{"type": "content", "content": {"type": "text", "text": "cancelled"}}],
        }
    ]


async def cancelled_in_its_tool_call(h: Any) -> tuple[list[dict[str, Any]], TurnFinished]:
    """Start a turn, cancel it once its (first) tool call runs, and collect the rest."""
    turn_id, events = await h.start()
    assert (await events.receive()).update["status"] == "pending"  # type: ignore[union-attr]
    assert (await events.receive()).update["status"] == "in_progress"  # type: ignore[union-attr]
    await h.commands.send(CancelTurn(turn_id))
    updates, finished = await collect(events)
    return updates, finished


async def test_a_tool_run_that_outlives_the_cancel_still_ends_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """A tool whose run finishes regardless of the cancel (a disk read in a thread) came
    back to an emit that raised Cancelled: its call was dropped from the open ones without
    its last update, and stayed in_progress for ever."""
    from punie_trio.worker import _tools

    async def uncancellable(env: Any, tool_input: Any, call: Any, path: Any, state: Any) -> str:
        with trio.CancelScope(shield=True):
            await trio.sleep(1)
        return "done"

    monkeypatch.setitem(
        _tools.TOOLS, "slow", _tools.ToolSpec("read", "Slow", uncancellable, uses_path=False)
    )
    async with running_worker(tmp_path, script([{"tool": "slow", "input": {}}])) as h:
        updates, finished = await cancelled_in_its_tool_call(h)
    assert finished == TurnFinished("cancelled")
    assert [(u["toolCallId"], u["status"]) for u in updates] == [("call_1_1", "failed")]


async def test_cancelled_turn_counts_in_history(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    model = script([{"sleep": 30}, {"text": "zero"}], [{"text": "one"}])
    async with running_worker(tmp_path, model) as h:
        turn_id, events = await h.start()
        await trio.testing.wait_all_tasks_blocked()
        await h.commands.send(CancelTurn(turn_id))
        _, finished = await collect(events)
        assert finished.stop_reason == "cancelled"
        # A cancelled turn completed without error, so it counts in the history.
        updates, _ = await h.run_turn()
    assert updates[0]["content"]["text"] == "one"


async def test_model_error_ends_turn_not_worker(tmp_path: Path) -> None:
    @attrs.define
    class Boom:
        name: str = "boom"
        calls: int = 0

        async def run_turn(self, ctx: TurnContext) -> str:
            self.calls += 1
            await ctx.text("partial")
            if self.calls == 1:
                raise RuntimeError("model exploded")
            return "end_turn"

    async with running_worker(tmp_path, Boom()) as h:
        updates, finished = await h.run_turn()
        assert updates[0]["content"]["text"] == "partial"
        assert finished.error == "RuntimeError: model exploded"
        assert finished.stop_reason == "end_turn"
        # The worker still runs turns afterwards.
        _, second = await h.run_turn()
    assert second == TurnFinished("end_turn")


async def test_turn_whose_client_left_ends_as_cancelled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    model = script([{"sleep": 1}, {"text": "nobody listens"}, {"text": "more"}])
    async with running_worker(tmp_path, model) as h:
        _, events = await h.start()
        await events.aclose()
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(2)
        await trio.testing.wait_all_tasks_blocked()
        assert h.worker.running_turns == 0


# -- tools ------------------------------------------------------------------------------------


async def test_read_file_through_the_client(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    model = script([{"tool": "read_file", "input": {"path": "src/a.py", "line": 2, "limit": 3}}])
    async with running_worker(tmp_path, model) as h:
        turn_id, events = await h.start(env=h.env(read=True))
        tool_call = await events.receive()
        in_progress = await events.receive()
        call = await events.receive()
        assert isinstance(tool_call, Update) and isinstance(in_progress, Update)
        assert tool_call.update == {
            "sessionUpdate": "tool_call",
            "toolCallId": "call_1_1",
            "title": "Read file src/a.py",
            "kind": "read",
            "status": "pending",
            "rawInput": {"path": "src/a.py", "line": 2, "limit": 3},
            "locations": [{"path": str(tmp_path / "src" / "a.py")}],  # absolute (the schema)
        }
        assert in_progress.update == {
            "sessionUpdate": "tool_call_update",
            "toolCallId": "call_1_1",
            "status": "in_progress",
        }
        assert isinstance(call, ClientCall)
        assert call.method == "fs/read_text_file"
        assert call.params == {
            "sessionId": "s1",
            "path": str(tmp_path / "src" / "a.py"),
            "line": 2,
            "limit": 3,
        }
        # A reply for a wrong call id or turn is ignored.
        await h.commands.send(ClientReply(turn_id, call.call_id + 100, result={"content": "x"}))
        await h.commands.send(ClientReply(turn_id + 100, call.call_id, result={"content": "x"}))
        await h.commands.send(ClientReply(turn_id, call.call_id, result={"content": "print(1)\n"}))
        updates, finished = await collect(events)
    assert finished == TurnFinished("end_turn")
    assert updates == [
        {
            "sessionUpdate": "tool_call_update",
            "toolCallId": "call_1_1",
            "status": "completed",
            "content": [{"type": "content", "content": {"type": "text", "text": "print(1)\n"}}],
            "rawOutput": {"output": "print(1)\n"},
        }
    ]


async def test_client_error_reply_fails_the_tool_call(tmp_path: Path) -> None:
    model = script([{"tool": "read_file", "input": {"path": "missing.txt"}}, {"text": "go on"}])
    async with running_worker(tmp_path, model) as h:
        turn_id, events = await h.start(env=h.env(read=True))
        await events.receive()
        await events.receive()
        call = await events.receive()
        assert isinstance(call, ClientCall)
        await h.commands.send(
            ClientReply(turn_id, call.call_id, error_code=-32002, error_message="no such file")
        )
        updates, finished = await collect(events)
    assert updates[0]["status"] == "failed"
    assert updates[0]["content"][0]["content"]["text"] == "no such file"
    assert updates[1]["content"]["text"] == "go on"
    assert finished == TurnFinished("end_turn")


async def test_client_reply_without_content_fails_the_tool_call(tmp_path: Path) -> None:
    model = script([{"tool": "read_file", "input": {"path": "a.txt"}}])
    async with running_worker(tmp_path, model) as h:
        turn_id, events = await h.start(env=h.env(read=True))
        await events.receive()
        await events.receive()
        call = await events.receive()
        assert isinstance(call, ClientCall)
        await h.commands.send(ClientReply(turn_id, call.call_id, result={"nope": 1}))
        updates, _ = await collect(events)
    assert updates[0]["status"] == "failed"
    assert "content" in updates[0]["content"][0]["content"]["text"]


async def test_read_and_write_file_on_disk_without_client_capability(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("on disk", encoding="utf-8")
    model = script(
        [
            {"tool": "read_file", "input": {"path": "in.txt"}},
            {"tool": "write_file", "input": {"path": "out.txt", "content": "written é"}},
            {"tool": "read_file", "input": {"path": "absent.txt"}},
        ]
    )
    async with running_worker(tmp_path, model) as h:
        updates, finished = await h.run_turn()
    assert finished == TurnFinished("end_turn")
    final = [u for u in updates if u.get("status") in ("completed", "failed")]
    assert [u["toolCallId"] for u in final] == ["call_1_1", "call_1_2", "call_1_3"]
    assert final[0]["rawOutput"] == {"output": "on disk"}
    assert final[1]["status"] == "completed"
    assert "10 bytes" in final[1]["rawOutput"]["output"]
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == "written é"
    assert final[2]["status"] == "failed"
    assert [u for u in updates if u["sessionUpdate"] == "tool_call"][1]["kind"] == "edit"


async def test_line_zero_reaches_the_client_as_line_one(tmp_path: Path) -> None:
    """Lines count from 1 (the overview page); the schema's uint32 admits 0. A model's
    ``line: 0`` reads as line 1 from disk, and went to the client as 0, whose meaning
    the spec leaves open: it now goes as 1."""
    model = script([{"tool": "read_file", "input": {"path": "a.txt", "line": 0, "limit": 0}}])
    async with running_worker(tmp_path, model) as h:
        _, events = await h.start(env=h.env(read=True))
        await events.receive()  # tool_call
        await events.receive()  # in progress
        call = await events.receive()
        assert isinstance(call, ClientCall)
        assert call.params == {
            "sessionId": "s1",
            "path": str(tmp_path / "a.txt"),
            "line": 1,
            "limit": 0,
        }


async def test_read_file_on_disk_honours_line_and_limit(tmp_path: Path) -> None:
    """Without the client's fs capability, line and limit were ignored: the whole file came
    back. They count as fs/read_text_file counts: lines from 1, endings kept."""
    (tmp_path / "f.txt").write_bytes(b"one\ntwo\r\nthree\rfour\nfive")
    reads = [
        {"line": 2, "limit": 2},
        {"line": 4},
        {"limit": 1},
        {"line": 0, "limit": 1},
        {"line": 9},
        {"line": 1, "limit": 0},
    ]
    model = script([{"tool": "read_file", "input": {"path": "f.txt", **r}} for r in reads])
    async with running_worker(tmp_path, model) as h:
        updates, _ = await h.run_turn()
    outputs = [u["rawOutput"]["output"] for u in updates if u.get("status") == "completed"]
    assert outputs == ["two\r\nthree\r", "four\nfive", "one\n", "one\n", "", ""]


def test_a_write_that_fails_part_way_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    """``write_file`` truncated the file, then wrote: a write that failed part way (a full
    disk; here a file size limit, in a child process) left the start of the new content
    where the user's file had been. The content goes into a file beside it now, renamed
    over it once whole: the file is as it was, and no temporary file is left."""
    root = tmp_path / "proj"
    root.mkdir()
    (root / "f.txt").write_text("precious " * 100)
    child = f"""
import resource, signal
from pathlib import Path
from punie_trio.worker._tools import _write_disk
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    _write_disk(Path({str(root / "f.txt")!r}), ({str(root)!r},), "new content " * 1000)
except OSError as exc:
    print(exc.errno)
"""
    done = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == str(errno.EFBIG), done.stderr
    assert (root / "f.txt").read_text() == "precious " * 100
    assert os.listdir(root) == ["f.txt"]


async def test_write_file_keeps_the_mode_and_leaves_other_hard_links_alone(tmp_path: Path) -> None:
    """The file is replaced, not written into: it keeps its mode, and another name for it
    (a hard link, here one outside the project) keeps the old content, so a write through
    a hard link planted in the project no longer reaches the file outside."""
    root, outside = tmp_path / "proj", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "script.sh").write_text("old")
    (root / "script.sh").chmod(0o750)
    (outside / "secret.txt").write_text("outside")
    os.link(outside / "secret.txt", root / "linked.txt")
    model = script(
        [
            {"tool": "write_file", "input": {"path": "script.sh", "content": "new"}},
            {"tool": "write_file", "input": {"path": "linked.txt", "content": "pwned"}},
        ]
    )
    async with running_worker(root, model) as h:
        updates, _ = await h.run_turn()
    assert [u["status"] for u in updates if u.get("status") in ("completed", "failed")] == [
        "completed",
        "completed",
    ]
    assert (root / "script.sh").read_text() == "new"
    assert stat.S_IMODE((root / "script.sh").stat().st_mode) == 0o750
    assert (root / "linked.txt").read_text() == "pwned"
    assert (outside / "secret.txt").read_text() == "outside"
    assert sorted(os.listdir(root)) == ["linked.txt", "script.sh"]


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="giving a file another user's id needs root",
)
def test_a_file_whose_owner_cannot_be_kept_is_written_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replacing a file another user owns would make it the server's: where the owner
    cannot be given back, the file is written into, as before (same inode and owner)."""
    (tmp_path / "theirs.txt").write_text("old")
    before = (tmp_path / "theirs.txt").stat()

    def refuse(fd: int, uid: int, gid: int) -> None:
        raise PermissionError(errno.EPERM, "not permitted")

    monkeypatch.setattr(tools_module.os, "fchown", refuse)
    os.chown(tmp_path / "theirs.txt", before.st_uid + 1, before.st_gid)
    tools_module._write_disk(tmp_path / "theirs.txt", (str(tmp_path),), "new")
    after = (tmp_path / "theirs.txt").stat()
    assert (tmp_path / "theirs.txt").read_text() == "new"
    assert (after.st_ino, after.st_uid) == (before.st_ino, before.st_uid + 1)
    assert os.listdir(tmp_path) == ["theirs.txt"]


def _posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """A ``system.posix_acl_access`` value: version 2, then (tag, permissions, id) each."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


_NO_ID = 0xFFFFFFFF
# user::rw- user:65534:rw- group::--- mask::rw- other::---  (ls shows 0660: the mask)
_SHARED_WITH_ONE_USER = _posix_acl(
    (0x01, 6, _NO_ID), (0x02, 6, 65534), (0x04, 0, _NO_ID), (0x10, 6, _NO_ID), (0x20, 0, _NO_ID)
)


def _set_xattrs_or_skip(path: Path, attrs_: dict[str, bytes]) -> None:
    if not hasattr(os, "setxattr"):
        pytest.skip("no extended attributes on this platform")
    try:
        for name, value in attrs_.items():
            os.setxattr(path, name, value)
    except OSError as exc:  # (a file system without ACLs or user attributes)
        pytest.skip(f"cannot set {name}: {exc}")


def _xattrs(path: Path) -> dict[str, bytes]:
    return {name: os.getxattr(path, name) for name in sorted(os.listxattr(path))}


def test_a_replaced_file_keeps_its_acl_and_extended_attributes(tmp_path: Path) -> None:
    """The file is replaced by a new one, which had only the old one's owner and mode: a
    POSIX ACL sharing it with one other user (``group::---``, ``mask::rw-``: the mode's
    group bits show the mask, 0660) came out as plain 0660, so every member of its group
    could read and write it, the user it was shared with could not, and its user
    attributes were gone. The new file takes them all now."""
    (tmp_path / "shared.txt").write_text("old")
    (tmp_path / "shared.txt").chmod(0o600)
    _set_xattrs_or_skip(
        tmp_path / "shared.txt",
        {"system.posix_acl_access": _SHARED_WITH_ONE_USER, "user.origin": b"kept"},
    )
    before = (tmp_path / "shared.txt").stat()
    xattrs = _xattrs(tmp_path / "shared.txt")
    tools_module._write_disk(tmp_path / "shared.txt", (str(tmp_path),), "new")
    after = (tmp_path / "shared.txt").stat()
    assert (tmp_path / "shared.txt").read_text() == "new"
    assert _xattrs(tmp_path / "shared.txt") == xattrs
    assert (after.st_mode, after.st_uid, after.st_gid) == (
        before.st_mode,
        before.st_uid,
        before.st_gid,
    )
    assert os.listdir(tmp_path) == ["shared.txt"]


def test_a_replaced_file_takes_no_acl_from_its_directory(tmp_path: Path) -> None:
    """A new file is given its directory's default ACL: the file it replaces, made before
    that ACL was, had none, and must still have none (no other user may read it now)."""
    (tmp_path / "private.txt").write_text("old")
    (tmp_path / "private.txt").chmod(0o600)
    _set_xattrs_or_skip(tmp_path, {"system.posix_acl_default": _SHARED_WITH_ONE_USER})
    tools_module._write_disk(tmp_path / "private.txt", (str(tmp_path),), "new")
    assert (tmp_path / "private.txt").read_text() == "new"
    assert _xattrs(tmp_path / "private.txt") == {}
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600


def test_a_file_on_a_file_system_without_attributes_is_still_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that keeps no extended attributes (vfat, NFSv3, many FUSE ones)
    answers their listing with ``ENOTSUP``: there is nothing to keep, and the file is
    replaced whole, not written into."""
    (tmp_path / "f.txt").write_text("old")
    before = (tmp_path / "f.txt").stat()

    def unsupported(*args: Any, **kwargs: Any) -> list[str]:
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    monkeypatch.setattr(tools_module.os, "listxattr", unsupported)
    tools_module._write_disk(tmp_path / "f.txt", (str(tmp_path),), "new")
    assert (tmp_path / "f.txt").read_text() == "new"
    assert (tmp_path / "f.txt").stat().st_ino != before.st_ino
    assert os.listdir(tmp_path) == ["f.txt"]


def test_a_file_whose_attributes_cannot_be_kept_is_written_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where an attribute cannot be given to the new file (``security.*`` needs rights the
    server may lack), the file is written into, as one whose owner cannot be kept is."""
    (tmp_path / "labelled.txt").write_text("old")
    _set_xattrs_or_skip(tmp_path / "labelled.txt", {"user.origin": b"kept"})
    before = (tmp_path / "labelled.txt").stat()

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EPERM, "not permitted")

    monkeypatch.setattr(tools_module.os, "setxattr", refuse)
    tools_module._write_disk(tmp_path / "labelled.txt", (str(tmp_path),), "new")
    assert (tmp_path / "labelled.txt").read_text() == "new"
    assert (tmp_path / "labelled.txt").stat().st_ino == before.st_ino
    assert _xattrs(tmp_path / "labelled.txt") == {"user.origin": b"kept"}
    assert os.listdir(tmp_path) == ["labelled.txt"]


def _swap_for_a_link_outside(path: Path, outside: Path) -> None:
    """What a local process that can write in the project does between two steps of a
    write: the checked file is gone, and its name is a hard link to a file outside."""
    path.unlink()
    os.link(outside, path)


@pytest.mark.parametrize("owner_kept", [True, False], ids=["replaced", "written-into"])
def test_a_file_swapped_for_a_link_outside_during_a_write_is_not_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, owner_kept: bool
) -> None:
    """Between the file's check and its use, its name was swapped for a hard link to a
    file outside the project. Where the file is written into (its owner cannot be given
    to a new file) the name was opened, truncated and written with no check that it was
    still the file checked: the file outside was overwritten. (So was it where the old
    file's extended attributes could not be read, it being gone.) Only the file checked
    is written into now, and another one there fails the call before anything is
    truncated; a replace renames over whatever took the name, as it did."""
    root = tmp_path / "proj"
    root.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (root / "f.txt").write_text("old")
    real = tools_module._take_owner_and_mode

    def swap_during(fd: int, existing: os.stat_result) -> None:
        real(fd, existing)
        _swap_for_a_link_outside(root / "f.txt", secret)
        if not owner_kept:
            raise tools_module._CannotReplace  # (as for a file another user owns)

    monkeypatch.setattr(tools_module, "_take_owner_and_mode", swap_during)
    if owner_kept:
        tools_module._write_disk(root / "f.txt", (str(root),), "payload")
        assert (root / "f.txt").read_text() == "payload"
    else:
        with pytest.raises(OSError, match="was replaced while it was being written"):
            tools_module._write_disk(root / "f.txt", (str(root),), "payload")
        assert (root / "f.txt").read_text() == "outside"
    assert secret.read_text() == "outside"
    assert os.listdir(root) == ["f.txt"]


@contextlib.contextmanager
def _a_write_held_at_its_commit(target: Path) -> Iterator[subprocess.Popen[str]]:
    """A real process writing ``target`` with ``_write_disk``, held just before its
    rename (its temporary file written beside the target): a line to its stdin lets it
    go on. Ends it with SIGKILL if it is still running at the end."""
    child = f"""
import sys
from pathlib import Path
from punie_trio.worker._tools import _write_disk

def commit():
    print("held", flush=True)
    sys.stdin.readline()

_write_disk(Path({str(target)!r}), ({str(target.parent)!r},), "theirs", commit)
print("wrote", flush=True)
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _temporaries(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith(".punie-trio-"))


@pytest.fixture
def fresh_sweeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """No directory counts as swept by this process yet (see ``_tools._sweep_once``)."""
    monkeypatch.setattr(tools_module, "_swept", set())


def test_a_temporary_file_a_killed_write_left_is_swept_at_the_next_write_there(
    tmp_path: Path, fresh_sweeps: None
) -> None:
    """A write killed (SIGKILL) between creating its temporary file and renaming it left
    ``.punie-trio-<16 hex>.tmp`` in the user's project for good, holding the content that
    never landed. The next write in that directory removes it; the user's files stay."""
    (tmp_path / "f.txt").write_text("old")
    with _a_write_held_at_its_commit(tmp_path / "f.txt") as proc:
        [left] = _temporaries(tmp_path)
        proc.kill()
        proc.wait()
    assert (tmp_path / left).read_text() == "theirs"
    tools_module._write_disk(tmp_path / "g.txt", (str(tmp_path),), "mine")
    assert sorted(os.listdir(tmp_path)) == ["f.txt", "g.txt"]
    assert (tmp_path / "f.txt").read_text() == "old"


def test_a_live_writes_temporary_file_is_not_swept(tmp_path: Path, fresh_sweeps: None) -> None:
    """The sweep takes only a temporary file no running write holds (its writer locks it
    from its creation to its rename, and a lock ends with its process): a write of
    another server in the same directory lands as it would have."""
    (tmp_path / "f.txt").write_text("old")
    with _a_write_held_at_its_commit(tmp_path / "f.txt") as proc:
        [theirs] = _temporaries(tmp_path)
        tools_module._write_disk(tmp_path / "g.txt", (str(tmp_path),), "mine")
        assert _temporaries(tmp_path) == [theirs]
        assert proc.communicate("go\n", timeout=60)[0] == "wrote\n"
    assert (tmp_path / "f.txt").read_text() == "theirs"
    assert sorted(os.listdir(tmp_path)) == ["f.txt", "g.txt"]


def test_the_sweep_removes_nothing_that_is_not_certainly_a_left_temporary_file(
    tmp_path: Path, fresh_sweeps: None
) -> None:
    """Only a regular file named exactly ``.punie-trio-<16 lowercase hex>.tmp``, with no
    other name (hard link), owned by the server's user and held by no write, is ours and
    left over; anything else is the user's."""
    hex16 = "0123456789abcdef"
    outside = tmp_path / "outside.txt"
    outside.write_text("outside")
    project = tmp_path / "proj"
    project.mkdir()
    kept = {
        f".punie-trio-{hex16.upper()}.tmp": "upper case",
        f".punie-trio-{hex16[:-1]}.tmp": "15 digits",
        f".punie-trio-{hex16}.tmp.bak": "a suffix",
        f"punie-trio-{hex16}.tmp": "no dot",
    }
    for name, text in kept.items():
        (project / name).write_text(text)
    (project / f".punie-trio-{hex16[:-1]}1.tmp").symlink_to(outside)
    (project / f".punie-trio-{hex16[:-1]}2.tmp").mkdir()
    os.link(outside, project / f".punie-trio-{hex16[:-1]}3.tmp")
    os.mkfifo(project / f".punie-trio-{hex16[:-1]}4.tmp")
    (project / f".punie-trio-{hex16[:-1]}5.tmp").write_text("left over")
    before = sorted(os.listdir(project))
    tools_module._write_disk(project / "f.txt", (str(project),), "mine")
    assert sorted(os.listdir(project)) == sorted(
        [*(n for n in before if n != f".punie-trio-{hex16[:-1]}5.tmp"), "f.txt"]
    )
    for name, text in kept.items():
        assert (project / name).read_text() == text
    assert outside.read_text() == "outside"


def _flock_as_over_nfs(real_flock: Any) -> Any:
    """``fcntl.flock`` as Linux gives it on NFS (``flock(2)``: emulated as a byte-range
    lock on the whole file, so "in order to place an exclusive lock, the file must be
    opened for writing"; NFSv4 answers ``EBADF``). Local locks underneath: a lock another
    process holds still conflicts."""

    def flock(fd: int, operation: int) -> None:
        read_only = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        if operation & fcntl.LOCK_EX and read_only:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        real_flock(fd, operation)

    return flock


def test_a_killed_writes_temporary_file_is_swept_where_only_writers_may_lock_exclusively(
    tmp_path: Path, fresh_sweeps: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep locked a leftover exclusively through a read-only descriptor: on NFS
    (where an exclusive ``flock`` needs a file opened for writing) that failed, and no
    leftover was ever removed there. A shared lock tells a live write's file just as
    well (its writer holds it exclusively): the leftover goes, a live write's stays."""
    (tmp_path / "f.txt").write_text("old")
    with _a_write_held_at_its_commit(tmp_path / "f.txt") as live:
        [theirs] = _temporaries(tmp_path)
        with _a_write_held_at_its_commit(tmp_path / "e.txt") as killed:
            killed.kill()
            killed.wait()
        [left] = [name for name in _temporaries(tmp_path) if name != theirs]
        assert (tmp_path / left).read_text() == "theirs"  # (what the killed write held)
        monkeypatch.setattr(fcntl, "flock", _flock_as_over_nfs(fcntl.flock))
        tools_module._write_disk(tmp_path / "g.txt", (str(tmp_path),), "mine")
        assert _temporaries(tmp_path) == [theirs]
        assert live.communicate("go\n", timeout=60)[0] == "wrote\n"
    assert sorted(os.listdir(tmp_path)) == ["f.txt", "g.txt"]
    assert (tmp_path / "f.txt").read_text() == "theirs"


def test_a_write_whose_temporary_file_is_swept_before_it_is_held_takes_another(
    tmp_path: Path, fresh_sweeps: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep (another server's) can take a new temporary file in the moment between
    its creation and its writer's lock. The writer sees its name gone and starts again
    under another name: the write lands, and nothing is left."""
    (tmp_path / "f.txt").write_text("old")
    real_flock = tools_module.fcntl.flock
    swept: list[str] = []

    def swept_first(fd: int, operation: int) -> None:
        if not swept:
            [name] = _temporaries(tmp_path)
            os.unlink(tmp_path / name)  # (as that sweep does)
            swept.append(name)
        real_flock(fd, operation)

    monkeypatch.setattr(tools_module.fcntl, "flock", swept_first)
    monkeypatch.setattr(tools_module, "_sweep_once", lambda directory: None)
    tools_module._write_disk(tmp_path / "f.txt", (str(tmp_path),), "new")
    assert swept and (tmp_path / "f.txt").read_text() == "new"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_a_fifo_is_refused_without_being_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``read_file`` of a FIFO opened it (without waiting) before seeing what it was. An
    open is not nothing: a writer waiting in its own open for a reader was let go by it,
    and its writes then failed (``EPIPE``, or ``SIGPIPE`` killed it) once the server
    closed its end; so with a device, whose open may act (a tape rewinds on its close, a
    watchdog starts). What the name is is looked at first now, and such a file is never
    opened (save one swapped in after the look, which the open's own check still
    refuses)."""
    os.mkfifo(tmp_path / "pipe")
    opened: list[Path] = []
    real = tools_module.open_beneath

    def recording(path: Path, *args: Any, **kwargs: Any) -> int:
        opened.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tools_module, "open_beneath", recording)
    with pytest.raises(tools_module._NotAFile, match="a FIFO"):
        tools_module._read_disk(tmp_path / "pipe", (str(tmp_path),), None, None)
    assert opened == []
    (tmp_path / "f.txt").write_text("text")
    assert tools_module._read_disk(tmp_path / "f.txt", (str(tmp_path),), None, None) == "text"
    assert opened == [tmp_path / "f.txt"]


async def test_write_file_takes_a_name_as_long_as_the_file_system_allows(tmp_path: Path) -> None:
    """The file written beside the target is named apart from it: one named after it
    (``.NAME.xxxx.tmp``) was too long for a target whose own name was within bounds."""
    name = "n" * 255
    model = script([{"tool": "write_file", "input": {"path": name, "content": "long"}}])
    async with running_worker(tmp_path, model) as h:
        updates, _ = await h.run_turn()
    assert updates[-1]["status"] == "completed", updates[-1]
    assert os.listdir(tmp_path) == [name]
    assert (tmp_path / name).read_text() == "long"


async def test_write_file_through_the_client(tmp_path: Path) -> None:
    model = script([{"tool": "write_file", "input": {"path": "new.txt", "content": "abc"}}])
    async with running_worker(tmp_path, model) as h:
        turn_id, events = await h.start(env=h.env(write=True))
        await events.receive()
        await events.receive()
        call = await events.receive()
        assert isinstance(call, ClientCall)
        assert call.method == "fs/write_text_file"
        assert call.params == {
            "sessionId": "s1",
            "path": str(tmp_path / "new.txt"),
            "content": "abc",
        }
        await h.commands.send(ClientReply(turn_id, call.call_id, result=None))
        updates, _ = await collect(events)
    assert updates[0]["status"] == "completed"
    assert not (tmp_path / "new.txt").exists()  # the client wrote it, not the worker


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "home"])
@pytest.mark.parametrize("through_client", [True, False])
async def test_path_escape_fails_the_tool_call_and_reads_nothing(
    tmp_path: Path, kind: str, through_client: bool
) -> None:
    root = tmp_path / "project"
    root.mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("TOP SECRET", encoding="utf-8")
    if kind == "dotdot":
        path = "../secret.txt"
    elif kind == "absolute":
        path = str(outside)
    elif kind == "symlink":
        os.symlink(outside, root / "link.txt")
        path = "link.txt"
    else:
        path = "~/../../../../" + str(outside).lstrip("/")
    model = script([{"tool": "read_file", "input": {"path": path}}])
    async with running_worker(root, model) as h:
        # Every event is an Update: a ClientCall would make collect() fail.
        updates, finished = await h.run_turn(env=h.env(read=through_client))
    assert finished == TurnFinished("end_turn")
    assert [u["sessionUpdate"] for u in updates] == [
        "tool_call",
        "tool_call_update",
        "tool_call_update",
    ]
    failed = updates[-1]
    assert failed["status"] == "failed"
    message = failed["content"][0]["content"]["text"]
    assert "outside the allowed roots" in message
    assert "TOP SECRET" not in repr(updates)


async def test_write_file_escape_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    model = script([{"tool": "write_file", "input": {"path": "../evil.txt", "content": "x"}}])
    async with running_worker(root, model) as h:
        updates, _ = await h.run_turn()
    assert updates[-1]["status"] == "failed"
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize(
    ("tool_input", "fragment"),
    [
        ({}, "input.path"),
        ({"path": ""}, "input.path"),
        ({"path": 3}, "input.path"),
        ({"path": "a\x00b"}, "input.path must not contain NUL"),
        ({"path": "a\ud800"}, "input.path must not contain NUL or a lone surrogate"),
        # fs/read_text_file's line and limit are uint32 (these once reached the client).
        ({"path": "a.txt", "line": -3}, "input.line must be an integer from 0"),
        ({"path": "a.txt", "limit": True}, "input.limit must be an integer from 0"),
        ({"path": "a.txt", "limit": 2**32}, "input.limit must be an integer from 0"),
        ({"path": "a.txt", "line": "2"}, "input.line must be an integer from 0"),
    ],
)
async def test_bad_tool_input_fails_the_tool_call(
    tmp_path: Path, tool_input: dict[str, Any], fragment: str
) -> None:
    model = script([{"tool": "read_file", "input": tool_input}])
    async with running_worker(tmp_path, model) as h:
        updates, _ = await h.run_turn(env=h.env(read=True))
    assert updates[-1]["status"] == "failed"
    assert fragment in updates[-1]["content"][0]["content"]["text"]


@pytest.mark.parametrize(
    ("content", "fragment"), [(5, "must be a string"), ("a\ud800", "is not valid Unicode")]
)
async def test_write_file_needs_string_content(tmp_path: Path, content: Any, fragment: str) -> None:
    model = script([{"tool": "write_file", "input": {"path": "a.txt", "content": content}}])
    async with running_worker(tmp_path, model) as h:
        updates, _ = await h.run_turn()
    assert updates[-1]["status"] == "failed"
    assert "input.content " + fragment in updates[-1]["content"][0]["content"]["text"]
    assert not (tmp_path / "a.txt").exists()


async def test_unsupported_tool(tmp_path: Path) -> None:
    model = script([{"tool": "run_shell", "input": {"cmd": "ls"}}, {"text": "continued"}])
    async with running_worker(tmp_path, model) as h:
        updates, finished = await h.run_turn()
    assert updates[0] == {
        "sessionUpdate": "tool_call",
        "toolCallId": "call_1_1",
        "title": "run_shell",
        "kind": "other",
        "status": "failed",
        "rawInput": {"cmd": "ls"},
    }
    assert updates[1]["status"] == "failed"
    assert "unsupported tool 'run_shell'" in updates[1]["content"][0]["content"]["text"]
    assert "read_file" in updates[1]["content"][0]["content"]["text"]
    assert updates[2]["content"]["text"] == "continued"
    assert finished == TurnFinished("end_turn")


# -- lifetime ---------------------------------------------------------------------------------


async def test_closing_the_command_channel_ends_run_and_cancels_turns(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    model = script([{"sleep": 1000}])
    send, receive = trio.open_memory_channel[Command](16)
    worker = ProjectWorker(str(tmp_path), model, receive)
    h = Harness(worker, send, tmp_path)
    events: list[trio.MemoryReceiveChannel[TurnEvent]] = []
    async with trio.open_nursery() as outer:
        before = set(outer.child_tasks)
        done = trio.Event()

        async def run_worker(task_status: trio.TaskStatus[None]) -> None:
            await worker.run(task_status=task_status)
            done.set()

        await outer.start(run_worker)
        for session in ("a", "b"):
            events.append((await h.start(env=h.env(session)))[1])
        await trio.testing.wait_all_tasks_blocked()
        assert worker.running_turns == 2
        started = trio.current_time()
        await send.aclose()
        with trio.fail_after(10):
            await done.wait()
        assert trio.current_time() - started < 1000
        await trio.testing.wait_all_tasks_blocked()
        assert set(outer.child_tasks) == before
    assert worker.running_turns == 0
    for channel in events:
        _, finished = await collect(channel)
        assert finished == TurnFinished("cancelled")


async def test_a_fast_model_hands_over_events_in_batches_but_still_yields(tmp_path: Path) -> None:
    """Events go out without a scheduler trip each while the channel has room, and the model
    still yields every EMIT_YIELD_EVERY events, so other tasks run during a long stream."""
    chunks = 10 * EMIT_YIELD_EVERY
    async with running_worker(tmp_path, script([{"text": "x"}] * chunks)) as h:
        _, events = await h.start(buffer=chunks + 1)  # room for the whole turn, unread
        seen: list[int] = []  # events queued each time this task got to run
        while not seen or seen[-1] < chunks + 1:  # ends once TurnFinished is queued too
            await trio.lowlevel.checkpoint()
            seen.append(events.statistics().current_buffer_used)
        updates, finished = await collect(events)
    assert finished == TurnFinished("end_turn") and len(updates) == chunks
    # The model yielded mid-turn (other tasks ran), each time after a whole batch.
    partial = sorted({n for n in seen if 0 < n < chunks})
    assert len(partial) >= 2
    assert all(n % EMIT_YIELD_EVERY == 0 for n in partial)


def _task_named(suffix: str) -> trio.lowlevel.Task:
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task.name.endswith(suffix):
            return task
        todo += [t for n in task.child_nurseries for t in n.child_tasks]
    raise AssertionError(f"no task named ...{suffix}")


class _StepCounter(trio.abc.Instrument):
    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task, self.steps = task, 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += task is self.task


@pytest.mark.parametrize(("queued", "steps"), [(5, 1), (COMMANDS_PER_STEP + 1, 1), (70, 2)])
async def test_queued_commands_are_handled_in_one_step(
    tmp_path: Path, queued: int, steps: int
) -> None:
    """The worker handles every queued command when it runs (up to COMMANDS_PER_STEP
    after the first), not one per scheduler step: it is the one task all of a root's
    prompts pass through, and one command a step once made it the bottleneck with many
    clients (a scheduler pass per prompt). The bound keeps a burst from hogging the loop."""
    send, receive = trio.open_memory_channel[Command](128)
    worker = ProjectWorker(str(tmp_path), script([{"sleep": 3600}]), receive)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        h = Harness(worker, send, tmp_path)
        await trio.testing.wait_all_tasks_blocked()
        counter = _StepCounter(_task_named("ProjectWorker.run"))
        trio.lowlevel.add_instrument(counter)
        try:
            for i in range(queued):
                events, _ = trio.open_memory_channel[TurnEvent](8)
                start = StartTurn(next(_turn_ids), h.env(f"s{i}"), "x", (), events, 0)
                send.send_nowait(start)
            await trio.testing.wait_all_tasks_blocked()
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert worker.running_turns == queued
        assert counter.steps == steps
        await send.aclose()  # the worker cancels its turns and ends


def test_tool_call_limiter_forgets_sessions_idle_for_a_minute() -> None:
    """The manager's limiter outlives workers and sessions; what it keeps is bounded by the
    sessions that called a tool in the last minute (swept as the table doubles)."""
    limiter = ToolCallLimiter(per_minute=2)
    for i in range(100):
        assert limiter.count(f"old{i}", now=0.0) is None
    assert limiter.count("old0", now=1.0) is None
    assert limiter.count("old0", now=2.0) is not None  # (over 2 a minute)
    for i in range(100):
        assert limiter.count(f"new{i}", now=61.5) is None
    assert len(limiter) == 100  # the old ones are gone (old0's last call was at 1.0)
    assert limiter.count("new0", now=62.0) is None
    assert limiter.count("new0", now=62.5) is not None  # (a kept one still counts)


def test_the_limits_messages_count_in_words_that_agree() -> None:
    """ "1 tool call per minute", not "1 tool calls" (an audit's wording note)."""
    one, two = ToolCallLimiter(per_minute=1), ToolCallLimiter(per_minute=2)
    assert one.count("s", now=0.0) is None
    assert "rate limit: 1 tool call per minute in this session" in (one.count("s", 1.0) or "")
    two.count("s", now=0.0), two.count("s", now=0.0)
    assert "rate limit: 2 tool calls per minute in this session" in (two.count("s", 1.0) or "")


def test_the_tool_call_limiters_retry_is_rounded_up() -> None:
    """ "retry in 59.9 s" for 59.94 s sent a model that waited as told back too early."""
    limiter = ToolCallLimiter(per_minute=1)
    assert limiter.count("s", now=0.0) is None
    message = limiter.count("s", now=0.06) or ""
    assert message.endswith("retry in 60.0 s"), message
    assert limiter.count("s", now=0.06 + 59.9) is not None
    assert limiter.count("s", now=0.06 + 60.0) is None


def test_a_limiter_only_seeded_forgets_sessions_idle_for_a_minute() -> None:
    """The manager's limiter only seeds (each turn's calls, handed back by the worker),
    and seed never swept: one entry stayed for every session that ever called a tool
    (an audit: 3,200 after 3,200 sessions, none of them live)."""
    limiter = ToolCallLimiter(per_minute=2)
    for i in range(1000):
        limiter.seed(f"s{i}", (0.5,), now=i * 61.0)  # each a minute after the last
    assert len(limiter) <= 64
    assert limiter.ages("s999", now=999 * 61.0) == (0.5,)  # the recent one is kept


async def test_a_session_forgotten_in_its_turns_step_keeps_no_history(tmp_path: Path) -> None:
    """A StartTurn and the session's ForgetSession handled in one step (the session dropped
    as its turn began): the turn made the history anew when it ran, after the forget, and
    the worker kept it for its life."""
    async with running_worker(tmp_path, EchoModel()) as h:
        _, events = await h.start("hello")  # (queued: the worker has not run since)
        await h.commands.send(ForgetSession("s1"))
        await collect(events)
        assert "s1" not in h.worker._history


def _reference_lines(text: bytes, first: int, limit: int | None) -> bytes:
    """What fs/read_text_file counts: lines ending at \\n, \\r\\n or \\r, endings kept."""
    lines = io.StringIO(text.decode(), newline="").readlines()
    return "".join(lines[first : None if limit is None else first + limit]).encode()


def test_take_lines_matches_the_editors_line_split_at_every_chunk_boundary() -> None:
    """Read in chunks so a long file or line is never held whole; a \\r\\n split across two
    chunks is still one line ending, at any chunk size."""
    texts = [b"", b"a", b"a\n", b"a\r\nb", b"\r\n\r\n", b"a\rb\r\n\rc\n\nd", b"\r", b"ab\r\r\n"]
    for text, chunk_size in itertools.product(texts, range(1, 8)):
        for first, limit in itertools.product(range(5), [None, 0, 1, 2, 3]):
            got = _take_lines(io.BytesIO(text), first, limit, chunk_size)
            assert got == _reference_lines(text, first, limit), (text, chunk_size, first, limit)


async def test_a_read_over_the_bound_fails_the_tool_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file (or a run of lines) over READ_LIMIT_BYTES is refused, not read into memory;
    a part within the bound of a larger file reads fine."""
    monkeypatch.setattr(tools_module, "READ_LIMIT_BYTES", 100)
    (tmp_path / "big.txt").write_text("x" * 60 + "\n" + "y" * 60 + "\n", encoding="utf-8")
    reads: list[dict[str, Any]] = [{}, {"limit": 2}, {"line": 2, "limit": 1}]
    model = script([{"tool": "read_file", "input": {"path": "big.txt", **r}} for r in reads])
    async with running_worker(tmp_path, model) as h:
        updates, _ = await h.run_turn()
    final = [u for u in updates if u.get("status") in ("completed", "failed")]
    assert [u["status"] for u in final] == ["failed", "failed", "completed"]
    assert (
        "more than 100 bytes (read it in parts with line and limit)"
        in (final[0]["content"][0]["content"]["text"])
    )
    assert final[2]["rawOutput"] == {"output": "y" * 60 + "\n"}


async def test_a_read_by_lines_past_a_huge_file_ends_when_its_turn_is_cancelled(
    tmp_path: Path,
) -> None:
    """Skipping to a line reads every byte before it (in a thread): a ``line`` past the
    end of a large file (here 1 TiB, sparse) read it all, for minutes to hours, and a
    cancel waited for that. The read checks for a cancel between chunks now."""
    (tmp_path / "huge.log").touch()
    os.truncate(tmp_path / "huge.log", 1 << 40)
    read = {"tool": "read_file", "input": {"path": "huge.log", "line": 2**32 - 1, "limit": 1}}
    async with running_worker(tmp_path, script([read])) as h:
        updates, finished = await cancelled_in_its_tool_call(h)
    assert finished == TurnFinished("cancelled")
    assert [(u["toolCallId"], u["status"]) for u in updates] == [("call_1_1", "failed")]


async def test_a_long_output_is_shown_cut_and_the_model_gets_it_whole(tmp_path: Path) -> None:
    """A 10 MB read was sent whole, twice (content and rawOutput), in one update larger than
    the server's own message bound, stored and replayed by every load."""
    whole = "z" * (SHOWN_OUTPUT_CHARS + 5)
    (tmp_path / "long.txt").write_text(whole, encoding="utf-8")
    seen: list[str] = []

    @attrs.define(eq=False)
    class Reader:
        name: str = "reader"

        async def run_turn(self, ctx: Any) -> str:
            seen.append(await ctx.tool("read_file", {"path": "long.txt"}))
            return "end_turn"

    async with running_worker(tmp_path, Reader()) as h:
        updates, _ = await h.run_turn()
    assert seen == [whole]
    (done,) = [u for u in updates if u.get("status") == "completed"]
    shown = done["content"][0]["content"]["text"]
    assert shown == "z" * SHOWN_OUTPUT_CHARS + "\n[... 5 more characters not shown (65,541 in all)]"
    assert done["rawOutput"] == {
        "output": "z" * SHOWN_OUTPUT_CHARS,
        "truncated": True,
        "length": SHOWN_OUTPUT_CHARS + 5,
    }


@attrs.define(eq=False)
class HungDisk:
    """A file system that stops answering: ``hang`` (called by the patched step, on the
    tool's thread) waits until :meth:`answer`; ``ended`` counts the disk tool runs that
    returned or raised, however late (an abandoned thread's included)."""

    entered: threading.Semaphore = attrs.field(factory=lambda: threading.Semaphore(0))
    released: threading.Event = attrs.field(factory=threading.Event)
    ended: threading.Semaphore = attrs.field(factory=lambda: threading.Semaphore(0))
    timed_out: list[bool] = attrs.field(factory=list)

    def hang(self) -> None:
        self.entered.release()
        self.timed_out.append(not self.released.wait(timeout=10))

    def counting(self, run: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                return run(*args, **kwargs)
            finally:
                self.ended.release()

        return counted

    async def wait_entered(self) -> None:
        await trio.to_thread.run_sync(self.entered.acquire)

    async def answer(self) -> None:
        """Let the file system answer, and wait for the abandoned run to end."""
        self.released.set()
        await trio.to_thread.run_sync(self.ended.acquire)
        assert self.timed_out == [False]


async def cancelled_while_hung(
    h: Harness, disk: HungDisk, env: TurnEnv | None = None
) -> tuple[list[dict[str, Any]], TurnFinished]:
    """Start a turn, cancel it once its tool's disk step hangs, and collect the rest:
    all of it while the step still hangs (``disk.ended`` untouched)."""
    turn_id, events = await h.start(env=env)
    assert (await events.receive()).update["status"] == "pending"  # type: ignore[union-attr]
    assert (await events.receive()).update["status"] == "in_progress"  # type: ignore[union-attr]
    await disk.wait_entered()
    await h.commands.send(CancelTurn(turn_id))
    updates, finished = await collect(events)
    assert not disk.ended.acquire(blocking=False)  # (the turn ended with the step hung)
    assert disk.timed_out == []
    return updates, finished


async def test_a_disk_read_that_hangs_does_not_hold_the_turns_cancel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tool's disk read runs in a thread; on a network mount that stopped answering it
    held its turn's ``session/cancel`` (and a shutdown) until the mount answered. A read
    changes nothing: the cancel leaves it now, and the call is reported cancelled."""
    (tmp_path / "f.txt").write_text("text")
    disk = HungDisk()
    real_open = tools_module.open_beneath

    def hung_open(*args: Any, **kwargs: Any) -> int:
        disk.hang()
        return real_open(*args, **kwargs)

    monkeypatch.setattr(tools_module, "open_beneath", hung_open)
    monkeypatch.setattr(tools_module, "_read_disk", disk.counting(tools_module._read_disk))
    steps = [{"tool": "read_file", "input": {"path": "f.txt"}}]
    async with running_worker(tmp_path, script(steps)) as h:
        updates, finished = await cancelled_while_hung(h, disk)
        await disk.answer()
    assert finished == TurnFinished("cancelled")
    assert [(u["status"], u["content"][0]["content"]["text"]) for u in updates] == [
        ("failed", "cancelled")
    ]


@pytest.mark.parametrize("where", ["directory", "rename"])
async def test_a_disk_write_that_hangs_does_not_hold_the_turns_cancel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A tool's disk write runs in a thread; on a network mount that stopped answering it
    held its turn's ``session/cancel`` until the mount answered. The cancel leaves it
    now, and what the call reports says what it may still do. Hung before the write is
    committed (opening the directory), it never lands: the thread looks at the cancel
    before it renames its new file into place, and removes that file, so "cancelled" is
    the truth. Hung in the rename, it may land after the turn ended, and the call says
    that the file may hold the new content (it does, once the mount answers)."""
    target = tmp_path / "f.txt"
    target.write_text("old")
    disk = HungDisk()
    monkeypatch.setattr(tools_module, "_write_disk", disk.counting(tools_module._write_disk))
    if where == "directory":
        real_open = tools_module.open_beneath

        def hung_open(*args: Any, **kwargs: Any) -> int:
            disk.hang()
            return real_open(*args, **kwargs)

        monkeypatch.setattr(tools_module, "open_beneath", hung_open)
    else:
        real_replace = os.replace

        def hung_replace(src: Any, dst: Any, **kwargs: Any) -> None:
            if str(src).startswith(".punie-trio-"):
                disk.hang()
            real_replace(src, dst, **kwargs)

        monkeypatch.setattr(os, "replace", hung_replace)
    steps = [{"tool": "write_file", "input": {"path": "f.txt", "content": "new"}}]
    async with running_worker(tmp_path, script(steps)) as h:
        updates, finished = await cancelled_while_hung(h, disk)
        await disk.answer()
    assert finished == TurnFinished("cancelled")
    [final] = updates
    assert final["status"] == "failed"
    text = final["content"][0]["content"]["text"]
    if where == "directory":
        assert text == "cancelled"
        assert target.read_text() == "old"
    else:
        assert text == (
            f"cancelled, but {target} may hold the new content: the cancel came while it "
            "was being written, and a write the file system has not finished runs on"
        )
        assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["f.txt"]  # (no new file left beside it)


async def test_a_write_the_client_was_asked_for_is_not_reported_as_not_made(
    tmp_path: Path,
) -> None:
    """A ``write_file`` through the client's ``fs/write_text_file``, cancelled while the
    client had not answered: the client may have written the file (or still will), and
    the call says so, not just "cancelled"."""
    steps = [{"tool": "write_file", "input": {"path": "f.txt", "content": "new"}}]
    async with running_worker(tmp_path, script(steps)) as h:
        turn_id, events = await h.start(env=h.env(write=True))
        for _ in range(2):  # (pending, in_progress)
            await events.receive()
        call = await events.receive()
        assert isinstance(call, ClientCall) and call.method == "fs/write_text_file"
        await h.commands.send(CancelTurn(turn_id))
        updates, finished = await collect(events)
    assert finished == TurnFinished("cancelled")
    assert [(u["status"], u["content"][0]["content"]["text"]) for u in updates] == [
        (
            "failed",
            f"cancelled, but {tmp_path / 'f.txt'} may hold the new content: the client "
            "was asked to write it and had not answered",
        )
    ]
