"""punie_trio._json: the cached C encoders give exactly what json.dumps gives."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from punie_trio import _json

CASES: list[Any] = [
    {"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": 'héllo\n"x"'}},
    {"a": [1, 2.5, None, True, False, 1e100, -0.0], "b": {}, "c": []},
    {"1": "x", "nested": {"deep": [{"k": "\u2028\x00"}]}},
    "a string with \u00e9 and \\",
    12,
    1.1,
    None,
    [],
]


@pytest.mark.parametrize("value", CASES)
def test_same_text_as_json_dumps(value: Any) -> None:
    expected = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    assert _json.dumps(value) == expected
    assert _json.dumps_strict(value) == expected


def test_nan_written_by_dumps_refused_by_strict() -> None:
    assert _json.dumps({"x": math.nan}) == '{"x":NaN}'
    with pytest.raises(ValueError):
        _json.dumps_strict({"x": math.inf})


def test_unserialisable_raises_type_error() -> None:
    with pytest.raises(TypeError):
        _json.dumps({"x": {1, 2}})


def test_a_lone_surrogate_is_escaped_so_the_text_is_utf8() -> None:
    """The one difference from json.dumps: a lone surrogate (badly decoded model output)
    is written as its escape, which decodes to the same string."""
    value = {"text": "a\ud800 \u00e9 \udc00"}
    for dumps in (_json.dumps, _json.dumps_strict):
        text = dumps(value)
        text.encode()  # valid UTF-8
        assert json.loads(text) == value
    assert _json.dumps("x\ud83d") == '"x\\ud83d"'


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[NaN]", "NaN is not JSON"),
        ('{"x": -Infinity}', "-Infinity is not JSON"),
        ("[1e400]", "out of range"),
        # Python's own message told the client to call sys.set_int_max_str_digits().
        ("[" + "7" * 5001 + "]", "^integer 7777777777.* has 5,001 digits; at most 4,300 are read$"),
        ("[" * 100_000, "nested too deeply"),
        ('{"a":' * 100_000, "nested too deeply"),  # (3.13's C recursion limit is higher)
        (b'{"a": "\xff"}', "can't decode"),
        ("{", "Expecting"),
    ],
)
def test_loads_refuses_what_json_cannot_carry_with_a_value_error(text: Any, why: str) -> None:
    """json.loads takes NaN and 1e400 (as infinity) and raises RecursionError on deep
    nesting; text from outside gets one kind of error, naming the problem."""
    with pytest.raises(ValueError, match=why):
        _json.loads(text)


def test_loads_reads_what_json_loads_reads() -> None:
    text = '{"a": [1, 2.5, -0.0, 1e300, null, true], "s": "\\ud800 h\\u00e9llo"}'
    assert _json.loads(text) == json.loads(text)
    assert _json.loads(text.encode()) == json.loads(text)
    assert _json.loads(b"\xef\xbb\xbf" + text.encode()) == json.loads(text)  # (a BOM)
    nested = "[" * 200 + "]" * 200
    assert _json.loads(nested) == json.loads(nested)


@pytest.mark.parametrize(
    "raw",
    [
        '{"a": 1}'.encode("utf-16"),  # json.loads takes these three
        '{"a": 1}'.encode("utf-32-be"),
        b'{"a": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8 (RFC 3629 forbids it)
        b'{"a": "\xff"}',
    ],
)
def test_loads_takes_bytes_only_as_utf_8(raw: bytes) -> None:
    """The transports page: messages MUST be UTF-8 (an audit ran a UTF-32 prompt)."""
    with pytest.raises(ValueError):
        _json.loads(raw)


def test_dumps_finite_writes_non_finite_numbers_as_null_at_any_depth() -> None:
    """What goes on the wire and into the store is strict JSON; the copy that replaces
    NaN once recursed, and ran out of stack at half the depth the encoder takes; a NaN
    key (written "NaN" before) raised."""
    nested: Any = [float("nan")]
    for _ in range(900):
        nested = [nested]
    assert _json.dumps_finite(nested) == "[" * 901 + "null" + "]" * 901
    value = {"a": (1, float("inf")), float("nan"): -float("inf"), "é": "\ud800"}
    assert _json.dumps_finite(value) == '{"a":[1,null],"NaN":null,"é":"\\ud800"}'
    plain = {"text": "héllo \u2028", "n": 10**30, "f": -0.0}
    assert _json.dumps_finite(plain) == _json.dumps(plain)  # valid data: unchanged


def test_dumps_finite_refuses_a_cycle_instead_of_copying_for_ever() -> None:
    cycle: list[Any] = [float("nan")]
    cycle.append(cycle)
    with pytest.raises(RecursionError):
        _json.dumps_finite(cycle)


def _loads_an_object(text: str) -> bool:
    try:
        return type(_json.loads(text)) is dict
    except ValueError:
        return False


@pytest.mark.parametrize(
    "text",
    [
        '{"sessionUpdate":"agent_message_chunk","content":{"type":"text","text":"hi"}}',
        "{}",
        '{"a":[1,2.5,-3e2,true,false,null,"\\u00e9"]}',
        '{"a":1} \t\r\n',  # whitespace after: loads takes it
        ' {"a":1}',  # before: loads takes it; the fast check sends it to loads
        '{"a":1}{"b":2}',
        '{"a":1},',
        '{"a":',
        "[1,2]",
        '"text"',
        "",
        '{"x":NaN}',
        '{"x":-Infinity}',
        '{"x":1e400}',
        '{"x":' + "9" * 5000 + "}",
        '{"a":' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
)
def test_is_object_text_accepts_only_what_loads_reads_as_an_object(text: str) -> None:
    """The transcript read's fast check: whatever it accepts, ``loads`` reads as an object;
    it refuses only whitespace before the object beyond what ``loads`` refuses."""
    fast = _json.is_object_text(text)
    assert fast == (_loads_an_object(text) and not text[:1].isspace())
