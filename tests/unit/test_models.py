"""Model backends: echo chunking, script loading and validation, turn cycling."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from punie_trio.worker import (
    EchoModel,
    ScriptError,
    ScriptModel,
    echo_chunks,
    load_script,
    model_from_spec,
)

# -- echo -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "hello",
        "hello brave new world",
        "  leading and trailing  ",
        "tabs\tand\nnew\nlines\n\n",
        "é ✓ 漢字  mixed",
        " ".join(f"w{i}" for i in range(1000)),
        "x" * 10_000,
    ],
)
@pytest.mark.parametrize("max_chunks", [1, 3, 16])
def test_echo_chunks_join_back_exactly_and_are_bounded(text: str, max_chunks: int) -> None:
    chunks = echo_chunks(text, max_chunks)
    assert "".join(chunks) == text
    assert 1 <= len(chunks) <= max_chunks
    assert all(chunks)


def test_echo_chunks_empty_text() -> None:
    assert echo_chunks("") == []


def test_echo_chunks_are_word_aligned() -> None:
    chunks = echo_chunks("one two three four", 2)
    assert chunks == ["one two ", "three four"]
    assert echo_chunks("a b c", 16) == ["a ", "b ", "c"]


@attrs.define
class FakeContext:
    """A TurnContext that records what a model emits."""

    prompt_text: str = ""
    history: Sequence[tuple[str, str]] = ()
    session_id: str = "s"
    turn_number: int = 0
    events: list[tuple[str, Any]] = attrs.field(factory=list)

    async def text(self, chunk: str) -> None:
        self.events.append(("text", chunk))

    async def thought(self, chunk: str) -> None:
        self.events.append(("thought", chunk))

    async def plan(self, entries: Sequence[Any]) -> None:
        self.events.append(("plan", list(entries)))

    async def tool(self, name: str, tool_input: dict[str, Any]) -> Any:
        self.events.append(("tool", (name, tool_input)))
        return None


async def test_echo_model_answers_in_one_chunk_or_streams_n() -> None:
    ctx = FakeContext(prompt_text="hello big world")
    assert await EchoModel().run_turn(ctx) == "end_turn"
    assert ctx.events == [("text", "hello big world")]
    ctx = FakeContext(prompt_text="hello big world")
    assert await EchoModel(16).run_turn(ctx) == "end_turn"
    assert ctx.events == [("text", "hello "), ("text", "big "), ("text", "world")]


def test_echo_model_specs() -> None:
    one, many = model_from_spec("echo"), model_from_spec("echo:16")
    assert isinstance(one, EchoModel) and (one.chunks, one.name) == (1, "echo")
    assert isinstance(many, EchoModel) and (many.chunks, many.name) == (16, "echo:16")
    # "echo:²" passed isdigit() and int() raised its own message; "echo:٣" ran 3 chunks.
    for bad in ("echo:", "echo:0", "echo:x", "echo:-1", "echo:10001", "echo:\u00b2", "echo:\u0663"):
        with pytest.raises(ValueError, match="echo:N"):
            model_from_spec(bad)


async def test_echo_model_empty_prompt() -> None:
    ctx = FakeContext(prompt_text="")
    assert await EchoModel().run_turn(ctx) == "end_turn"
    assert ctx.events == []


# -- script loading ---------------------------------------------------------------------------


def _write(tmp_path: Path, data: Any, name: str = "script.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_load_script_list_and_turns_object(tmp_path: Path) -> None:
    turns = [[{"text": "a"}, {"stop": "refusal"}], [{"thought": "t"}, {"sleep": 0.5}]]
    assert load_script(_write(tmp_path, turns)) == turns
    assert load_script(_write(tmp_path, {"turns": turns}, "obj.json")) == turns
    # An empty turn is allowed (it just ends).
    assert load_script(_write(tmp_path, [[]], "empty.json")) == [[]]


def test_load_script_all_step_kinds(tmp_path: Path) -> None:
    turn = [
        {"text": "x"},
        {"thought": "y"},
        {"plan": ["a", {"content": "b", "status": "completed"}]},
        {"tool": "read_file", "input": {"path": "a.txt"}},
        {"tool": "write_file"},
        {"sleep": 0},
        {"stop": "max_tokens"},
    ]
    assert load_script(_write(tmp_path, [turn])) == [turn]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ([[{"sleep": -1}]], "turns[0][0].sleep"),
        ([[{"text": "ok"}, {"sleep": "1"}]], "turns[0][1].sleep"),
        ([[{"text": "ok"}, {"sleep": True}]], "turns[0][1].sleep"),
        ([[{"text": "a"}], [{"text": 5}]], "turns[1][0].text"),
        ([[{"thought": None}]], "turns[0][0].thought"),
        ([[{"tool": 3}]], "turns[0][0].tool"),
        ([[{"tool": "read_file", "input": "a.txt"}]], "turns[0][0].input"),
        ([[{"plan": "do it"}]], "turns[0][0].plan"),
        ([[{"stop": "cancelled"}]], "turns[0][0].stop"),
        ([[{"stop": "whatever"}]], "turns[0][0].stop"),
        ([[{"text": "a", "thought": "b"}]], "turns[0][0]: a step needs exactly one"),
        ([[{"say": "hi"}]], "turns[0][0]: a step needs exactly one"),
        ([["text"]], "turns[0][0]: a step must be an object"),
        ([[{"text": "a"}], "not a turn"], "turns[1] must be a list"),
        ([], "non-empty list of turns"),
        ({"turns": []}, "non-empty list of turns"),
        ({"steps": [[]]}, "non-empty list of turns"),
        ('"just a string"', "non-empty list of turns"),
    ],
)
def test_load_script_errors_name_the_place(tmp_path: Path, data: Any, fragment: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ScriptError) as info:
        load_script(path)
    assert fragment in str(info.value)


def test_load_script_invalid_json_and_missing_file(tmp_path: Path) -> None:
    bad = _write(tmp_path, "[[{", "bad.json")
    with pytest.raises(ScriptError, match="not valid JSON"):
        load_script(bad)
    with pytest.raises(ScriptError, match="cannot read script"):
        load_script(tmp_path / "missing.json")
    # NaN is no JSON: a step's input is sent to the client and stored.
    nan = _write(tmp_path, '[[{"tool": "read_file", "input": {"x": NaN}}]]', "nan.json")
    with pytest.raises(ScriptError, match="not valid JSON: NaN is not JSON"):
        load_script(nan)


def test_model_from_spec(tmp_path: Path) -> None:
    assert isinstance(model_from_spec("echo"), EchoModel)
    path = _write(tmp_path, [[{"text": "hi"}]])
    model = model_from_spec(f"script:{path}")
    assert isinstance(model, ScriptModel)
    assert model.name == f"script:{path}"
    with pytest.raises(ScriptError, match="needs a path"):
        model_from_spec("script:")
    with pytest.raises(ScriptError, match="cannot read"):
        model_from_spec(f"script:{tmp_path / 'nope.json'}")
    with pytest.raises(ValueError, match="unknown model 'bogus'"):
        model_from_spec("bogus")


def test_a_script_path_may_start_with_a_tilde(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``model = "script:~/demo.json"`` in the config file (and ``--model script:~/x``,
    which no shell expands) was "cannot read script ~/demo.json"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    _write(tmp_path, [[{"text": "hi"}]])
    assert isinstance(model_from_spec("script:~/script.json"), ScriptModel)


def test_a_script_path_whose_tilde_names_no_user_is_a_script_error() -> None:
    """``script:~nosuchuser/x.json`` was a RuntimeError traceback from expanduser (exit 1),
    not the exit 2 naming the script that any other unreadable script gets."""
    with pytest.raises(ScriptError, match=r"cannot read script ~nosuchuser-punie/x\.json: "):
        model_from_spec("script:~nosuchuser-punie/x.json")


# -- script playback --------------------------------------------------------------------------


def _history(turns: int) -> list[tuple[str, str]]:
    return [pair for i in range(turns) for pair in (("user", f"q{i}"), ("agent", f"a{i}"))]


async def test_script_model_cycles_turns_by_turn_number() -> None:
    model = ScriptModel([[{"text": "zero"}], [{"text": "one"}], [{"text": "two"}]])
    played = []
    for n in range(7):
        ctx = FakeContext(history=_history(n // 2), turn_number=n)  # (history: not counted)
        assert await model.run_turn(ctx) == "end_turn"
        played.append(ctx.events[0][1])
    assert played == ["zero", "one", "two", "zero", "one", "two", "zero"]


async def test_script_model_plays_each_step_kind_and_stops_early() -> None:
    model = ScriptModel(
        [
            [
                {"thought": "thinking"},
                {"plan": ["step"]},
                {"tool": "read_file", "input": {"path": "a"}},
                {"text": "answer"},
                {"stop": "max_tokens"},
                {"text": "never"},
            ]
        ]
    )
    ctx = FakeContext()
    assert await model.run_turn(ctx) == "max_tokens"
    assert ctx.events == [
        ("thought", "thinking"),
        ("plan", ["step"]),
        ("tool", ("read_file", {"path": "a"})),
        ("text", "answer"),
    ]


async def test_script_model_sleep_uses_trio_time(autojump_clock: trio.testing.MockClock) -> None:
    model = ScriptModel([[{"text": "a"}, {"sleep": 30}, {"text": "b"}]])
    ctx = FakeContext()
    start = trio.current_time()
    assert await model.run_turn(ctx) == "end_turn"
    assert trio.current_time() - start == pytest.approx(30)
    assert [v for _, v in ctx.events] == ["a", "b"]


async def test_script_model_tool_input_is_a_copy() -> None:
    step = {"tool": "write_file", "input": {"path": "a"}}
    model = ScriptModel([[step]])

    class Mutating(FakeContext):
        async def tool(self, name: str, tool_input: dict[str, Any]) -> Any:
            tool_input["path"] = "changed"
            return None

    await model.run_turn(Mutating())
    assert step["input"] == {"path": "a"}


@pytest.mark.parametrize(
    "spec",
    [
        "x" * 5000,
        "echo:" + "9" * 5000,
        "echo:1\n" + "y" * 5000,
        "script:" + "z" * 5000,
        "script:~" + "z" * 5000,  # (~ naming no user: its own message)
    ],
)
def test_a_long_model_spec_is_quoted_by_its_start_and_length(spec: str) -> None:
    """A bad model spec was quoted whole: ``--model`` with 5,000 characters (a file pasted
    where its path should be) put all of them on the terminal, as config values once did."""
    with pytest.raises(ValueError) as info:
        model_from_spec(spec)
    message = str(info.value)
    assert len(message) < 200, message
    shown = spec.removeprefix("script:")  # (a script is named by its path)
    assert f"... ({len(shown):,} characters)" in message
    assert repr(shown[:60]) in message
