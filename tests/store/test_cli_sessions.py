"""``punie-trio sessions ...`` and ``punie-trio token`` against a real store file."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from punie_trio._cli_sessions import _when, add_commands
from punie_trio._paths import ensure_data_dir, store_path, token_path
from punie_trio.store import SessionRecord, _sql, open_sqlite_store

from .conftest import make_record, text_update


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="punie-trio")
    add_commands(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No PUNIE_* variable or config file of the user's (the default config file is
    under ``$XDG_CONFIG_HOME``, here an empty directory)."""
    for name in list(os.environ):
        if name.startswith("PUNIE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))


def _turn0() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("user_message_chunk", text_update("user_message_chunk", "Fix the ")),
        ("user_message_chunk", text_update("user_message_chunk", "bug please")),
        ("agent_thought_chunk", text_update("agent_thought_chunk", "look at main.py")),
        (
            "plan",
            {
                "sessionUpdate": "plan",
                "entries": [
                    {"content": "Read main.py", "priority": "high", "status": "completed"},
                    {"content": "Patch it", "priority": "high", "status": "in_progress"},
                    {"content": "Run tests", "priority": "low", "status": "pending"},
                ],
            },
        ),
        (
            "tool_call",
            {
                "sessionUpdate": "tool_call",
                "toolCallId": "c1",
                "title": "Reading main.py",
                "kind": "read",
                "status": "pending",
            },
        ),
        (
            "tool_call_update",
            {"sessionUpdate": "tool_call_update", "toolCallId": "c1", "status": "completed"},
        ),
        ("agent_message_chunk", text_update("agent_message_chunk", "Done.\nAll ")),
        ("agent_message_chunk", text_update("agent_message_chunk", "fixed.")),
        ("session_info_update", {"sessionUpdate": "session_info_update", "title": "Fix bug"}),
        ("stop", {"stopReason": "end_turn"}),
    ]


async def _fill(data_dir: Path) -> None:
    ensure_data_dir(data_dir)
    async with open_sqlite_store(store_path(data_dir)) as store:
        await store.create_session(make_record("sess-old", title="Old one", updated_at=1.0))
        await store.create_session(
            make_record("sess-new", title="Fix bug", cwd="/proj/sub", updated_at=2.0)
        )
        await store.append_turn("sess-new", 0, _turn0())
        await store.append_turn(
            "sess-new",
            1,
            [
                ("user_message_chunk", text_update("user_message_chunk", "thanks")),
                ("stop", {"stopReason": "cancelled"}),
            ],
        )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    trio.run(_fill, path)
    return path


# The fixture runs trio.run itself, so these tests are synchronous.


def test_list(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sessions", "list", "--data-dir", str(data_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "UPDATED", "TURNS", "TITLE", "CWD"]
    assert lines[1].startswith("sess-new ") and "Fix bug" in lines[1]
    assert lines[1].endswith("/proj/sub") and " 2 " in lines[1]
    assert lines[2].startswith("sess-old ") and "Old one" in lines[2]
    assert len(lines) == 3


def test_list_cwd_and_empty(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sessions", "list", "--data-dir", str(data_dir), "--cwd", "/proj"]) == 0
    out = capsys.readouterr().out
    assert "sess-old" in out and "sess-new" not in out
    assert main(["sessions", "list", "--data-dir", str(data_dir), "--cwd", "/none"]) == 0
    assert capsys.readouterr().out.startswith("no sessions in ")


def test_a_filter_that_matches_nothing_is_said_as_such(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``list --cwd /none`` said ``no sessions in PATH``, as for an empty store: one who
    mistyped the directory read that the store held nothing. It names the filter."""
    assert main(["sessions", "list", "--data-dir", str(data_dir), "--cwd", "/none"]) == 0
    assert capsys.readouterr().out == (
        f"no sessions in {store_path(data_dir)} with cwd /none (of 2 sessions)\n"
    )


@pytest.mark.parametrize("cwd", ["", "  "])
def test_an_empty_cwd_is_exit_2_not_every_session(
    data_dir: Path, capsys: pytest.CaptureFixture[str], cwd: str
) -> None:
    """``--cwd ""`` (``--cwd "$DIR"`` with DIR unset) listed every session, as if no
    filter had been given; an empty path is an error everywhere else (--data-dir, --project)."""
    with pytest.raises(SystemExit) as info:
        main(["sessions", "list", "--data-dir", str(data_dir), "--cwd", cwd])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "argument --cwd: must not be empty" in captured.err


@pytest.mark.parametrize("cwd", ["~nosuchuser-punie/p", "loop"])
def test_a_cwd_that_cannot_be_resolved_is_exit_2_naming_it(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], cwd: str
) -> None:
    """``--cwd ~nosuchuser/p`` and ``--cwd`` through a symlink loop were RuntimeError
    tracebacks (expanduser's, and 3.11's resolve for a loop), as session/new once was for
    a client's cwd."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    if cwd == "loop":
        cwd = str(loop)
    assert main(["sessions", "list", "--data-dir", str(data_dir), "--cwd", cwd]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"punie-trio: error: --cwd {cwd!r} cannot be resolved: ")


def test_show(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sessions", "show", "sess-new", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "session  sess-new\ntitle    Fix bug\n" in out
    body = out[out.index("--- turn 1 ---") :]
    assert body == (
        "--- turn 1 ---\n"
        "user: Fix the bug please\n"
        "(thought): look at main.py\n"
        "plan:\n"
        "  [x] Read main.py\n"
        "  [~] Patch it\n"
        "  [ ] Run tests\n"
        "tool: Reading main.py [read] (pending)\n"
        "tool: Reading main.py -> completed\n"
        "agent: Done.\n"
        "       All fixed.\n"
        "named: Fix bug\n"
        "stop: end_turn\n"
        "\n"
        "--- turn 2 ---\n"
        "user: thanks\n"
        "stop: cancelled\n"
    )


async def _fill_failed(data_dir: Path) -> None:
    ensure_data_dir(data_dir)
    async with open_sqlite_store(store_path(data_dir)) as store:
        await store.create_session(make_record("sess-f"))
        stop = {"stopReason": "end_turn", "history": ["go", ""], "error": "RuntimeError: x"}
        await store.append_turn(
            "sess-f",
            0,
            [("user_message_chunk", text_update("user_message_chunk", "go")), ("stop", stop)],
        )


def test_show_says_a_turn_whose_model_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The prompt was answered with an error, not end_turn: show says so, and does not print
    the stored end_turn as if the client had been given it."""
    trio.run(_fill_failed, tmp_path / "data")
    assert main(["sessions", "show", "sess-f", "--data-dir", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert out.endswith(
        "user: go\nstop: failed, the prompt got an error (the model failed: RuntimeError: x)\n"
    )


async def _fill_failed_tools(data_dir: Path) -> None:
    ensure_data_dir(data_dir)

    def failed(call_id: str, text: str) -> dict[str, Any]:
        content = [{"type": "content", "content": {"type": "text", "text": text}}]
        return {
            "sessionUpdate": "tool_call_update",
            "toolCallId": call_id,
            "status": "failed",
            "content": content,
        }

    async with open_sqlite_store(store_path(data_dir)) as store:
        await store.create_session(make_record("sess-t"))
        call = {"sessionUpdate": "tool_call", "toolCallId": "c1", "title": "Read file ../x"}
        refused = {
            "sessionUpdate": "tool_call",
            "toolCallId": "c2",
            "title": "run_shell",
            "kind": "other",
            "status": "failed",
        }
        await store.append_turn(
            "sess-t",
            0,
            [
                ("user_message_chunk", text_update("user_message_chunk", "go")),
                ("tool_call", call),
                ("tool_call_update", failed("c1", "path '../x' is outside\nthe roots")),
                ("tool_call", refused),
                ("tool_call_update", failed("c2", "unsupported tool 'run_shell'")),
                ("stop", {"stopReason": "end_turn"}),
            ],
        )


def test_show_says_why_a_tool_call_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed tool call is shown with its message (it said "-> failed" and no more: the
    reason, stored in the update, was left out of the transcript a human reads)."""
    trio.run(_fill_failed_tools, tmp_path / "data")
    assert main(["sessions", "show", "sess-t", "--data-dir", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert out.endswith(
        "user: go\n"
        "tool: Read file ../x (pending)\n"
        "tool: Read file ../x -> failed: path '../x' is outside\\nthe roots\n"
        "tool: run_shell [other] (failed)\n"
        "tool: run_shell -> failed: unsupported tool 'run_shell'\n"
        "stop: end_turn\n"
    )


def test_damaged_rows_are_named_not_tracebacks(
    data_dir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A row edited by hand (or a damaged disk) gave a Python traceback from every command
    (list, show, export), and show had printed half the transcript first."""
    db = store_path(data_dir)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE sessions SET created_at = 'yesterday' WHERE id = 'sess-old'")
        conn.execute("UPDATE turns SET entries = entries || 'x' WHERE turn = 1")
    conn.close()
    assert main(["sessions", "list", "--data-dir", str(data_dir)]) == 0
    assert "sess-new" in capsys.readouterr().out
    assert "stored session 'sess-old' is damaged" in caplog.text
    for command in ("show", "export"):
        assert main(["sessions", command, "sess-new", "--data-dir", str(data_dir)]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err == (
            "punie-trio: the stored transcript of session 'sess-new' is damaged at entry 11"
            " (turn 2): Extra data: line 1 column 27 (char 26)\n"
        )
    assert main(["sessions", "show", "sess-old", "--data-dir", str(data_dir)]) == 1
    assert "stored session 'sess-old' is damaged: could not convert" in capsys.readouterr().err


def test_export_stdout_and_file(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sessions", "export", "sess-new", "--data-dir", str(data_dir)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["session"]["id"] == "sess-new"
    assert doc["session"]["turns"] == 2
    assert doc["session"]["additional_directories"] == ["/extra"]
    assert [e["seq"] for e in doc["transcript"]] == list(range(12))
    assert [(e["kind"], e["payload"]) for e in doc["transcript"][:10]] == _turn0()
    assert doc["transcript"][11] == {
        "session_id": "sess-new",
        "seq": 11,
        "turn": 1,
        "kind": "stop",
        "payload": {"stopReason": "cancelled"},
    }

    out_file = tmp_path / "out.json"
    argv = ["sessions", "export", "sess-new", "-o", str(out_file), "--data-dir", str(data_dir)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and str(out_file) in captured.err
    assert json.loads(out_file.read_text(encoding="utf-8")) == doc


@pytest.mark.parametrize("command", ["show", "export"])
def test_unknown_id(data_dir: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sessions", command, "nope-123", "--data-dir", str(data_dir)]) == 1
    captured = capsys.readouterr()
    assert "'nope-123'" in captured.err and captured.out == ""


@pytest.mark.parametrize("command", ["show", "export"])
def test_a_prefix_of_one_id_names_that_session_and_of_several_is_named_ambiguous(
    data_dir: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ids are 37 characters (``sess_`` and 32 hex digits) and ``list`` shows them whole:
    ``show sess_c26b`` was ``no session 'sess_c26b'`` although one session's id starts so.
    A prefix of exactly one id names it (as git takes a commit's); of several, the message
    names them, and nothing is printed. An exact id wins over being a prefix of others."""
    argv = ["sessions", command, "sess-n", "--data-dir", str(data_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert ("session  sess-new\n" in out) if command == "show" else ('"id": "sess-new"' in out)
    assert main(["sessions", command, "sess-", "--data-dir", str(data_dir)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"punie-trio: 'sess-' is the start of 2 session ids in {store_path(data_dir)} "
        "(sess-new, sess-old): give more of it\n"
    )
    trio.run(_add, data_dir, make_record("sess-n", title="Exact"))
    assert main(["sessions", command, "sess-n", "--data-dir", str(data_dir)]) == 0
    assert "Exact" in capsys.readouterr().out


async def _add(data_dir: Path, record: SessionRecord) -> None:
    async with open_sqlite_store(store_path(data_dir)) as store:
        await store.create_session(record)


@pytest.mark.parametrize(
    "argv", [["sessions", "list"], ["sessions", "show", "x"], ["sessions", "export", "x"]]
)
def test_a_file_given_as_the_data_directory_is_named_so(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A file given for ``--data-dir`` was "no session store at FILE/sessions.sqlite3", as
    if the directory were only empty; serve says it is not a directory, and so do these."""
    data_dir = tmp_path / "file"
    data_dir.write_text("not a directory")
    assert main([*argv, "--data-dir", str(data_dir)]) == 1
    err = capsys.readouterr().err
    assert f"cannot use data directory {data_dir}: it is not a directory" in err, err
    assert data_dir.read_text() == "not a directory"


@pytest.mark.parametrize(
    "argv", [["sessions", "list"], ["sessions", "show", "x"], ["sessions", "export", "x"]]
)
def test_missing_store_is_not_created(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "empty"
    assert main([*argv, "--data-dir", str(data_dir)]) == 1
    assert "no session store at" in capsys.readouterr().err
    assert not data_dir.exists()


@pytest.mark.parametrize(
    "argv", [["sessions", "list"], ["sessions", "show", "x"], ["sessions", "export", "x"]]
)
def test_an_empty_store_file_is_named_so_not_an_old_store(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A store file that no serve set up (0 bytes: one killed as it made the store, or a
    ``touch``) was ``schema version 0 is older than 4``, an old store that does not exist.
    It is named empty; nothing is written to it."""
    data_dir = ensure_data_dir(tmp_path / "data")
    store_path(data_dir).touch()
    assert main([*argv, "--data-dir", str(data_dir)]) == 1
    assert capsys.readouterr().err == (
        f"punie-trio: {store_path(data_dir)}: the session store is empty (no serve has set "
        "it up: it holds no sessions); start the server once to set it up\n"
    )
    assert store_path(data_dir).stat().st_size == 0


def test_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = ensure_data_dir(tmp_path / "data")
    assert main(["token", "--data-dir", str(data_dir)]) == 1
    assert "no token at" in capsys.readouterr().err
    token_path(data_dir).write_text("s3cret\n")
    assert main(["token", "--data-dir", str(data_dir)]) == 0
    assert capsys.readouterr().out == f"token file: {token_path(data_dir)}\ntoken: s3cret\n"


def test_default_data_dir_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PUNIE_DATA_DIR", str(tmp_path))
    token_path(tmp_path).write_text("abc")
    assert main(["token"]) == 0
    assert "token: abc" in capsys.readouterr().out


async def _fill_odd(data_dir: Path) -> None:
    ensure_data_dir(data_dir)
    async with open_sqlite_store(store_path(data_dir)) as store:
        await store.create_session(make_record("sess-odd", title="naïve ✓"))
        await store.append_turn(
            "sess-odd",
            0,
            [
                ("user_message_chunk", text_update("user_message_chunk", "a\ud800b")),
                ("stop", {"stopReason": "end_turn"}),
            ],
        )


def test_export_of_a_lone_surrogate_is_valid_utf8_json_and_replaces_the_file_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Text a client sent with a lone surrogate is escaped in the JSON (the same value);
    it once failed half-way and left an existing output file empty."""
    data_dir = tmp_path / "data"
    trio.run(_fill_odd, data_dir)
    out_file = tmp_path / "out.json"
    out_file.write_text("previous export\n")
    argv = ["sessions", "export", "sess-odd", "-o", str(out_file), "--data-dir", str(data_dir)]
    assert main(argv) == 0
    raw = out_file.read_bytes()
    assert b"\\ud800" in raw
    doc = json.loads(raw.decode("utf-8"))
    assert doc["transcript"][0]["payload"]["content"]["text"] == "a\ud800b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out.json"]  # no leftovers
    bad = ["sessions", "export", "sess-odd", "-o", str(tmp_path / "no" / "x.json")]
    assert main([*bad, "--data-dir", str(data_dir)]) == 1
    assert "cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["token"], ["sessions", "list"], ["sessions", "show", "x"]])
def test_a_data_dir_quoted_in_an_error_is_escaped_not_sent_to_the_terminal_raw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """A data directory (from a config file given by ``--config``, a repository's say)
    with an escape sequence went to the terminal raw in "no token at D/token yet" and "no
    session store at D/...": it could clear the screen or retitle the window. What is not
    printable is now escaped, as in ``serve``'s errors."""
    data_dir = tmp_path / "nx\x1b]0;owned\x07\x1b[2J"
    assert main([*command, "--data-dir", str(data_dir)]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err, err
    assert str(tmp_path / "nx\\x1b]0;owned\\x07\\x1b[2J") in err, err


def test_token_file_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = ensure_data_dir(tmp_path / "data")
    token_path(data_dir).write_bytes(b"\xff\xfe\n")
    assert main(["token", "--data-dir", str(data_dir)]) == 1
    assert "is not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["ab\x1b]0;owned\x07\x1b[2Jcd\n", "a\nb\n", "pässwörd\n"])
def test_a_token_file_with_what_no_token_has_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    """A token is printable ASCII (``serve`` generates one so, and refuses to start with
    any other): a token file holding anything else was not written by ``serve`` (in a
    data directory others can write to, it may hold escape sequences, which were printed
    to the terminal raw). It is refused, and not shown."""
    data_dir = ensure_data_dir(tmp_path / "data")
    token_path(data_dir).write_text(content)
    assert main(["token", "--data-dir", str(data_dir)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"token file {token_path(data_dir)} does not hold a token" in captured.err
    assert "\x1b" not in captured.err and "ö" not in captured.err


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "huge"])
def test_a_token_file_that_is_no_small_regular_file_is_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """A FIFO planted as ``DATA_DIR/token`` made ``punie-trio token`` wait for ever for a
    writer, and a link to ``/dev/zero`` was read until memory ran out (a review, 2026-12-07).
    The token file is a regular file of at most 64 KiB; anything else is named, at once."""
    data_dir = ensure_data_dir(tmp_path / "data")
    path = token_path(data_dir)
    if kind == "fifo":
        os.mkfifo(path)
        expected = "is not a regular file (a FIFO)"
    elif kind == "device":
        path.symlink_to("/dev/zero")
        expected = "is not a regular file (a character device)"
    elif kind == "directory":
        path.mkdir()
        expected = "is not a regular file (a directory)"
    else:
        path.write_text("t" * (64 * 1024 + 1))
        expected = "is over 65536 bytes"
    assert main(["token", "--data-dir", str(data_dir)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"token file {path} {expected}" in captured.err


@pytest.mark.parametrize("command", ["list", "show sess-odd", "export sess-odd"])
def test_what_the_terminal_cannot_encode_is_escaped_not_a_traceback(
    tmp_path: Path, command: str
) -> None:
    """Through the real CLI, with an ASCII-only stdout: the lone surrogate and the
    non-ASCII title come out escaped, and the command succeeds."""
    data_dir = tmp_path / "data"
    trio.run(_fill_odd, data_dir)
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "PUNIE_DATA_DIR": str(data_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "punie_trio", "sessions", *command.split()],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert b"Traceback" not in done.stderr
    assert b"\\u" in done.stdout or b"\\x" in done.stdout  # escaped, not dropped


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(tmp_path: Path) -> None:
    """``sessions show ID | head -1`` on a long transcript: exit 1, no traceback."""
    data_dir = tmp_path / "data"

    async def fill() -> None:
        ensure_data_dir(data_dir)
        async with open_sqlite_store(store_path(data_dir)) as store:
            await store.create_session(make_record("sess-long"))
            chunk = ("agent_message_chunk", text_update("agent_message_chunk", "x" * 500 + "\n"))
            for turn in range(200):
                await store.append_turn(
                    "sess-long", turn, [*[chunk] * 20, ("stop", {"stopReason": "end_turn"})]
                )

    trio.run(fill)
    env = {**os.environ, "PUNIE_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "punie_trio", "sessions", "show", "sess-long"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does
    with proc.stderr:
        stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 1
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr


def test_list_cwd_is_resolved_and_export_dash_is_stdout(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    """``--cwd`` is compared resolved, as the server stores it (a trailing slash or ".."
    once found nothing); ``-o -`` is stdout (it once wrote a file named "-")."""
    project = tmp_path / "proj"
    (project / "sub").mkdir(parents=True)

    async def fill() -> None:
        async with open_sqlite_store(store_path(data_dir)) as store:
            await store.create_session(make_record("sess-here", cwd=str(project.resolve())))

    trio.run(fill)
    for spelled in (f"{project}/", f"{project}/sub/..", str(project)):
        assert main(["sessions", "list", "--cwd", spelled, "--data-dir", str(data_dir)]) == 0
        assert "sess-here" in capsys.readouterr().out, spelled
    monkeypatch.chdir(tmp_path)
    argv = ["sessions", "export", "sess-here", "-o", "-", "--data-dir", str(data_dir)]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["session"]["id"] == "sess-here"
    assert not (tmp_path / "-").exists()


def test_token_readable_by_others_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = ensure_data_dir(tmp_path / "data")
    token_path(data_dir).write_text("s3cret\n")
    token_path(data_dir).chmod(0o644)
    assert main(["token", "--data-dir", str(data_dir)]) == 0
    captured = capsys.readouterr()
    assert "token: s3cret" in captured.out
    assert "readable by others (mode 0644)" in captured.err
    token_path(data_dir).chmod(0o620)  # (others cannot read it, but can change it)
    assert main(["token", "--data-dir", str(data_dir)]) == 0
    assert "is open to others (mode 0620)" in capsys.readouterr().err


def test_token_prints_the_configured_token_serve_uses_and_where_it_comes_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With ``$PUNIE_TOKEN`` set, or ``token`` in the config file, ``serve`` uses that token
    (and writes no token file), but ``token`` printed ``DATA_DIR/token``: a token an
    earlier start generated, which the server refuses (401), or said there was none (exit
    1). It prints the token ``serve`` takes, by ``serve``'s precedence, and where it comes
    from; a generated file left beside it is named as what it is."""
    data_dir = ensure_data_dir(tmp_path / "data")
    token_path(data_dir).write_text("generated-earlier\n")
    token_path(data_dir).chmod(0o600)
    config = tmp_path / "punie.toml"
    config.write_text('token = "from-file"\n')
    config.chmod(0o600)
    argv = ["token", "--data-dir", str(data_dir), "--config", str(config)]
    stale = (
        f"punie-trio: warning: {token_path(data_dir)} holds another token, generated by a "
        "serve started without this one: a serve still running since then uses that one\n"
    )
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == f"token from: {config}\ntoken: from-file\n"
    assert captured.err == stale
    monkeypatch.setenv("PUNIE_TOKEN", "from-env")  # (the variable beats the file, as for serve)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "token from: $PUNIE_TOKEN\ntoken: from-env\n"
    assert captured.err == stale
    token_path(data_dir).unlink()  # (as serve with a configured token leaves it: no file)
    assert main(argv) == 0
    assert capsys.readouterr() == ("token from: $PUNIE_TOKEN\ntoken: from-env\n", "")
    # A token serve would refuse is refused here too, as serve does (exit 2), not shown.
    monkeypatch.setenv("PUNIE_TOKEN", " from-env ")
    assert main(argv) == 2
    assert capsys.readouterr() == (
        "",
        "punie-trio: error: $PUNIE_TOKEN: token must not have spaces around it\n",
    )
    # Configured nowhere this command can see: a serve given one where it was started
    # (its own --token or $PUNIE_TOKEN) writes no file, and the message says so.
    monkeypatch.delenv("PUNIE_TOKEN")
    config.write_text("")
    assert main(argv) == 1
    assert capsys.readouterr().err == (
        f"punie-trio: no token at {token_path(data_dir)} yet; `punie-trio serve` writes one "
        "when it starts without a configured token (one given --token, or $PUNIE_TOKEN or a "
        "config file's token where it was started, uses that and writes no file)\n"
    )


def test_a_token_file_gone_right_after_it_was_read_is_no_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``token`` looked at the file's mode (for its warning) in a second call after reading
    it: a ``serve`` starting in between with a configured token removes the file, and the
    command ended in a ``FileNotFoundError`` traceback. The mode is that of the file read."""
    from punie_trio import _cli_sessions

    data_dir = ensure_data_dir(tmp_path / "data")
    token_path(data_dir).write_text("s3cret\n")
    token_path(data_dir).chmod(0o644)
    read = _cli_sessions.read_small_file_and_status

    def read_then_removed(path: Path, max_bytes: int, **kwargs: Any) -> Any:
        result = read(path, max_bytes, **kwargs)
        path.unlink()  # (as a serve starting with a configured token does)
        return result

    monkeypatch.setattr(_cli_sessions, "read_small_file_and_status", read_then_removed)
    assert main(["token", "--data-dir", str(data_dir)]) == 0
    captured = capsys.readouterr()
    assert "token: s3cret" in captured.out
    assert "readable by others (mode 0644)" in captured.err


def _export_to(data_dir: Path, output: str) -> list[str]:
    return ["sessions", "export", "sess-new", "-o", output, "--data-dir", str(data_dir)]


def test_export_writes_into_a_fifo_instead_of_replacing_it(data_dir: Path, tmp_path: Path) -> None:
    """A FIFO at the output path is written into (it was replaced by a regular file, and
    its reader got nothing); so would a device such as /dev/null be (as root, the export
    once replaced the device)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as reader:
            received.append(reader.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert main(_export_to(data_dir, str(fifo))) == 0
    reader.join(timeout=30)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert json.loads(received[0])["session"]["id"] == "sess-new"


@pytest.mark.parametrize("redirect", ["a pipe", "a file appended to"])
def test_export_to_dev_stdout_writes_into_what_stdout_is(
    data_dir: Path, tmp_path: Path, redirect: str
) -> None:
    """``-o /dev/stdout`` names the open descriptor, not a file: into a pipe it failed
    (the name resolves to "pipe:[N]"), and with ``>> file`` it replaced the file,
    wiping what was there (found in review). It is written into, at the end."""
    env = {**os.environ, "PUNIE_DATA_DIR": str(data_dir)}
    command = [
        sys.executable,
        "-m",
        "punie_trio",
        "sessions",
        "export",
        "sess-new",
        "-o",
        "/dev/stdout",
    ]
    if redirect == "a pipe":
        done = subprocess.run(command, capture_output=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["session"]["id"] == "sess-new"
        return
    log = tmp_path / "log.json"
    log.write_text("EARLIER\n")
    with open(log, "ab") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.PIPE, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    earlier, exported = log.read_text().split("\n", 1)
    assert earlier == "EARLIER" and json.loads(exported)["session"]["id"] == "sess-new"


def test_export_through_a_symlink_writes_its_target(data_dir: Path, tmp_path: Path) -> None:
    """The link stays a link and its target gets the export (the link was replaced by a
    file and its target kept the old export); the target keeps its mode."""
    target = tmp_path / "real.json"
    target.write_text("old export\n")
    target.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert main(_export_to(data_dir, str(link))) == 0
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert json.loads(target.read_text())["session"]["id"] == "sess-new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "link.json", "real.json"]


def test_export_keeps_a_files_mode_and_creates_a_new_one_private(
    data_dir: Path, tmp_path: Path
) -> None:
    """A transcript is as private as the store: a new export file is 0600 (it was 0644
    with the usual umask), and a replaced one keeps the mode its owner gave it."""
    old_umask = os.umask(0o022)
    try:
        new = tmp_path / "new.json"
        assert main(_export_to(data_dir, str(new))) == 0
        assert stat.S_IMODE(new.stat().st_mode) == 0o600
        shared = tmp_path / "shared.json"
        shared.write_text("old\n")
        shared.chmod(0o664)
        assert main(_export_to(data_dir, str(shared))) == 0
        assert stat.S_IMODE(shared.stat().st_mode) == 0o664
        assert json.loads(shared.read_text())["session"]["id"] == "sess-new"
    finally:
        os.umask(old_umask)


@pytest.mark.parametrize("output", ["", ".", "dir", "dir/.", "dir/", "new/", "file/"])
def test_export_to_a_directory_is_a_message_not_a_traceback(
    data_dir: Path,
    tmp_path: Path,
    output: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``-o ""`` and ``-o .`` were a ValueError traceback ("has an empty name"). A path
    ending in / names a directory: ``file/`` replaced the file, ``new/`` made a file
    (found in review)."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("kept")
    monkeypatch.chdir(tmp_path)
    assert main(_export_to(data_dir, output)) == 1
    named = output or "''"
    assert capsys.readouterr().err.startswith(f"punie-trio: cannot write {named}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "dir", "file"]
    assert (tmp_path / "file").read_text() == "kept"
    assert list((tmp_path / "dir").iterdir()) == []


#: Text a client or a model could send to drive the operator's terminal: set the window
#: title (OSC ... BEL), erase the line (CSI 2K), return to the line's start, back up, and
#: a C1 CSI (U+009B).
_TITLE = "\x1b]0;pwned\x07Fix\rbug"
_EVIL = "a\x1b[2Kb\rc\x08d\x9b31me\x7ff\ttab\nsecond line"
#: Invisible characters that reorder or break what the terminal shows (right-to-left
#: override, a pop, a line separator); a zero-width joiner inside an emoji stays.
_SPOOF = "fix \u202eexe.txt\u202c done\u2028fake 👨\u200d👩"


async def _fill_evil(data_dir: Path) -> None:
    ensure_data_dir(data_dir)
    async with open_sqlite_store(store_path(data_dir)) as store:
        await store.create_session(make_record("sess-evil", title=_TITLE, cwd="/proj/\x1bx"))
        await store.append_turn(
            "sess-evil",
            0,
            [
                ("user_message_chunk", text_update("user_message_chunk", _EVIL)),
                (
                    "plan",
                    {
                        "sessionUpdate": "plan",
                        "entries": [{"content": "x\nstop: end_turn", "status": "pending"}],
                    },
                ),
                (
                    "tool_call",
                    {"sessionUpdate": "tool_call", "toolCallId": "c1", "title": "t\x1b[1A"},
                ),
                ("current_mode_update", {"sessionUpdate": "current_mode_update", "v": "\x9b\x7f"}),
                ("agent_message_chunk", text_update("agent_message_chunk", _SPOOF)),
                ("stop", {"stopReason": "end_turn"}),
            ],
        )


def _controls(text: str) -> set[str]:
    return {c for c in text if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0}


def test_show_and_list_escape_control_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Titles, prompts and model text reached the terminal raw (ESC, BEL, CR, BS, C1):
    any client or model could set the window title, erase lines or fake one. Only the
    newline and tab that lay out a message's text are kept."""
    data_dir = tmp_path / "data"
    trio.run(_fill_evil, data_dir)
    assert main(["sessions", "show", "sess-evil", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert _controls(out) == {"\n", "\t"}
    assert "title    \\x1b]0;pwned\\x07Fix\\rbug\n" in out
    assert "cwd      /proj/\\x1bx\n" in out
    assert "user: a\\x1b[2Kb\\rc\\x08d\\u009b31me\\x7ff\ttab\n      second line\n" in out
    assert "  [ ] x\\nstop: end_turn\n" in out  # no line of its own
    assert "tool: t\\x1b[1A (pending)\n" in out
    assert '"v": "\\u009b\\x7f"' in out
    # (Bidi overrides and line separators were printed raw; found in review.)
    assert "agent: fix \\u202eexe.txt\\u202c done\\u2028fake 👨\u200d👩\n" in out
    assert main(["sessions", "list", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert _controls(out) == {"\n"}
    assert "\\x1b]0;pwned\\x07Fix\\rbug" in out and out.rstrip().endswith("/proj/\\x1bx")


def test_export_to_stdout_escapes_c1_controls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``json.dumps`` escapes C0 controls only: DEL and C1 (a CSI to many terminals)
    went out raw. Escaped, the JSON holds the same strings."""
    data_dir = tmp_path / "data"
    trio.run(_fill_evil, data_dir)
    assert main(["sessions", "export", "sess-evil", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert _controls(out) == {"\n"}
    doc = json.loads(out)
    assert doc["session"]["title"] == _TITLE
    assert doc["transcript"][0]["payload"]["content"]["text"] == _EVIL


def _config_file(path: Path, data_dir: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"[serve]\ndata-dir = {str(data_dir)!r}\n", encoding="utf-8")
    return path


def test_read_only_commands_find_the_data_dir_of_the_config_file(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``serve`` writes to the config file's ``data-dir``: ``token`` and ``sessions``
    looked in the platform's directory instead (and failed)."""
    _config_file(tmp_path / "xdg-config" / "punie-trio" / "config.toml", data_dir)
    token_path(data_dir).write_text("s3cret\n")
    assert main(["token"]) == 0
    assert capsys.readouterr().out == f"token file: {token_path(data_dir)}\ntoken: s3cret\n"
    assert main(["sessions", "list"]) == 0
    assert "sess-new" in capsys.readouterr().out
    assert main(["sessions", "show", "sess-new"]) == 0
    assert "title    Fix bug" in capsys.readouterr().out


def test_read_only_commands_take_config_and_serves_precedence(
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--config FILE`` as for serve; the flag beats the variable, which beats the file."""
    other = ensure_data_dir(tmp_path / "other")
    token_path(other).write_text("other\n")
    token_path(data_dir).write_text("mine\n")
    config = _config_file(tmp_path / "punie.toml", data_dir)
    assert main(["token", "--config", str(config)]) == 0
    assert "token: mine" in capsys.readouterr().out
    assert main(["sessions", "export", "sess-new", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["session"]["id"] == "sess-new"
    monkeypatch.setenv("PUNIE_DATA_DIR", str(other))
    assert main(["token", "--config", str(config)]) == 0
    assert "token: other" in capsys.readouterr().out
    assert main(["token", "--config", str(config), "--data-dir", str(data_dir)]) == 0
    assert "token: mine" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["token"], ["sessions", "list"]])
def test_a_misspelt_data_dir_variable_is_named_by_the_read_only_commands(
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    """``PUNIE_DATADIR=DIR punie-trio token`` printed the token of another data directory
    (the default one) without a word (serve warns of the variable, and these commands read the
    one it nearly names). Another near miss (``PUNIE_PROT``) is none of theirs."""
    token_path(data_dir).write_text("s3cret\n")
    token_path(data_dir).chmod(0o600)
    monkeypatch.setenv("PUNIE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("PUNIE_DATADIR", str(tmp_path / "meant"))
    monkeypatch.setenv("PUNIE_PROT", "9000")
    assert main(argv) == 0
    assert capsys.readouterr().err == (
        "punie-trio: warning: $PUNIE_DATADIR is not a punie-trio variable and is ignored; "
        "did you mean $PUNIE_DATA_DIR?\n"
    )


def test_a_misspelt_token_variable_is_named_by_token(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``token`` reads ``$PUNIE_TOKEN`` (the token ``serve`` takes): ``PUNIE_TOKN=mine
    punie-trio token`` printed the token file's token without a word, where ``serve``
    warns of the near miss. ``sessions`` reads no token, and says nothing of it."""
    token_path(data_dir).write_text("s3cret\n")
    token_path(data_dir).chmod(0o600)
    monkeypatch.setenv("PUNIE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("PUNIE_TOKN", "mine")
    assert main(["token"]) == 0
    assert capsys.readouterr() == (
        f"token file: {token_path(data_dir)}\ntoken: s3cret\n",
        "punie-trio: warning: $PUNIE_TOKN is not a punie-trio variable and is ignored; "
        "did you mean $PUNIE_TOKEN?\n",
    )
    assert main(["sessions", "list"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["token"], {"PUNIE_DATA_DIR": ""}, "$PUNIE_DATA_DIR: data-dir must not be empty"),
        (["sessions", "list"], {"PUNIE_DATA_DIR": ""}, "data-dir must not be empty"),
        (["token", "--config", "/nonexistent/punie.toml"], {}, "does not exist"),
        # " /srv/d" was the relative path "./ /srv/d": "no token at  /srv/d/token yet".
        (
            ["token"],
            {"PUNIE_DATA_DIR": " /srv/d"},
            "$PUNIE_DATA_DIR: data-dir must not have spaces around it, got ' /srv/d'",
        ),
    ],
)
def test_read_only_commands_refuse_a_bad_data_dir_setting_with_status_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    environ: dict[str, str],
    expected: str,
) -> None:
    """``PUNIE_DATA_DIR=`` is exit 2 for serve; these commands took it for unset."""
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("punie-trio: error: ") and expected in err


def test_read_only_commands_refuse_an_empty_data_dir_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["token", "--data-dir", ""])
    assert info.value.code == 2
    assert "argument --data-dir: must not be empty" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["show", "export"])
def test_show_and_export_read_the_session_and_its_transcript_as_of_one_moment(
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    """A server appends a turn right after the session's row is read: the header (and
    the export's ``session.turns``) and the transcript still agree. Read through two
    connections, ``show`` printed ``turns 4392`` above 4393 turns."""
    select_session = _sql.select_session

    def select_then_append(conn: Any, session_id: str) -> Any:
        record = select_session(conn, session_id)

        async def append() -> None:
            async with open_sqlite_store(store_path(data_dir)) as store:
                await store.append_turn(session_id, 2, [("stop", {"stopReason": "end_turn"})])

        trio.run(append)
        return record

    monkeypatch.setattr(_sql, "select_session", select_then_append)
    assert main(["sessions", command, "sess-new", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    if command == "show":
        assert "turns    2\n" in out and "--- turn 3 ---" not in out
    else:
        doc = json.loads(out)
        assert doc["session"]["turns"] == 2
        assert {e["turn"] for e in doc["transcript"]} == {0, 1}
    monkeypatch.setattr(_sql, "select_session", select_session)
    assert main(["sessions", "show", "sess-new", "--data-dir", str(data_dir)]) == 0
    assert "turns    3\n" in capsys.readouterr().out  # the turn was appended


def test_no_token_file_with_a_configured_token_names_where_it_is_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``serve`` with a configured token writes no token file: "serve creates one when it
    starts" was wrong. The token is then the one configured: ``token`` prints it and
    names its source (it once said only where it was configured, exit 1: see
    ``test_token_prints_the_configured_token_serve_uses_and_where_it_comes_from``)."""
    data_dir = ensure_data_dir(tmp_path / "data")
    config = tmp_path / "punie.toml"
    config.write_text(f'token = "file-s3cret"\ndata-dir = {str(data_dir)!r}\n')
    config.chmod(0o600)
    assert main(["token", "--config", str(config)]) == 0
    assert capsys.readouterr().out == f"token from: {config}\ntoken: file-s3cret\n"
    monkeypatch.setenv("PUNIE_TOKEN", "env-s3cret")
    assert main(["token", "--config", str(config)]) == 0
    assert capsys.readouterr().out == "token from: $PUNIE_TOKEN\ntoken: env-s3cret\n"
    monkeypatch.delenv("PUNIE_TOKEN")
    assert main(["token", "--data-dir", str(data_dir)]) == 1
    err = capsys.readouterr().err
    assert "no token at" in err and "without a configured token" in err


@pytest.mark.parametrize(
    "argv", [["sessions", "list"], ["sessions", "show", "x"], ["sessions", "export", "x"]]
)
def test_a_store_path_that_cannot_be_looked_at_is_a_message(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A store whose path ``stat`` refuses (a name too long; a data directory the user may
    not search, the same ``OSError`` under another errno) is exit 1 with a message: the
    check for a missing store once let the ``OSError`` out as a traceback."""
    data_dir = tmp_path / ("d" * 300)  # (over NAME_MAX: ENAMETOOLONG, as root too)
    assert main([*argv, "--data-dir", str(data_dir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("punie-trio: ") and "cannot open session store" in err
    assert "File name too long" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may search any directory")
def test_a_data_dir_without_search_permission_is_a_message(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir.chmod(0o600)
    try:
        assert main(["sessions", "list", "--data-dir", str(data_dir)]) == 1
    finally:
        data_dir.chmod(0o700)
    assert "Permission denied" in capsys.readouterr().err


def test_another_programs_database_is_named_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As ``serve`` refuses it: "run the server once to upgrade it" sent the user to a
    server that then refuses the file."""
    data_dir = ensure_data_dir(tmp_path / "data")
    with sqlite3.connect(store_path(data_dir)) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    conn.close()
    assert main(["sessions", "list", "--data-dir", str(data_dir)]) == 1
    err = capsys.readouterr().err
    assert "not a punie-trio session store (it holds notes)" in err
    assert "run the server" not in err


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "PYTHONUNBUFFERED"])
@pytest.mark.parametrize("command", ["export sess-big", "show sess-big"])
def test_output_cut_short_by_a_full_disk_is_an_error(
    tmp_path: Path, command: str, unbuffered: bool
) -> None:
    """``sessions export ID > backup.json`` on a disk that fills up (here a file size limit,
    ``RLIMIT_FSIZE``: the same short write and then ``EFBIG``, as ``ENOSPC`` gives): exit 1
    with a message. It was a traceback, and with ``PYTHONUNBUFFERED`` set (as many
    container images do) exit 0 with the file cut short: the unbuffered stdout dropped
    what the short write left, without a word."""
    data_dir = tmp_path / "data"

    async def fill() -> None:
        ensure_data_dir(data_dir)
        async with open_sqlite_store(store_path(data_dir)) as store:
            await store.create_session(make_record("sess-big"))
            chunk = ("agent_message_chunk", text_update("agent_message_chunk", "y" * 1000))
            for turn in range(20):
                await store.append_turn(
                    "sess-big", turn, [*[chunk] * 10, ("stop", {"stopReason": "end_turn"})]
                )

    trio.run(fill)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PUNIE_DATA_DIR"] = str(data_dir)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    limit = 64 * 1024  # (over the 32 KiB -shm a read of the store may create)

    def limited() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    out = tmp_path / "out"
    with open(out, "wb") as stdout:
        done = subprocess.run(
            [sys.executable, "-m", "punie_trio", "sessions", *command.split()],
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=env,
            timeout=60,
            preexec_fn=limited,
        )
    assert out.stat().st_size == limit  # (what fitted)
    assert done.returncode == 1
    assert done.stderr.decode() == "punie-trio: cannot write the output: File too large\n"


@pytest.mark.parametrize("command", ["show", "export"])
def test_an_id_that_is_not_utf8_is_no_session(
    data_dir: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An argument of bytes that are not UTF-8 (here as Python decodes argv: lone
    surrogates) cannot be a stored id: "no session", exit 1. It was a traceback
    (UnicodeEncodeError from sqlite3)."""
    bad = b"sess-\xff".decode("utf-8", "surrogateescape")
    assert main(["sessions", command, bad, "--data-dir", str(data_dir)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"punie-trio: no session 'sess-\\udcff' in {store_path(data_dir)}\n"
    assert captured.out == ""


def test_a_cwd_that_is_not_utf8_lists_nothing(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No stored cwd can hold such bytes (the server stores UTF-8 text): the filter
    matches nothing, as any other cwd without sessions does (it was a traceback)."""
    bad = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")
    assert main(["sessions", "list", "--cwd", bad, "--data-dir", str(data_dir)]) == 0
    assert capsys.readouterr().out == f"no sessions in {store_path(data_dir)}\n"


@pytest.mark.parametrize("command", ["sessions list", "sessions export sess-new", "token"])
def test_a_closed_stdout_is_an_error_not_a_traceback(data_dir: Path, command: str) -> None:
    """Started with stdout closed (``>&-``: Python's ``sys.stdout`` is None): exit 1 with
    a message. It was an AttributeError traceback (``main`` flushed a stdout of None)."""
    (data_dir / "token").write_text("tok\n")
    (data_dir / "token").chmod(0o600)
    env = {**os.environ, "PUNIE_DATA_DIR": str(data_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "punie_trio", *command.split()],
        stderr=subprocess.PIPE,
        env=env,
        timeout=60,
        preexec_fn=lambda: os.close(1),
    )
    assert done.returncode == 1
    assert (
        done.stderr.decode() == "punie-trio: cannot write the output: standard output is closed\n"
    )


def test_show_and_list_give_the_metadata_session_list_gives(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A session's additional directories and its cwd as the client sent it (what
    ``session/list`` reports) were nowhere in ``show`` and ``list``: ``show`` left the
    directories out, and both printed the resolved cwd, which for a session created
    through a symlink is not the one the IDE set and lists."""

    async def fill() -> None:
        async with open_sqlite_store(store_path(data_dir)) as store:
            await store.create_session(
                make_record(
                    "sess-link",
                    root="/proj",
                    cwd="/proj/site",
                    cwd_sent="/proj/link",
                    additional_directories=("/proj/lib", "/proj/docs"),
                    created_at=200.0,
                    updated_at=300.0,
                )
            )

    trio.run(fill)
    assert main(["sessions", "show", "sess-link", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    header = out[: out.index("turns    ")]
    assert header == (
        "session  sess-link\n"
        "title    -\n"
        "cwd      /proj/link (resolved: /proj/site)\n"
        "root     /proj\n"
        "dirs     /proj/lib\n"
        "         /proj/docs\n"
        f"created  {_when(200.0)}\n"
        f"updated  {_when(300.0)}\n"
    )
    assert main(["sessions", "list", "--data-dir", str(data_dir)]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("sess-link ")]
    assert line.endswith(" /proj/link")
