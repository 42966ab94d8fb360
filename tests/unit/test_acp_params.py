"""ACP param parsers: every refusal is -32602 and names the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from punie_trio import acp
from punie_trio.rpc import INVALID_PARAMS, RpcError

from ..acp_schema import SchemaChecker


def _refused(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(RpcError) as info:
        fn(*args, **kwargs)
    assert info.value.code == INVALID_PARAMS
    return info.value.message


# -- initialize -------------------------------------------------------------------------------


def test_initialize_minimal_and_full() -> None:
    init = acp.parse_initialize({"protocolVersion": 1})
    assert init.protocol_version == 1
    assert init.capabilities == acp.ClientCapabilities()
    assert init.client_info is None and init.meta == {}
    full = acp.parse_initialize(
        {
            "protocolVersion": 2,
            "clientCapabilities": {
                "fs": {"readTextFile": True, "writeTextFile": True},
                "terminal": True,
                "_meta": {"x": 1},
                "somethingNew": {"a": 1},
            },
            "clientInfo": {"name": "ide", "version": "1"},
            "_meta": {"trace": "abc"},
            "unknownField": [1, 2],
        }
    )
    assert full.protocol_version == 2
    assert full.capabilities == acp.ClientCapabilities(True, True, True)
    assert full.client_info == {"name": "ide", "version": "1"}
    assert full.meta == {"trace": "abc"}


def test_initialize_capability_of_wrong_type_reads_as_false() -> None:
    init = acp.parse_initialize(
        {"protocolVersion": 1, "clientCapabilities": {"fs": {"readTextFile": "yes"}, "terminal": 1}}
    )
    assert init.capabilities == acp.ClientCapabilities()
    assert (
        acp.parse_initialize(
            {"protocolVersion": 1, "clientCapabilities": {"fs": "nope"}}
        ).capabilities
        == acp.ClientCapabilities()
    )


@pytest.mark.parametrize("version", [-1, 65536, 1.5, 65536.0, True, None, [1]])
def test_initialize_protocol_version_out_of_range_or_type(version: Any) -> None:
    message = _refused(acp.parse_initialize, {"protocolVersion": version})
    assert "protocolVersion" in message
    assert "0 to 65535" in message


def test_initialize_protocol_version_bounds_accepted() -> None:
    assert acp.parse_initialize({"protocolVersion": 0}).protocol_version == 0
    assert acp.parse_initialize({"protocolVersion": 65535}).protocol_version == 65535


@pytest.mark.parametrize(("version", "read"), [("0.2.0", 0), ("1", 0), (1.0, 1), (2.0, 2)])
def test_initialize_reads_old_string_versions_as_0_and_integral_floats(
    version: Any, read: int
) -> None:
    """As the reference SDK does: versions before 1 were strings, and a client sending one
    must be answered with the version the agent speaks (it was -32602). 1.0 is an integer
    to JSON Schema."""
    assert acp.parse_initialize({"protocolVersion": version}).protocol_version == read


@pytest.mark.parametrize("params", [{}, {"methodId": 5}, None])
def test_authenticate_needs_a_method_id(params: Any) -> None:
    assert "methodId is required" in _refused(acp.parse_authenticate, params)


def test_initialize_missing_version_and_non_object_params() -> None:
    assert "protocolVersion is required" in _refused(acp.parse_initialize, {})
    assert "protocolVersion is required" in _refused(acp.parse_initialize, None)
    assert "expected an object" in _refused(acp.parse_initialize, [1])


# -- session/new ------------------------------------------------------------------------------


def test_new_session_ok_with_meta_and_unknown_fields() -> None:
    parsed = acp.parse_new_session(
        {
            "cwd": "/work/p",
            "mcpServers": [],
            "additionalDirectories": ["/work/q"],
            "_meta": {"k": "v"},
            "futureField": True,
        }
    )
    assert parsed == acp.NewSessionParams("/work/p", ("/work/q",), {"k": "v"})


def test_new_session_cwd_relative() -> None:
    message = _refused(acp.parse_new_session, {"cwd": "rel/dir", "mcpServers": []})
    assert "cwd" in message and "absolute" in message and "rel/dir" in message


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"mcpServers": []}, "cwd is required"),
        ({"cwd": None, "mcpServers": []}, "cwd is required"),
        ({"cwd": 5, "mcpServers": []}, "cwd must be a string, got a number"),
        ({"cwd": ["/p"], "mcpServers": []}, "cwd must be a string, got an array"),
        ({"cwd": {}, "mcpServers": []}, "cwd must be a string, got an object"),
        ({"cwd": False, "mcpServers": []}, "cwd must be a string, got a boolean"),
        ({"cwd": "/p"}, "mcpServers is required"),
        (
            {"cwd": "/p", "mcpServers": [], "additionalDirectories": ["/a", 3, "b"]},
            "additionalDirectories[2] must be an absolute path",
        ),
    ],
)
def test_new_session_refusals_name_the_field(params: dict[str, Any], fragment: str) -> None:
    assert fragment in _refused(acp.parse_new_session, params)


STDIO_SERVER = {"name": "fs", "command": "/usr/bin/mcp-fs", "args": ["--root", "/p"],
                "env": [{"name": "TOKEN", "value": "x"}]}  # fmt: skip


@pytest.mark.parametrize(
    ("servers", "fragment"),
    [
        ([STDIO_SERVER, {**STDIO_SERVER, "type": "http", "url": "http://x", "headers": []}],
         "mcpServers[1].type 'http' MCP servers are not supported: mcpCapabilities.http"),
        ([{"type": "sse", "name": "s", "url": "http://x", "headers": []}], "mcpCapabilities.sse"),
    ],
)  # fmt: skip
def test_mcp_servers_the_agent_cannot_take_are_refused(servers: list[Any], fragment: str) -> None:
    """Entries that need a capability the agent does not advertise are refused."""
    for parse in (
        acp.parse_new_session,
        lambda p: acp.parse_load_session({**p, "sessionId": "s"}, mcp_required=True),
    ):
        assert fragment in _refused(parse, {"cwd": "/p", "mcpServers": servers})


@pytest.mark.parametrize(
    "servers",
    [
        None, {}, "x",  # not an array: read as [] (x-deserialize-default-on-error)
        [42], [None],  # not an McpServer: skipped (x-deserialize-skip-invalid-items)
        [{k: v for k, v in STDIO_SERVER.items() if k != "command"}],
        [{**STDIO_SERVER, "args": "--root"}], [{**STDIO_SERVER, "args": [1]}],
        [{k: v for k, v in STDIO_SERVER.items() if k != "env"}],
        [{**STDIO_SERVER, "env": [{"name": "A"}]}],
    ],
)  # fmt: skip
def test_mcp_servers_are_read_as_the_schema_says(servers: Any) -> None:
    """The schema marks mcpServers default-on-error and skip-invalid-items: a session
    whose list is malformed is not refused (it once was, where the reference agents
    accept it; found by a lifecycle audit)."""
    params = {"cwd": "/p", "mcpServers": servers}
    assert acp.parse_new_session(params).cwd == "/p"
    assert acp.parse_load_session({**params, "sessionId": "s"}, mcp_required=True).cwd == "/p"


def test_additional_directories_are_read_as_the_schema_says() -> None:
    """Also default-on-error and skip-invalid-items: not an array reads as none, an item
    that is not a string is skipped; a path that is not absolute is still -32602."""
    for value, expected in [("x", ()), ({"a": 1}, ()), (["/a", 3, None, "/b"], ("/a", "/b"))]:
        params = {"cwd": "/p", "mcpServers": [], "additionalDirectories": value}
        assert acp.parse_new_session(params).additional_directories == expected


def test_additional_directories_are_bounded() -> None:
    """At most ``MAX_ADDITIONAL_DIRECTORIES`` paths, or -32602 naming the bound, before any
    is resolved: each costs a walk of the file system in the server's one thread (about
    40 us), and a session/new with 200,000 of them (a 5 MB message) held every client
    up for 7.5 s. Items skipped as the schema says (not strings) do not count."""
    most = acp.MAX_ADDITIONAL_DIRECTORIES
    params = {"cwd": "/p", "mcpServers": [], "additionalDirectories": ["/a"] * most + [3]}
    assert len(acp.parse_new_session(params).additional_directories) == most
    params["additionalDirectories"] = ["/a"] * (most + 1)
    for parse in (
        acp.parse_new_session,
        lambda p: acp.parse_load_session({**p, "sessionId": "s"}, mcp_required=True),
    ):
        message = _refused(parse, params)
        assert message == (
            f"Invalid params: additionalDirectories has {most + 1} paths, over the limit of {most}"
        )


def test_stdio_mcp_servers_are_accepted() -> None:
    for server in (STDIO_SERVER, {**STDIO_SERVER, "type": "stdio", "_meta": {"x": 1}}):
        parsed = acp.parse_new_session({"cwd": "/p", "mcpServers": [server]})
        assert parsed.cwd == "/p"  # (no RpcError: the server is a valid stdio one)


def test_new_session_mcp_servers_missing_message() -> None:
    message = _refused(acp.parse_new_session, {"cwd": "/p"})
    assert message.startswith("Invalid params: mcpServers")


# -- session ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, None, ["s"], {"id": "s"}])
def test_session_id_not_a_string(value: Any) -> None:
    message = _refused(acp.parse_session_id, {"sessionId": value})
    assert "sessionId" in message


def test_session_id_ok_and_missing() -> None:
    assert acp.parse_session_id({"sessionId": "s1", "_meta": {}}) == acp.SessionRef("s1")
    assert "sessionId is required" in _refused(acp.parse_session_id, {})


def test_load_session_and_list_sessions() -> None:
    ref = acp.parse_load_session({"sessionId": "s", "cwd": "/p"}, mcp_required=False)
    assert ref == acp.SessionRef("s", "/p", ())
    assert "mcpServers" in _refused(
        acp.parse_load_session, {"sessionId": "s", "cwd": "/p"}, mcp_required=True
    )
    assert acp.parse_list_sessions({}) == acp.ListSessionsParams(None, None)
    assert acp.parse_list_sessions({"cwd": "/p", "cursor": "c"}) == acp.ListSessionsParams(
        "/p", "c"
    )
    assert "cwd" in _refused(acp.parse_list_sessions, {"cwd": "p"})
    assert "cursor" in _refused(acp.parse_list_sessions, {"cursor": 3})


# -- session/prompt ---------------------------------------------------------------------------


def _prompt(*blocks: Any, **extra: Any) -> dict[str, Any]:
    return {"sessionId": "s", "prompt": list(blocks), **extra}


def test_prompt_ok_with_all_baseline_block_types() -> None:
    parsed = acp.parse_prompt(
        _prompt(
            {"type": "text", "text": "hello", "_meta": {"m": 1}, "annotations": {}},
            {"type": "resource_link", "name": "a.py", "uri": "file:///a.py"},
            {"type": "resource", "resource": {"uri": "file:///b.py", "text": "print(1)"}},
            {"type": "resource", "resource": {"uri": "file:///c.bin", "blob": "AAAA"}},
            _meta={"x": 1},
            extra="tolerated",
        )
    )
    assert parsed.session_id == "s"
    assert len(parsed.prompt) == 4
    assert parsed.text() == "hello\n[a.py](file:///a.py)\nprint(1)\n<file:///c.bin>"


def test_prompt_image_unsupported_names_the_block() -> None:
    message = _refused(
        acp.parse_prompt,
        _prompt({"type": "text", "text": "a"}, {"type": "image", "data": "", "mimeType": "x"}),
    )
    assert "prompt[1].type" in message
    assert "image" in message and "promptCapabilities" in message


def test_prompt_audio_unsupported() -> None:
    assert "prompt[0].type" in _refused(
        acp.parse_prompt, _prompt({"type": "audio", "data": "", "mimeType": "x"})
    )


@pytest.mark.parametrize(
    ("blocks", "fragment"),
    [
        ([{"type": "text"}], "prompt[0].text is required"),
        ([{"type": "text", "text": 3}], "prompt[0].text must be a string"),
        ([{"type": "text", "text": "a"}, {"type": "video"}], "prompt[1].type must be one of"),
        ([{"text": "a"}], "prompt[0].type must be one of"),
        ([{"type": ["text"]}], "prompt[0].type must be one of"),  # unhashable: once -32603
        ([{"type": {"a": 1}}], "prompt[0].type must be one of"),
        (["just a string"], "prompt[0] must be a content block object"),
        ([{"type": "resource_link", "uri": "u"}], "prompt[0].name is required"),
        ([{"type": "resource_link", "name": "n"}], "prompt[0].uri is required"),
        ([{"type": "resource"}], "prompt[0].resource must be an object"),
        ([{"type": "resource", "resource": {"text": "t"}}], "prompt[0].resource.uri is required"),
        # Neither TextResourceContents nor BlobResourceContents: once stored, and replayed
        # as a user_message_chunk the SDK's client refuses.
        ([{"type": "resource", "resource": {"uri": "u"}}], "prompt[0].resource must hold"),
        ([{"type": "resource", "resource": {"uri": "u", "text": 7}}], "string text or blob"),
        ([{"type": "resource", "resource": {"uri": "u", "blob": None}}], "string text or blob"),
    ],
)
def test_prompt_block_refusals_name_the_path(blocks: list[Any], fragment: str) -> None:
    assert fragment in _refused(acp.parse_prompt, _prompt(*blocks))


def test_prompt_optional_fields_with_bad_values_are_dropped_as_the_schema_reads_them(
    acp_schema: SchemaChecker,
) -> None:
    """Fields the schema marks ``x-deserialize-default-on-error`` are read as absent when
    their value is bad; the agent stores (and replays) the block as read, so what it sends
    back is valid. Good values and unknown fields are kept, and valid blocks are not copied."""
    good = {"type": "text", "text": "a", "annotations": {"priority": 0.5, "audience": ["user"]}}
    blocks = [
        good,
        {"type": "text", "text": "b", "annotations": 5, "_meta": "x", "extra": 1},
        {"type": "text", "text": "c", "annotations": {"priority": "high", "audience": ["user", 3,
                                                       "robot"], "lastModified": None}},
        {"type": "resource_link", "name": "n", "uri": "u", "size": "big", "title": 3,
         "mimeType": "text/plain", "description": 42},
        {"type": "resource", "resource": {"uri": "u", "blob": "AA", "mimeType": 1}},
    ]  # fmt: skip
    parsed = acp.parse_prompt(_prompt(*blocks))
    assert parsed.prompt[0] is good
    # (The client's own unknown field, "extra", is kept and echoed as sent: validated
    # against the schema as written, which leaves objects open, not the closed copy.)
    acp_schema.strict = False
    assert list(parsed.prompt[1:]) == [
        {"type": "text", "text": "b", "extra": 1},
        {"type": "text", "text": "c", "annotations": {"audience": ["user"], "lastModified": None}},
        {"type": "resource_link", "name": "n", "uri": "u", "mimeType": "text/plain"},
        {"type": "resource", "resource": {"uri": "u", "blob": "AA"}},
    ]
    for block in parsed.prompt:
        update = {"sessionUpdate": "user_message_chunk", "content": block}
        acp_schema.agent_sent(
            {"jsonrpc": "2.0", "method": "session/update",
             "params": {"sessionId": "s", "update": update}}
        )  # fmt: skip
    assert blocks[1]["annotations"] == 5  # the client's own objects are left alone


def test_prompt_missing_or_not_an_array() -> None:
    assert "prompt is required" in _refused(acp.parse_prompt, {"sessionId": "s"})
    assert "prompt is required" in _refused(acp.parse_prompt, {"sessionId": "s", "prompt": "hello"})
    assert "sessionId" in _refused(acp.parse_prompt, {"prompt": []})
    assert "sessionId must be a string" in _refused(
        acp.parse_prompt, {"sessionId": 42, "prompt": []}
    )


def test_prompt_size_limit_counts_text_and_every_other_block_whole() -> None:
    """A bare text block counts its text's UTF-8 bytes; any other block its whole JSON
    text (what is stored and replayed). Counting only text once let an 8 MiB blob, uri,
    annotations or _meta through a 1,000-byte limit."""
    text = {"type": "text", "text": "é" * 50}  # 100 bytes in UTF-8
    resource = {"type": "resource", "resource": {"uri": "u", "text": "x" * 50}}
    resource_size = len(json.dumps(resource, separators=(",", ":")))  # 89
    assert acp.parse_prompt(_prompt(text), max_bytes=100).prompt == (text,)
    message = _refused(acp.parse_prompt, _prompt(text), max_bytes=99)
    assert "100 bytes" in message and "99-byte limit" in message
    total = 100 + resource_size
    assert acp.parse_prompt(_prompt(text, resource), max_bytes=total)
    assert f"{total} bytes" in _refused(
        acp.parse_prompt, _prompt(text, resource), max_bytes=total - 1
    )
    for big in (
        {"type": "resource", "resource": {"uri": "u", "blob": "A" * 2000}},
        {"type": "resource_link", "name": "n", "uri": "u" * 2000},
        {"type": "text", "text": "hi", "_meta": {"x": "y" * 2000}},
        {"type": "text", "text": "hi", "annotations": {"lastModified": "z" * 2000}},
    ):
        assert "over the 1000-byte limit" in _refused(
            acp.parse_prompt, _prompt(big), max_bytes=1000
        ), big
    # No limit: anything goes.
    assert acp.parse_prompt(_prompt({"type": "text", "text": "x" * 100_000}))


def test_prompt_size_limit_counts_every_text_block_past_the_first() -> None:
    """Each bare text block past the first counts its JSON envelope too
    (``{"type":"text","text":""}``, 25 bytes): each is a transcript entry stored and
    replayed. Counting their text alone, a prompt of 500,000 empty text blocks (15 MB on
    the wire) was 0 bytes under the 1 MiB limit: 500,000 entries stored (100 MB of
    SQLite and WAL), a session/load of 83 s, and other clients stalled for 1.9 s."""
    envelope = len('{"type":"text","text":""}')
    empty = {"type": "text", "text": ""}
    message = _refused(acp.parse_prompt, _prompt(*[empty] * 1000), max_bytes=1000)
    first_over = 1000 // envelope + 1  # (the first block's envelope is not counted)
    assert f"at least {first_over * envelope} bytes (by prompt[{first_over}] of 1000)" in message
    # One text block still counts its text alone: exactly at the limit passes.
    assert acp.parse_prompt(_prompt({"type": "text", "text": "é" * 50}), max_bytes=100)
    two = _prompt({"type": "text", "text": "é" * 50}, {"type": "text", "text": "x" * 10})
    assert acp.parse_prompt(two, max_bytes=100 + envelope + 10)
    assert f"{100 + envelope + 10} bytes" in _refused(
        acp.parse_prompt, two, max_bytes=100 + envelope + 9
    )


def test_an_oversized_prompt_is_refused_at_the_block_that_passes_the_limit() -> None:
    """The blocks past the one that takes the prompt over the limit are not looked at:
    the refusal's work is bounded by the limit, not by the message. Walked to its end, a
    prompt of 500,000 empty text blocks (12.5 MB) held the event loop, and every other
    client, for 2.3 s (an audit, 2026-12-07); a bad block past the limit is not what is
    reported either."""
    empty = {"type": "text", "text": ""}
    bad = {"type": "nonsense"}
    message = _refused(acp.parse_prompt, _prompt(*[empty] * 100, bad), max_bytes=1000)
    assert "at least 1025 bytes (by prompt[41] of 101), over the 1000-byte limit" in message
    # The last block passing it: the exact size, as before.
    message = _refused(acp.parse_prompt, _prompt({"type": "text", "text": "x" * 8}), max_bytes=7)
    assert "prompt is 8 bytes, over the 7-byte limit" in message


def test_params_object() -> None:
    assert acp.params_object(None) == {}
    assert acp.params_object({"a": 1}) == {"a": 1}
    assert "expected an object" in _refused(acp.params_object, [1])


@pytest.mark.parametrize("bad", ["/tmp/a\x00b", "/tmp/\ud800"])
def test_paths_and_ids_with_nul_or_a_lone_surrogate_are_refused(bad: str) -> None:
    """Valid JSON strings no path or id can hold (they once failed deep in the OS or the
    store as -32603); prompt text may hold a surrogate (it is carried escaped)."""
    mcp: dict[str, Any] = {"mcpServers": []}
    assert "cwd must not contain NUL" in _refused(acp.parse_new_session, {"cwd": bad, **mcp})
    extra = {"cwd": "/tmp", "additionalDirectories": ["/tmp", bad], **mcp}
    assert "additionalDirectories[1] must not contain" in _refused(acp.parse_new_session, extra)
    assert "cwd must not contain" in _refused(acp.parse_list_sessions, {"cwd": bad})
    load = {"sessionId": bad, "cwd": "/tmp", **mcp}
    assert "sessionId must not contain" in _refused(acp.parse_load_session, load, mcp_required=True)
    assert "sessionId must not contain" in _refused(acp.parse_session_id, {"sessionId": bad})
    assert "sessionId must not contain" in _refused(acp.parse_prompt, _prompt(sessionId=bad))
    text = {"type": "text", "text": "a\ud800b"}
    assert acp.parse_prompt(_prompt(text)).prompt == (text,)
