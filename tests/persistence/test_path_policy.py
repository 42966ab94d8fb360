"""Every path a session touches resolves (``..``, symlinks) inside its project roots: session
cwds and additional directories are refused with -32602 naming the allowed roots, and file
tools that would escape fail without reading or writing anything outside, or asking the
client to."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from punie_trio.store import MemoryStore, open_sqlite_store
from punie_trio.worker import ScriptModel

from ..acp_schema import SchemaChecker
from ..integration._support import acp_ws_client
from ..integration.conftest import StartServer
from ._hub import Hub, expect_error, initialize, open_hub, send_prompt

SECRET = "outside secret"


@pytest.fixture
async def layout(tmp_path: Path) -> tuple[Path, Path]:
    """``proj/`` (the root, with symlinks pointing out) and ``outside/secret.txt``."""
    base = Path(await trio.Path(tmp_path).resolve())
    root, outside = base / "proj", base / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    (root / "inside.txt").write_text("inside")
    (root / "link-dir").symlink_to(outside)
    (root / "link-file.txt").symlink_to(outside / "secret.txt")
    return root, outside


async def new_session_error(hub: Hub, **params: Any) -> dict[str, Any]:
    link = await hub.connect()
    await initialize(link.client)
    return await expect_error(link.client, "session/new", {"mcpServers": [], **params})


def tool_outcomes(client: Any, session_id: str) -> list[dict[str, Any]]:
    """The session's tool calls as they ended: each ``failed`` or ``completed``
    ``tool_call_update``, in order."""
    return [
        u
        for u in client.updates(session_id)
        if u["sessionUpdate"] == "tool_call_update" and u["status"] in ("failed", "completed")
    ]


async def test_session_cwd_must_be_inside_the_roots(
    layout: tuple[Path, Path], acp_schema: SchemaChecker
) -> None:
    root, outside = layout
    async with open_hub(root, acp_schema, ScriptModel([[{"text": "x"}]])) as hub:
        for cwd in (outside, Path(f"{root}/../outside"), root / "link-dir", Path("/")):
            error = await new_session_error(hub, cwd=str(cwd))
            assert error["code"] == -32602, cwd
            assert "cwd" in error["message"] and str(root) in error["message"], error
        error = await new_session_error(
            hub, cwd=str(root), additionalDirectories=[str(root), str(outside)]
        )
        assert error["code"] == -32602
        assert "additionalDirectories[1]" in error["message"] and str(root) in error["message"]
        error = await new_session_error(
            hub, cwd=str(root), additionalDirectories=[str(root / "link-dir")]
        )
        assert error["code"] == -32602
        assert hub.manager.sessions == {}
        # Inside is fine, through a `..` that stays inside too.
        link = await hub.connect()
        await initialize(link.client)
        await link.client.new_session(f"{root}/sub/../")


async def test_session_cwd_must_be_a_directory(
    layout: tuple[Path, Path], acp_schema: SchemaChecker
) -> None:
    """Inside the roots but missing, or a file: every tool of such a session would fail."""
    root, _ = layout
    (root / "a-file.txt").write_text("x")
    async with open_hub(root, acp_schema, ScriptModel([[{"text": "x"}]])) as hub:
        for cwd in (root / "no-such-dir", root / "a-file.txt"):
            error = await new_session_error(hub, cwd=str(cwd))
            assert error["code"] == -32602, cwd
            assert error["message"] == f"Invalid params: cwd {str(cwd)!r} is not a directory"
        assert hub.manager.sessions == {}


async def test_session_load_with_a_cwd_outside_is_refused(
    layout: tuple[Path, Path], acp_schema: SchemaChecker
) -> None:
    root, outside = layout
    async with open_hub(root, acp_schema, ScriptModel([[{"text": "x"}]])) as hub:
        link = await hub.connect()
        await initialize(link.client)
        session_id = await link.client.new_session(str(root))
        await link.client.request("session/close", {"sessionId": session_id})
        for method in ("session/load", "session/resume"):
            for cwd in (outside, root / "link-dir"):
                error = await expect_error(
                    link.client,
                    method,
                    {"sessionId": session_id, "cwd": str(cwd), "mcpServers": []},
                )
                assert error["code"] == -32602 and str(root) in error["message"], error
            error = await expect_error(
                link.client,
                method,
                {
                    "sessionId": session_id,
                    "cwd": str(root),
                    "mcpServers": [],
                    "additionalDirectories": [str(outside)],
                },
            )
            assert error["code"] == -32602 and "additionalDirectories[0]" in error["message"]
        assert hub.manager.sessions == {}


async def test_stored_additional_directories_are_not_restored_implicitly(
    layout: tuple[Path, Path], acp_schema: SchemaChecker
) -> None:
    """A session made while ``outside`` was a root must not reach it after the server
    restarts without that root, by loading without ``additionalDirectories`` (the
    session-setup page: omitting them "does not restore stored roots implicitly")."""
    root, outside = layout
    store = MemoryStore()
    model = ScriptModel(
        [[{"text": "x"}], [{"tool": "read_file", "input": {"path": str(outside / "secret.txt")}}]]
    )
    async with open_hub(root, acp_schema, model, store=store, roots=(root, outside)) as hub:
        link = await hub.connect()
        await initialize(link.client)
        session_id = await link.client.new_session(str(root), additionalDirectories=[str(outside)])
        assert await link.client.prompt(session_id, "one") == "end_turn"
    async with open_hub(root, acp_schema, model, store=store) as hub:
        link = await hub.connect()
        await initialize(link.client)
        await link.client.request("session/resume", {"sessionId": session_id, "cwd": str(root)})
        assert hub.manager.sessions[session_id].allowed_roots == (str(root),)
        assert await link.client.prompt(session_id, "read it") == "end_turn"
        failed = link.client.updates(session_id)[-1]
        assert failed["status"] == "failed"
        assert SECRET not in str(link.client.received)


ESCAPES = [
    "../outside/secret.txt",
    "{outside}/secret.txt",
    "link-file.txt",
    "link-dir/secret.txt",
    "link-dir/new.txt",
    "~/../../{outside}/secret.txt",
]


@pytest.mark.parametrize("through_client", [True, False], ids=["client-fs", "disk"])
@pytest.mark.parametrize("tool", ["read_file", "write_file"])
async def test_file_tools_cannot_escape(
    layout: tuple[Path, Path], acp_schema: SchemaChecker, tool: str, through_client: bool
) -> None:
    root, outside = layout
    paths = [p.format(outside=outside) for p in ESCAPES]
    steps: list[dict[str, Any]] = [
        {"tool": tool, "input": {"path": p, "content": "pwned"}} for p in paths
    ]
    # A control: the same tool inside the root works.
    steps.append({"tool": tool, "input": {"path": "inside.txt", "content": "rewritten"}})
    async with open_hub(root, acp_schema, ScriptModel([steps])) as hub:
        files = {str(root / "inside.txt"): "inside (editor)"}
        link = await hub.connect(files=files)
        caps = {"fs": {"readTextFile": True, "writeTextFile": True}} if through_client else {}
        await initialize(link.client, **caps)
        session_id = await link.client.new_session(str(root))
        assert await link.client.prompt(session_id, "escape") == "end_turn"
        finals = tool_outcomes(link.client, session_id)
        assert [u["status"] for u in finals] == ["failed"] * len(paths) + ["completed"]
        for update in finals[:-1]:
            assert "outside the allowed roots" in update["content"][0]["content"]["text"]
        # Nothing outside was read, written or asked for.
        assert SECRET not in str(link.client.received)
        assert (outside / "secret.txt").read_text() == SECRET
        assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
        asked = [r["params"]["path"] for r in link.client.agent_requests]
        assert asked == ([str(root / "inside.txt")] if through_client else [])
        if tool == "write_file" and not through_client:
            assert (root / "inside.txt").read_text() == "rewritten"


async def test_additional_directories_must_be_directories(
    layout: tuple[Path, Path], acp_schema: SchemaChecker
) -> None:
    """A missing one (which could later be created as a symlink to anywhere) or a file is
    refused like one outside the roots."""
    root, _ = layout
    async with open_hub(root, acp_schema, ScriptModel([[{"text": "x"}]])) as hub:
        for extra in (root / "not-yet", root / "inside.txt"):
            error = await new_session_error(hub, cwd=str(root), additionalDirectories=[str(extra)])
            assert error["code"] == -32602
            assert error["message"] == (
                f"Invalid params: additionalDirectories[0] {str(extra)!r} is not a directory"
            )
        assert hub.manager.sessions == {}


async def test_directories_of_several_roots_are_checked_in_order(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A session's paths are checked in the threads of the root each names (a run of
    paths naming one root in one thread hop): across roots, the first that fails is still
    the one named, and the session keeps them all, in the order sent."""
    base = Path(await trio.Path(tmp_path).resolve())
    root_a, root_b = base / "a", base / "b"
    for directory in (root_a / "sub", root_b / "sub"):
        directory.mkdir(parents=True)
    roots = (root_a, root_b)
    async with open_hub(root_a, acp_schema, ScriptModel([[{"text": "x"}]]), roots=roots) as hub:
        extra = [str(root_b), str(root_a / "sub"), str(root_b / "missing"), str(root_a / "gone")]
        error = await new_session_error(hub, cwd=str(root_a), additionalDirectories=extra)
        assert error == {
            "code": -32602,
            "message": f"Invalid params: additionalDirectories[2] {extra[2]!r} is not a directory",
        }
        extra = [str(root_b), str(root_a / "sub"), str(root_b / "sub")]
        link = await hub.connect()
        await initialize(link.client)
        session_id = await link.client.new_session(str(root_b / "sub"), additionalDirectories=extra)
        session = hub.manager.sessions[session_id]
        assert (session.root, session.cwd) == (str(root_b), str(root_b / "sub"))
        assert session.additional_directories == tuple(extra)


async def test_an_additional_directory_swapped_for_a_symlink_lets_nothing_out(
    layout: tuple[Path, Path], acp_schema: SchemaChecker
) -> None:
    """The allowed roots are the ones resolved when the session opened: an additional
    directory replaced by a symlink to outside afterwards does not widen them (the roots
    were once resolved again for every tool call, and then pointed outside)."""
    root, outside = layout
    extra = root / "extra"
    extra.mkdir()
    steps: list[dict[str, Any]] = [
        {"tool": "read_file", "input": {"path": f"{extra}/secret.txt"}},
        {"tool": "write_file", "input": {"path": f"{extra}/pwned.txt", "content": "pwned"}},
    ]
    async with open_hub(root, acp_schema, ScriptModel([steps])) as hub:
        link = await hub.connect()
        await initialize(link.client)
        result = await link.client.request(
            "session/new",
            {"cwd": str(root), "mcpServers": [], "additionalDirectories": [str(extra)]},
        )
        session_id = result["sessionId"]
        extra.rmdir()
        extra.symlink_to(outside)
        assert await link.client.prompt(session_id, "escape") == "end_turn"
        finals = tool_outcomes(link.client, session_id)
        assert [u["status"] for u in finals] == ["failed", "failed"]
        for update in finals:
            assert "outside the allowed roots" in update["content"][0]["content"]["text"]
        assert SECRET not in str(link.client.received)
        assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


async def test_paths_that_cannot_be_resolved_are_invalid_params_or_failed_tools(
    layout: tuple[Path, Path], acp_schema: SchemaChecker
) -> None:
    """A symlink loop under a cwd, an additional directory or a tool's path: -32602 naming
    the field, and a failed tool call with the turn going on (each was an internal error,
    and the tool's ended the whole turn)."""
    root, _ = layout
    (root / "loop").symlink_to(root / "loop")
    steps: list[dict[str, Any]] = [
        {"tool": "read_file", "input": {"path": "loop/x.txt"}},
        {"text": "still here"},
    ]
    async with open_hub(root, acp_schema, ScriptModel([steps])) as hub:
        # (Python 3.13 resolves through a loop without a word; _paths.resolve_path names
        # it on every version, so each refusal below says the same everywhere.)
        loop = str(root / "loop" / "sub")
        error = await new_session_error(hub, cwd=loop)
        assert error["code"] == -32602 and "cwd" in error["message"], error
        assert "cannot be resolved" in error["message"]
        error = await new_session_error(hub, cwd=str(root), additionalDirectories=[loop])
        assert error["code"] == -32602 and "additionalDirectories[0]" in error["message"]
        link = await hub.connect()
        await initialize(link.client)
        listed = await link.client.request_raw("session/list", {"cwd": loop})
        assert listed["error"]["code"] == -32602
        assert "cannot be resolved" in listed["error"]["message"]
        session_id = await link.client.new_session(str(root))
        assert await link.client.prompt(session_id, "loop") == "end_turn"
        updates = link.client.updates(session_id)
        failed = [u for u in updates if u.get("status") == "failed"]
        assert len(failed) == 1
        text = failed[0]["content"][0]["content"]["text"]
        assert "cannot be resolved" in text
        assert any(u["sessionUpdate"] == "agent_message_chunk" for u in updates)


def swap_for_a_link_after_the_check(
    monkeypatch: pytest.MonkeyPatch, directory: Path, target: Path
) -> None:
    """Make the tools' path check swap ``directory`` (renamed ``<name>-was``) for a link to
    ``target`` right after it passes: the race a local process runs, won every time."""
    from punie_trio.worker import _tools

    checked = _tools.resolve_inside

    def check_then_swap(path: str, cwd: str, roots: Any, private: Any = ()) -> Path:
        resolved = checked(path, cwd, roots, private)
        directory.rename(directory.with_name(directory.name + "-was"))
        directory.symlink_to(target)
        return resolved

    monkeypatch.setattr(_tools, "resolve_inside", check_then_swap)


@pytest.mark.parametrize("tool", ["read_file", "write_file"])
async def test_a_directory_swapped_for_a_symlink_after_the_check_is_not_followed(
    layout: tuple[Path, Path], acp_schema: SchemaChecker, monkeypatch: pytest.MonkeyPatch, tool: str
) -> None:
    """A local process swaps a checked directory for a symlink to outside between the
    path check and the open (an audit won that race in 2 of 3 runs with a tight loop of
    swaps): the tool opens one directory at a time without following links, so it fails
    and nothing outside is read or written. The swap is made at that very moment here."""
    root, outside = layout
    (outside / "secret.txt").write_text(SECRET)
    race = root / "race"
    race.mkdir()
    (race / "secret.txt").write_text("inside")
    swap_for_a_link_after_the_check(monkeypatch, race, outside)
    steps = [{"tool": tool, "input": {"path": "race/secret.txt", "content": "pwned"}}]
    async with open_hub(root, acp_schema, ScriptModel([steps])) as hub:
        link = await hub.connect()
        await initialize(link.client)
        session_id = await link.client.new_session(str(root))
        assert await link.client.prompt(session_id, "race") == "end_turn"
        finals = tool_outcomes(link.client, session_id)
        assert [u["status"] for u in finals] == ["failed"]
        text = finals[0]["content"][0]["content"]["text"]
        assert "cannot be opened without following a symlink" in text
    assert SECRET not in str(link.client.received)
    assert (outside / "secret.txt").read_text() == SECRET
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


@pytest.mark.parametrize("tool", ["read_file", "write_file"])
async def test_a_link_swapped_in_above_an_additional_directory_is_not_followed(
    layout: tuple[Path, Path], acp_schema: SchemaChecker, monkeypatch: pytest.MonkeyPatch, tool: str
) -> None:
    """The same race, one level up: the additional directory ``proj/a/b`` stays, its parent
    ``proj/a`` becomes a link to ``outside/a``. The open started at the additional
    directory itself and followed the link (an audit read outside in 40 of 200 tries);
    it walks down from the project root now."""
    root, outside = layout
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f.txt").write_text("inside")
    (outside / "a" / "b").mkdir(parents=True)
    (outside / "a" / "b" / "f.txt").write_text(SECRET)
    swap_for_a_link_after_the_check(monkeypatch, root / "a", outside / "a")
    steps = [{"tool": tool, "input": {"path": "a/b/f.txt", "content": "pwned"}}]
    async with open_hub(root, acp_schema, ScriptModel([steps])) as hub:
        link = await hub.connect()
        await initialize(link.client)
        session_id = await link.client.new_session(
            str(root), additionalDirectories=[str(root / "a" / "b")]
        )
        assert await link.client.prompt(session_id, "race") == "end_turn"
        finals = tool_outcomes(link.client, session_id)
        assert [u["status"] for u in finals] == ["failed"]
        assert "cannot be opened without following a symlink" in str(finals[0])
    assert SECRET not in str(link.client.received)
    assert (outside / "a" / "b" / "f.txt").read_text() == SECRET


@pytest.mark.parametrize("method", ["session/new", "session/load"])
async def test_a_session_keeps_the_directories_as_checked(
    layout: tuple[Path, Path],
    acp_schema: SchemaChecker,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
) -> None:
    """``proj/sub`` is a link to ``proj/real`` when the additional directory is checked and
    to ``outside`` just after. The session was given the path resolved a second time:
    outside, never checked (an audit won that race in 3-8 tries), and its tools then read
    there. It keeps the path that was checked now."""
    from punie_trio.hub import _lifecycle

    root, outside = layout
    (root / "real").mkdir()
    sub = root / "sub"
    sub.symlink_to(root / "real")
    check = _lifecycle._resolve_param

    def check_then_swap(path: str, where: str) -> Path:
        resolved = check(path, where)
        if where == "additionalDirectories[0]":
            sub.unlink()
            sub.symlink_to(outside)
        return resolved

    steps = [{"tool": "read_file", "input": {"path": str(outside / "secret.txt")}}]
    async with open_hub(root, acp_schema, ScriptModel([steps, steps])) as hub:
        link = await hub.connect()
        await initialize(link.client)
        params = {"cwd": str(root), "mcpServers": [], "additionalDirectories": [str(sub)]}
        if method == "session/load":
            session_id = await link.client.new_session(str(root))
            await link.client.request("session/close", {"sessionId": session_id})
            params["sessionId"] = session_id
        monkeypatch.setattr(_lifecycle, "_resolve_param", check_then_swap)
        result = await link.client.request(method, params)
        session_id = result.get("sessionId", params.get("sessionId"))
        assert hub.manager.sessions[session_id].additional_directories == (str(root / "real"),)
        assert await link.client.prompt(session_id, "read outside") == "end_turn"
        finals = tool_outcomes(link.client, session_id)
        assert [u["status"] for u in finals] == ["failed"]
        assert "outside the allowed roots" in str(finals[0])
    assert SECRET not in str(link.client.received)


async def test_a_directory_given_to_a_file_tool_is_named_as_one(
    layout: tuple[Path, Path], acp_schema: SchemaChecker
) -> None:
    """It read "[Errno 21] Is a directory: 17", the number a file descriptor."""
    root, _ = layout
    steps = [
        {"tool": "read_file", "input": {"path": "."}},
        {"tool": "write_file", "input": {"path": ".", "content": "x"}},
    ]
    async with open_hub(root, acp_schema, ScriptModel([steps])) as hub:
        link = await hub.connect()
        await initialize(link.client)
        session_id = await link.client.new_session(str(root))
        assert await link.client.prompt(session_id, "dirs") == "end_turn"
        failed = [
            u["content"][0]["content"]["text"]
            for u in tool_outcomes(link.client, session_id)
            if u["status"] == "failed"
        ]
    assert failed == [
        f"cannot read {root}: it is a directory",
        f"cannot write {root}: it is a directory",
    ]


async def test_a_fifo_or_socket_is_refused_not_waited_on(
    layout: tuple[Path, Path], acp_schema: SchemaChecker
) -> None:
    """A file tool on a FIFO waited in its open for a writer (or reader) that never came:
    the turn hung, session/cancel could not end it (the open runs in a thread), and a
    SIGTERM'd server gave up after its shutdown timeout and exited 1. Anything but a
    regular file (or a directory, named as one) fails the tool call now, at once, and
    nothing is read from or written into it."""
    root, _ = layout
    os.mkfifo(root / "fifo")
    os.mkfifo(root / "fifo-read-by-someone")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "sock"))
    # Someone reads this one: a write would open at once, and hand it the content.
    reader = os.open(root / "fifo-read-by-someone", os.O_RDONLY | os.O_NONBLOCK)
    steps: list[dict[str, Any]] = [
        {"tool": "read_file", "input": {"path": "fifo"}},
        {"tool": "read_file", "input": {"path": "fifo", "line": 2, "limit": 1}},
        {"tool": "write_file", "input": {"path": "fifo", "content": "x"}},
        {"tool": "write_file", "input": {"path": "fifo-read-by-someone", "content": "x"}},
        {"tool": "read_file", "input": {"path": "sock"}},
        {"tool": "write_file", "input": {"path": "sock", "content": "x"}},
        {"text": "still here"},
    ]
    try:
        async with open_hub(root, acp_schema, ScriptModel([steps])) as hub:
            link = await hub.connect()
            await initialize(link.client)
            session_id = await link.client.new_session(str(root))
            assert await link.client.prompt(session_id, "special files") == "end_turn"
            finals = tool_outcomes(link.client, session_id)
            assert link.client.agent_text(session_id) == "still here"
        assert os.read(reader, 1) == b""  # (nothing was written into it)
    finally:
        os.close(reader)
        listener.close()
    texts = [u["content"][0]["content"]["text"] for u in finals]
    assert [u["status"] for u in finals] == ["failed"] * 6
    fifo, sock = root / "fifo", root / "sock"
    assert texts == [
        f"cannot read {fifo}: not a regular file (a FIFO)",
        f"cannot read {fifo}: not a regular file (a FIFO)",
        f"cannot write {fifo}: not a regular file (a FIFO)",
        f"cannot write {root / 'fifo-read-by-someone'}: not a regular file (a FIFO)",
        f"cannot read {sock}: not a regular file (a socket)",
        f"cannot write {sock}: not a regular file (a socket)",
    ]


async def test_tool_call_locations_name_the_file_used_and_only_inside(
    layout: tuple[Path, Path], acp_schema: SchemaChecker
) -> None:
    """A tool call's ``locations`` (what an IDE's follow-along opens) were the path with
    ``..`` collapsed as text: a path the call refused pointed the IDE outside the project
    (``/proc/self/environ``, another user's home), and ``lnk/../f.txt``, with ``lnk`` a
    link to ``deep/er``, named ``proj/f.txt`` while ``proj/deep/f.txt`` was read. They
    name the resolved path now, as the ``fs/*`` request does, and none for a refused one."""
    root, outside = layout
    (root / "deep" / "er").mkdir(parents=True)
    (root / "deep" / "f.txt").write_text("deep")
    (root / "f.txt").write_text("top")
    (root / "lnk").symlink_to(root / "deep" / "er")
    paths = [p.format(outside=outside) for p in ESCAPES] + ["/proc/self/environ", "~root/x"]
    steps: list[dict[str, Any]] = [{"tool": "read_file", "input": {"path": p}} for p in paths]
    steps.append({"tool": "read_file", "input": {"path": "lnk/../f.txt"}})
    async with open_hub(root, acp_schema, ScriptModel([steps])) as hub:
        link = await hub.connect()
        await initialize(link.client)
        session_id = await link.client.new_session(str(root))
        assert await link.client.prompt(session_id, "where") == "end_turn"
        calls = [u for u in link.client.updates(session_id) if u["sessionUpdate"] == "tool_call"]
        finals = tool_outcomes(link.client, session_id)
    assert [u["status"] for u in finals] == ["failed"] * len(paths) + ["completed"]
    assert [c.get("locations") for c in calls] == [None] * len(paths) + [
        [{"path": str(root / "deep" / "f.txt")}]
    ]
    assert finals[-1]["rawOutput"] == {"output": "deep"}


@pytest.mark.parametrize("through_client", [True, False], ids=["client-fs", "disk"])
async def test_a_path_ending_in_a_slash_names_a_directory(
    layout: tuple[Path, Path], acp_schema: SchemaChecker, through_client: bool
) -> None:
    """``new/`` names a directory, as it does to the OS and a shell: ``write_file`` of it
    made a file ``new`` (on disk or through the client, the slash dropped), and every
    later write under ``new/`` then failed "Not a directory"; ``read_file`` of
    ``inside.txt/`` read the file. Both fail now, naming the slash, and nothing is
    written or asked of the client."""
    root, _ = layout
    (root / "sub").mkdir()
    steps: list[dict[str, Any]] = [
        {"tool": "write_file", "input": {"path": "new/", "content": "x"}},
        {"tool": "write_file", "input": {"path": "new/.", "content": "x"}},
        {"tool": "read_file", "input": {"path": "inside.txt/"}},
        {"tool": "read_file", "input": {"path": "sub/"}},
    ]
    async with open_hub(root, acp_schema, ScriptModel([steps])) as hub:
        link = await hub.connect(files={str(root / "inside.txt"): "inside (editor)"})
        caps = {"fs": {"readTextFile": True, "writeTextFile": True}} if through_client else {}
        await initialize(link.client, **caps)
        session_id = await link.client.new_session(str(root))
        assert await link.client.prompt(session_id, "slashes") == "end_turn"
        finals = tool_outcomes(link.client, session_id)
        calls = [u for u in link.client.updates(session_id) if u["sessionUpdate"] == "tool_call"]
    assert [u["status"] for u in finals] == ["failed"] * 4
    assert [u["content"][0]["content"]["text"] for u in finals] == [
        "input.path 'new/' ends in '/': it names a directory, not a file",
        "input.path 'new/.' ends in '/.': it names a directory, not a file",
        "input.path 'inside.txt/' ends in '/': it names a directory, not a file",
        "input.path 'sub/' ends in '/': it names a directory, not a file",
    ]
    assert [c.get("locations") for c in calls] == [None] * 4
    assert link.client.agent_requests == []
    assert not (root / "new").exists()


@pytest.mark.parametrize("through_client", [True, False], ids=["client-fs", "disk"])
async def test_a_path_that_resolves_to_a_name_not_utf8_is_refused(
    layout: tuple[Path, Path], acp_schema: SchemaChecker, through_client: bool
) -> None:
    """A client can only send UTF-8 paths, but a symlink inside the project can lead to a
    name that is not (``caf\\xe9``). A cwd resolved there was an internal error (-32603,
    the store refusing the lone surrogate) and an additional directory was kept, listed
    with a ``\\udce9`` no load could send back; a tool's path sent that escape in its
    ``locations`` and its ``fs/*`` request, which no client can open (and strict JSON
    parsers reject). Each is refused now, naming the path: -32602, or a failed tool call
    with nothing sent to the client."""
    root, _ = layout
    odd = root / os.fsdecode(b"caf\xe9")
    odd.mkdir()
    (odd / "f.txt").write_text("odd")
    (root / "link").symlink_to(odd)
    (root / "flink").symlink_to(odd / "f.txt")
    steps: list[dict[str, Any]] = [
        {"tool": "read_file", "input": {"path": "flink"}},
        {"tool": "write_file", "input": {"path": "flink", "content": "x"}},
        {"tool": "read_file", "input": {"path": "link/f.txt"}},
    ]
    async with open_hub(root, acp_schema, ScriptModel([steps])) as hub:
        link = str(root / "link")
        for params in ({"cwd": link}, {"cwd": str(root), "additionalDirectories": [link]}):
            error = await new_session_error(hub, **params)
            where = "cwd" if "additionalDirectories" not in params else "additionalDirectories[0]"
            assert error == {
                "code": -32602,
                "message": f"Invalid params: {where} {link!r} resolves to {str(odd)!r}, "
                "a path that is not UTF-8 (no client could name it)",
            }
        assert hub.manager.sessions == {}
        client_link = await hub.connect()
        caps = {"fs": {"readTextFile": True, "writeTextFile": True}} if through_client else {}
        await initialize(client_link.client, **caps)
        session_id = await client_link.client.new_session(str(root))
        assert await client_link.client.prompt(session_id, "odd") == "end_turn"
        finals = tool_outcomes(client_link.client, session_id)
        calls = [
            u for u in client_link.client.updates(session_id) if u["sessionUpdate"] == "tool_call"
        ]
    assert [u["status"] for u in finals] == ["failed"] * 3
    for update, path in zip(finals, ["flink", "flink", "link/f.txt"], strict=True):
        assert update["content"][0]["content"]["text"] == (
            f"path {path!r} resolves to {str(odd / 'f.txt')!r}, a path that is not UTF-8 "
            "(no client could name it)"
        )
    assert [c.get("locations") for c in calls] == [None] * 3
    assert client_link.client.agent_requests == []
    assert (odd / "f.txt").read_text() == "odd"


@pytest.mark.parametrize("through_client", [True, False], ids=["client-fs", "disk"])
async def test_tools_cannot_touch_the_servers_data_directory(
    tmp_path: Path, acp_schema: SchemaChecker, start_server: StartServer, through_client: bool
) -> None:
    """The data directory holds the bearer token and every session's transcript, of every
    project. Where it lies inside a project root (``punie-trio serve`` started in the home
    directory serves ``~``, and ``~/.local/share/punie-trio`` with it) a session's tools
    read the token and the store and could overwrite them. Tool paths inside it are refused
    now, as paths outside the roots are: nothing is read, written or asked of the client.
    So is the config file the server read (it may hold ``token =``)."""
    root = Path(await trio.Path(tmp_path).resolve())
    data = root / "data"  # (the in-process server's data directory, inside its project)
    data.mkdir(exist_ok=True)
    (data / "token").write_text("the-token")
    (root / "tok").symlink_to(data / "token")
    (root / "mine.txt").write_text("mine")
    steps: list[dict[str, Any]] = [
        {"tool": "read_file", "input": {"path": "data/token"}},
        {"tool": "read_file", "input": {"path": "tok"}},
        {"tool": "read_file", "input": {"path": "data/sessions.sqlite3"}},
        {"tool": "write_file", "input": {"path": "data/sessions.sqlite3", "content": "x"}},
        {"tool": "write_file", "input": {"path": "data/new.txt", "content": "x"}},
        {"tool": "read_file", "input": {"path": "config.toml"}},
        {"tool": "write_file", "input": {"path": "config.toml", "content": "x"}},
        {"tool": "read_file", "input": {"path": "mine.txt"}},
    ]
    (root / "config.toml").write_text('token = "config-token"\n')
    store_before = (
        (data / "sessions.sqlite3").read_bytes() if (data / "sessions.sqlite3").exists() else None
    )
    async with (
        start_server(ScriptModel([steps]), config_path=root / "config.toml") as running,
        acp_ws_client(running.url, acp_schema, files={str(root / "mine.txt"): "mine"}) as (
            client,
            _,
        ),
    ):
        caps = {"fs": {"readTextFile": True, "writeTextFile": True}} if through_client else {}
        await client.initialize(**caps)
        session_id = await client.new_session(str(root))
        assert await client.prompt(session_id, "data") == "end_turn"
        finals = tool_outcomes(client, session_id)
        asked = [r["params"]["path"] for r in client.agent_requests]
    assert [u["status"] for u in finals] == ["failed"] * 7 + ["completed"]
    for update in finals[:5]:
        text = update["content"][0]["content"]["text"]
        assert f"which lies inside the server's data directory ({data})" in text, text
    for update in finals[5:7]:
        text = update["content"][0]["content"]["text"]
        assert f"which is the server's config file ({root / 'config.toml'})" in text, text
    assert "the-token" not in str(client.received)
    assert "config-token" not in str(client.received)
    assert (root / "config.toml").read_text() == 'token = "config-token"\n'
    assert asked == ([str(root / "mine.txt")] if through_client else [])
    assert (data / "token").read_text() == "the-token"
    assert not (data / "new.txt").exists()
    assert store_before is None or (data / "sessions.sqlite3").exists()


async def test_another_name_for_the_config_file_is_refused_too(
    tmp_path: Path, acp_schema: SchemaChecker, start_server: StartServer
) -> None:
    """The server's files were told by their path's text alone: another name for the same
    file passed. On a case-insensitive file system (macOS's default, Windows)
    ``Library/Application Support/PUNIE-TRIO/token`` is the data directory's token; here
    a hard link to the config file (a dotfiles project that links it in) stands for such a
    name. What the path names is compared too now: the file itself, and each directory it
    lies in (the data directory under another name)."""
    root = Path(await trio.Path(tmp_path).resolve())
    (root / "dotfiles").mkdir()
    (root / "config.toml").write_text('token = "config-token"\n')
    os.link(root / "config.toml", root / "dotfiles" / "punie.toml")
    steps: list[dict[str, Any]] = [
        {"tool": "read_file", "input": {"path": "dotfiles/punie.toml"}},
        {"tool": "write_file", "input": {"path": "dotfiles/punie.toml", "content": "x"}},
    ]
    async with (
        start_server(ScriptModel([steps]), config_path=root / "config.toml") as running,
        acp_ws_client(running.url, acp_schema) as (client, _),
    ):
        await client.initialize()
        session_id = await client.new_session(str(root))
        assert await client.prompt(session_id, "config") == "end_turn"
        finals = tool_outcomes(client, session_id)
    assert [u["status"] for u in finals] == ["failed"] * 2
    for update in finals:
        text = update["content"][0]["content"]["text"]
        assert f"which is the server's config file ({root / 'config.toml'})" in text, text
    assert "config-token" not in str(client.received)
    assert (root / "dotfiles" / "punie.toml").read_text() == 'token = "config-token"\n'


async def test_a_tool_path_that_is_slow_to_resolve_holds_up_only_its_own_turn(
    layout: tuple[Path, Path], acp_schema: SchemaChecker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolving a tool's path walks the file system (a ``stat`` a component, the
    server's own files compared by inode), once a call (for its ``locations`` and the
    tool). It ran on the event loop, so a project on a network mount that stopped
    answering froze every client of the server. It runs in a thread now: here the first
    resolve waits (as a hung mount would) while another client's turn, tool call and
    all, is answered."""
    import threading

    from punie_trio.worker import _tools

    root, _ = layout
    entered, release = threading.Event(), threading.Event()
    timed_out: list[bool] = []
    resolve = _tools.resolve_inside

    def hung_once(*args: Any) -> Path:
        if not entered.is_set():
            entered.set()
            timed_out.append(not release.wait(timeout=10))
        return resolve(*args)

    monkeypatch.setattr(_tools, "resolve_inside", hung_once)
    steps = [{"tool": "read_file", "input": {"path": "inside.txt"}}, {"text": "done"}]
    async with open_hub(root, acp_schema, ScriptModel([steps])) as hub:
        a, b = await hub.connect(), await hub.connect()
        for link in (a, b):
            await initialize(link.client)
        session_a = await a.client.new_session(str(root))
        session_b = await b.client.new_session(str(root))
        await send_prompt(a.client, "slow", session_a, "read")
        await trio.to_thread.run_sync(entered.wait)
        assert await b.client.prompt(session_b, "read") == "end_turn"
        assert timed_out == []  # (the loop was not held: b's turn went through meanwhile)
        release.set()
        answer = await a.client.wait_for(lambda m: m.get("id") == "slow")
        assert answer["result"] == {"stopReason": "end_turn"}
        assert timed_out == [False]
        for client, session_id in ((a.client, session_a), (b.client, session_b)):
            assert [u["status"] for u in tool_outcomes(client, session_id)] == ["completed"]


async def test_a_session_path_that_is_slow_to_resolve_holds_up_only_its_own_request(
    layout: tuple[Path, Path], acp_schema: SchemaChecker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``session/new``'s and ``session/load``'s ``cwd`` and ``additionalDirectories`` are
    resolved and looked at (``realpath``, ``stat``). That ran on the event loop, so a
    directory on a network mount that stopped answering froze every client of the server.
    It runs in a thread now: here every resolve under ``mount/`` waits (as a hung mount
    would) while another client opens a session and runs a turn, and the hung requests'
    cancels are not held by the walk: a ``$/cancel_request`` is answered -32800, and a
    connection closing mid-load ends, while the walks still wait."""
    import threading

    from punie_trio.hub import _lifecycle

    root, _ = layout
    (root / "mount").mkdir()
    entered, left = threading.Semaphore(0), threading.Semaphore(0)
    release = threading.Event()
    timed_out: list[bool] = []
    resolve = _lifecycle.resolved

    def hung_under_mount(path: str) -> str:
        if "mount" not in path:
            return resolve(path)
        entered.release()
        try:
            timed_out.append(not release.wait(timeout=10))
            return resolve(path)
        finally:
            left.release()

    monkeypatch.setattr(_lifecycle, "resolved", hung_under_mount)
    steps = [{"tool": "read_file", "input": {"path": "inside.txt"}}, {"text": "done"}]
    async with open_hub(root, acp_schema, ScriptModel([steps])) as hub:
        a, b = await hub.connect(), await hub.connect()
        for link in (a, b):
            await initialize(link.client)
        new = {"cwd": str(root / "mount"), "mcpServers": []}
        await a.client.send(
            {"jsonrpc": "2.0", "id": "slow", "method": "session/new", "params": new}
        )
        await trio.to_thread.run_sync(entered.acquire)
        session_b = await b.client.new_session(str(root))
        assert await b.client.prompt(session_b, "read") == "end_turn"
        assert timed_out == []  # (the loop was not held: b's turn went through meanwhile)
        await a.client.notify("$/cancel_request", {"requestId": "slow"})
        answer = await a.client.wait_for(lambda m: m.get("id") == "slow")
        assert answer["error"]["code"] == -32800, answer
        assert list(hub.manager.sessions) == [session_b]  # (nothing opened for a)

        # A load whose additional directory hangs, and its connection closes meanwhile.
        session_a = await a.client.new_session(str(root))
        await a.client.request("session/close", {"sessionId": session_a})
        load = {
            "sessionId": session_a,
            "cwd": str(root),
            "mcpServers": [],
            "additionalDirectories": [str(root / "mount")],
        }
        await a.client.send(
            {"jsonrpc": "2.0", "id": "load", "method": "session/load", "params": load}
        )
        await trio.to_thread.run_sync(entered.acquire)
        await a.drop()
        await hub.settle()
        assert a.connection not in hub.manager.connections  # (its end was not held)
        assert list(hub.manager.sessions) == [session_b]
        assert timed_out == []
        release.set()
        for _ in range(2):  # (the abandoned walks end once the "mount" answers)
            await trio.to_thread.run_sync(left.acquire)
    assert timed_out == [False, False]


async def test_a_hung_root_holds_up_only_its_own_threads(
    tmp_path: Path, acp_schema: SchemaChecker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread abandoned on cancel (a path check, a tool's read or write) keeps its slot
    until the file system answers. Every such thread took a slot of Trio's one default
    limiter (40), so 40 requests stuck on one hung mount (one project) made every other
    threaded operation of the server wait: another project's ``session/new`` and tool
    calls, the dev app's file reads. Each served root has threads of its own now
    (``_threads.ROOT_THREADS``): here 40 ``session/new`` with a cwd on a hung mount under
    root ``a`` take all of ``a``'s; root ``b``'s ``session/new`` and a turn reading and
    writing its files go through (stored in SQLite, whose thread is its own), and so does
    a thread on the default limiter (the dev app's). What waits for one of ``a``'s threads
    has started nothing and is cancellable: a ``session/new`` in ``a``
    (``$/cancel_request``: -32800) and a turn whose tool call's path waits to be checked
    (``session/cancel``: the turn ends cancelled before the call is reported)."""

    from punie_trio import _threads

    base = Path(await trio.Path(tmp_path).resolve())
    root_a, root_b = base / "a", base / "b"
    (root_a / "mount").mkdir(parents=True)
    root_b.mkdir()
    for root in (root_a, root_b):
        (root / "inside.txt").write_text("inside")
    mount = str(root_a / "mount")
    entered, release, timed_out = _hang_resolves_under(monkeypatch, mount)
    fill = trio.to_thread.current_default_thread_limiter().total_tokens
    assert fill > _threads.ROOT_THREADS
    steps = [
        {"tool": "read_file", "input": {"path": "inside.txt"}},
        {"tool": "write_file", "input": {"path": "new.txt", "content": "written"}},
        {"text": "done"},
    ]
    model = ScriptModel([steps])
    async with (
        open_sqlite_store(base / "sessions.sqlite3") as store,  # (its own thread, no limiter)
        open_hub(root_a, acp_schema, model, store=store, roots=(root_a, root_b)) as hub,
    ):
        a, b = await hub.connect(), await hub.connect()
        for link in (a, b):
            await initialize(link.client)
        session_a = await a.client.new_session(str(root_a))  # (before the mount hangs)
        new = {"cwd": mount, "mcpServers": []}
        for i in range(fill):
            await a.client.send(
                {"jsonrpc": "2.0", "id": f"hung{i}", "method": "session/new", "params": new}
            )
        for _ in range(_threads.ROOT_THREADS):
            await trio.to_thread.run_sync(entered.acquire)
        await hub.settle()
        slots = _threads.slots_for(str(root_a)).limiter
        assert (slots.borrowed_tokens, slots.statistics().tasks_waiting) == (
            _threads.ROOT_THREADS,
            fill - _threads.ROOT_THREADS,
        )
        await trio.to_thread.run_sync(lambda: None)  # (the default limiter: the dev app's)
        session_b = await b.client.new_session(str(root_b))
        assert await b.client.prompt(session_b, "read and write") == "end_turn"
        assert [u["status"] for u in tool_outcomes(b.client, session_b)] == ["completed"] * 2
        assert (root_b / "new.txt").read_text() == "written"
        record = await store.get_session(session_b)
        assert record is not None and record.turns == 1

        # Waiting for a's threads: cancellable, nothing started.
        await a.client.send(
            {
                "jsonrpc": "2.0",
                "id": "in-a",
                "method": "session/new",
                "params": {**new, "cwd": str(root_a)},
            }
        )
        await send_prompt(a.client, "turn-a", session_a, "read")
        await hub.settle()
        assert slots.statistics().tasks_waiting == fill - _threads.ROOT_THREADS + 2
        await a.client.notify("$/cancel_request", {"requestId": "in-a"})
        answer = await a.client.wait_for(lambda m: m.get("id") == "in-a")
        assert answer["error"]["code"] == -32800, answer
        await a.client.notify("session/cancel", {"sessionId": session_a})
        answer = await a.client.wait_for(lambda m: m.get("id") == "turn-a")
        assert answer["result"] == {"stopReason": "cancelled"}
        # (Cancelled while its path waited to be checked: no tool call was reported.)
        assert not [u for u in a.client.updates(session_a) if "toolCallId" in u]
        assert slots.statistics().tasks_waiting == fill - _threads.ROOT_THREADS
        assert timed_out == []  # (all of that while a's mount still hung)
        release.set()
        for i in range(fill):
            answer = await a.client.wait_for(lambda m, i=i: m.get("id") == f"hung{i}")
            assert "sessionId" in answer["result"], answer
    assert timed_out == [False] * fill
    assert not (root_a / "new.txt").exists()


async def test_a_root_whose_threads_stay_busy_refuses_with_a_clear_error(
    tmp_path: Path,
    acp_schema: SchemaChecker,
    monkeypatch: pytest.MonkeyPatch,
    mock_clock: trio.testing.MockClock,
) -> None:
    """What waits :data:`~punie_trio._threads.ROOT_WAIT` seconds for one of its root's
    threads, all held by a file system that does not answer, is refused rather than left
    waiting for ever: a ``session/new`` with -32603 naming the root, a tool call failed
    with the same words (the turn goes on). Once the mount answers, the root serves
    again."""

    from punie_trio import _threads

    root = Path(await trio.Path(tmp_path).resolve())
    (root / "mount").mkdir()
    (root / "inside.txt").write_text("inside")
    mount = str(root / "mount")
    entered, release, timed_out = _hang_resolves_under(monkeypatch, mount)
    steps = [{"tool": "read_file", "input": {"path": "inside.txt"}}, {"text": "done"}]
    async with open_hub(root, acp_schema, ScriptModel([steps])) as hub:
        link = await hub.connect()
        await initialize(link.client)
        client = link.client
        session_id = await client.new_session(str(root))  # (before the mount hangs)
        new = {"cwd": mount, "mcpServers": []}
        for i in range(_threads.ROOT_THREADS):
            await client.send(
                {"jsonrpc": "2.0", "id": f"hung{i}", "method": "session/new", "params": new}
            )
        for _ in range(_threads.ROOT_THREADS):
            await trio.to_thread.run_sync(entered.acquire)
        await client.send(
            {
                "jsonrpc": "2.0",
                "id": "refused",
                "method": "session/new",
                "params": {"cwd": str(root), "mcpServers": []},
            }
        )
        await send_prompt(client, "turn", session_id, "read")
        await hub.settle()
        assert _threads.slots_for(str(root)).limiter.statistics().tasks_waiting == 2
        mock_clock.jump(_threads.ROOT_WAIT)
        answer = await client.wait_for(lambda m: m.get("id") == "refused")
        expected = (
            f"the file system of project root {root} is not answering: all "
            f"{_threads.ROOT_THREADS} threads for its files have been busy for "
            f"{_threads.ROOT_WAIT:g} s (a network mount that stopped answering?); nothing "
            "was done, try again once it answers"
        )
        assert answer["error"] == {"code": -32603, "message": f"Internal error: {expected}"}
        answer = await client.wait_for(lambda m: m.get("id") == "turn")
        assert answer["result"] == {"stopReason": "end_turn"}
        [outcome] = tool_outcomes(client, session_id)
        assert outcome["status"] == "failed"
        assert outcome["content"][0]["content"]["text"] == expected
        assert len(hub.manager.sessions) == 1  # (nothing opened by the refused request)
        assert timed_out == []
        release.set()
        for i in range(_threads.ROOT_THREADS):
            answer = await client.wait_for(lambda m, i=i: m.get("id") == f"hung{i}")
            assert "sessionId" in answer["result"], answer
        # The mount answers: the root serves again.
        other = await client.new_session(str(root))
        assert await client.prompt(other, "read") == "end_turn"
        assert [u["status"] for u in tool_outcomes(client, other)] == ["completed"]
    assert timed_out == [False] * _threads.ROOT_THREADS


def _hang_resolves_under(
    monkeypatch: pytest.MonkeyPatch, mount: str
) -> tuple[threading.Semaphore, threading.Event, list[bool]]:
    """Make the session path checks' resolves of paths under ``mount`` hang, as on a
    network mount that stopped answering, until the returned event is set: ``entered``
    counts the resolves that began, ``timed_out`` says for each whether its 10 s ran
    out first."""
    from punie_trio.hub import _lifecycle

    entered = threading.Semaphore(0)
    release = threading.Event()
    timed_out: list[bool] = []
    resolve = _lifecycle.resolved

    def hung_under_mount(path: str) -> str:
        if path.startswith(mount):
            entered.release()
            timed_out.append(not release.wait(timeout=10))
        return resolve(path)

    monkeypatch.setattr(_lifecycle, "resolved", hung_under_mount)
    return entered, release, timed_out
