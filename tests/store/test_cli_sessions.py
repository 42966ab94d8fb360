"""``punie-trio sessions ...`` and ``punie-trio token`` against a real store file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import trio

from punie_trio._cli_sessions import add_commands
from punie_trio._paths import ensure_data_dir, store_path, token_path
from punie_trio.store import open_sqlite_store

from .conftest import make_record, text_update


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="punie-trio")
    add_commands(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


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
        "stop: end_turn\n"
        "\n"
        "--- turn 2 ---\n"
        "user: thanks\n"
        "stop: cancelled\n"
    )


def test_export_stdout_and_file(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sessions", "export", "sess-new", "--data-dir", str(data_dir)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["session"]["id"] == "sess-new"
    assert doc["session"]["turns"] == 2
    assert doc["session"]["additional_directories"] == ["/extra"]
    assert [e["seq"] for e in doc["transcript"]] == list(range(11))
    assert [(e["kind"], e["payload"]) for e in doc["transcript"][:9]] == _turn0()
    assert doc["transcript"][10] == {
        "session_id": "sess-new",
        "seq": 10,
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
