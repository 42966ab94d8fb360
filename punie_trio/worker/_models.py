"""Model backends behind one small interface.

A model drives one turn through a :class:`TurnContext` (emit text, thoughts, plans, call
tools) and returns the stop reason. Cancellation is plain Trio cancellation of the turn's
scope; a model needs no special handling for it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from .. import _json
from .._config import QUOTED_CHARS, quoted


class TurnContext(Protocol):
    """The turn's outputs, as a model sees them."""

    @property
    def session_id(self) -> str: ...

    @property
    def prompt_text(self) -> str: ...

    @property
    def history(self) -> Sequence[tuple[str, str]]:
        """(role, text) pairs of earlier turns in this session, oldest first: two per turn,
        ``("user", ...)`` then ``("agent", ...)``. A turn that ended in ``refusal`` is not
        in it ("won't be included in the next prompt", the schema's ``StopReason``). Nor
        is one whose model failed, while the session stays live (it is recorded, so a
        load brings it back)."""
        ...

    @property
    def turn_number(self) -> int:
        """This turn's place in its session: 0 for the first, counting every recorded turn
        (refused and cancelled ones too)."""
        ...

    async def text(self, chunk: str) -> None: ...

    async def thought(self, chunk: str) -> None: ...

    async def plan(self, entries: Sequence[Any]) -> None: ...

    async def tool(self, name: str, tool_input: dict[str, Any]) -> Any: ...


class Model(Protocol):
    name: str

    async def run_turn(self, ctx: TurnContext) -> str:
        """Produce the turn's output through ``ctx``; return its stop reason."""
        ...


_WORDS = re.compile(r"\S+\s*|\s+")


def echo_chunks(text: str, max_chunks: int = 16) -> list[str]:
    """Split ``text`` into at most ``max_chunks`` word-aligned chunks that join back to it."""
    if max_chunks == 1:
        return [text] if text else []
    words = _WORDS.findall(text)
    if not words:
        return []
    per = -(-len(words) // max_chunks)
    return ["".join(words[i : i + per]) for i in range(0, len(words), per)]


@attrs.define(eq=False)
class EchoModel:
    """Answers with the prompt's text: in one ``agent_message_chunk`` by default, as the ACP
    SDK's reference echo agent does, or streamed in up to ``chunks`` word-aligned chunks
    (``--model echo:N``)."""

    chunks: int = 1
    name: str = attrs.field()

    @name.default
    def _name(self) -> str:
        return "echo" if self.chunks == 1 else f"echo:{self.chunks}"

    async def run_turn(self, ctx: TurnContext) -> str:
        for chunk in echo_chunks(ctx.prompt_text, self.chunks):
            await ctx.text(chunk)
        return "end_turn"


class ScriptError(ValueError):
    """The script file is unreadable or not in the documented format."""


_STEP_KEYS = ("text", "thought", "plan", "tool", "sleep", "stop")


def _check_step(step: Any, where: str) -> dict[str, Any]:
    if not isinstance(step, dict):
        raise ScriptError(f"{where}: a step must be an object")
    keys = [k for k in _STEP_KEYS if k in step]
    if len(keys) != 1:
        raise ScriptError(f"{where}: a step needs exactly one of {', '.join(_STEP_KEYS)}")
    key = keys[0]
    value = step[key]
    if key in ("text", "thought", "tool") and not isinstance(value, str):
        raise ScriptError(f"{where}.{key}: must be a string")
    if key == "plan" and not isinstance(value, list):
        raise ScriptError(f"{where}.plan: must be a list of entries")
    if key == "sleep" and (
        isinstance(value, bool) or not isinstance(value, int | float) or value < 0
    ):
        raise ScriptError(f"{where}.sleep: must be a non-negative number of seconds")
    if key == "stop" and value not in ("end_turn", "max_tokens", "max_turn_requests", "refusal"):
        raise ScriptError(
            f"{where}.stop: must be end_turn, max_tokens, max_turn_requests or refusal"
        )
    if key == "tool" and not isinstance(step.get("input", {}), dict):
        raise ScriptError(f"{where}.input: must be an object")
    return step


def _named(path: str | Path) -> str:
    """A script's path as an error names it: as it is, or past :data:`QUOTED_CHARS` (a
    name no file can have) quoted by its start and its length: 5,000 characters once
    went out whole."""
    name = str(path)
    return name if len(name) <= QUOTED_CHARS else quoted(name)


def load_script(path: Path) -> list[list[dict[str, Any]]]:
    """Read and validate a script file: a list of turns, each a list of steps (or an object
    ``{"turns": [...]}``). Raises :class:`ScriptError` naming the bad place."""
    try:
        # Strict: NaN and Infinity are not JSON (a step's input is sent to the client).
        data = _json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScriptError(f"cannot read script {_named(path)}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ScriptError(f"script {path} is not valid JSON: {exc}") from None
    turns = data.get("turns") if isinstance(data, dict) else data
    if not isinstance(turns, list) or not turns:
        raise ScriptError(f"script {path}: expected a non-empty list of turns")
    checked: list[list[dict[str, Any]]] = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, list):
            raise ScriptError(f"script {path}: turns[{t}] must be a list of steps")
        checked.append([_check_step(s, f"turns[{t}][{i}]") for i, s in enumerate(turn)])
    return checked


@attrs.define(eq=False)
class ScriptModel:
    """Plays a JSON script: the n-th prompt of a session (``TurnContext.turn_number``) plays
    turn ``n % len(turns)``."""

    turns: list[list[dict[str, Any]]]
    name: str = "script"

    @classmethod
    def from_path(cls, path: Path) -> ScriptModel:
        return cls(load_script(path), name=f"script:{path}")

    async def run_turn(self, ctx: TurnContext) -> str:
        index = ctx.turn_number % len(self.turns)
        stop = "end_turn"
        for step in self.turns[index]:
            if "text" in step:
                await ctx.text(step["text"])
            elif "thought" in step:
                await ctx.thought(step["thought"])
            elif "plan" in step:
                await ctx.plan(step["plan"])
            elif "tool" in step:
                await ctx.tool(step["tool"], dict(step.get("input", {})))
            elif "sleep" in step:
                await trio.sleep(step["sleep"])
            elif "stop" in step:
                stop = step["stop"]
                break
        return stop


def model_from_spec(spec: str) -> Model:
    """``echo``, ``echo:N`` or ``script:PATH``. Raises :class:`ValueError` with a message for
    anything else."""
    if spec == "echo":
        return EchoModel()
    if spec.startswith("echo:"):
        count = spec.removeprefix("echo:")
        # isascii too: isdigit() takes "²", which int() refuses, and int() reads "٣" as 3;
        # and at most 5 digits: int() refuses 5,000 with its own message.
        digits = count.isascii() and count.isdigit() and len(count) <= 5
        if not digits or not 1 <= int(count) <= 10_000:
            raise ValueError(
                f"model {quoted(spec)}: N in echo:N must be a whole number from 1 to 10000"
            )
        return EchoModel(int(count))
    if spec.startswith("script:"):
        path = spec.removeprefix("script:")
        if not path:
            raise ScriptError("model 'script:' needs a path, as script:PATH")
        # ~ too: the shell does not expand it after "script:", and config-file paths may
        # start with it (a script:~/demo.json was "cannot read script ~/demo.json").
        try:
            expanded = Path(path).expanduser()
        except RuntimeError:  # (~nosuchuser: a traceback, not the exit 2 naming the script)
            raise ScriptError(
                f"cannot read script {_named(path)}: its ~ names no home directory"
            ) from None
        return ScriptModel.from_path(expanded)
    raise ValueError(f"unknown model {quoted(spec)}: use echo, echo:N or script:PATH")
