"""Validation of incoming ACP params into small attrs values (sans-I/O).

Every refusal is an :class:`RpcError` -32602 whose message names the offending field with a
JSON path (``prompt[2].text``), because a client developer reading the error should not have to
guess. Unknown fields and ``_meta`` are tolerated, as the extensibility page requires.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from .. import _json
from .._json import is_name_text
from ..rpc import INVALID_PARAMS, Params, RpcError

_CONTENT_TYPES = frozenset({"text", "image", "audio", "resource_link", "resource"})
# Baseline content every agent must accept (prompt-turn page); the rest needs a capability.
SUPPORTED_PROMPT_TYPES = frozenset({"text", "resource_link", "resource"})


def _bad(path: str, why: str) -> RpcError:
    return RpcError.invalid_params(f"Invalid params: {path} {why}")


def params_object(params: Params) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise RpcError.invalid_params("Invalid params: expected an object")
    return params


def _str(obj: Mapping[str, Any], key: str, *, path: str = "", required: bool = True) -> str | None:
    where = f"{path}{key}"
    if key not in obj or obj[key] is None:
        if required:
            raise _bad(where, "is required")
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise _bad(where, f"must be a string, got {_json.kind(value)}")
    return value


def _req_str(obj: Mapping[str, Any], key: str, path: str = "") -> str:
    value = _str(obj, key, path=path)
    assert value is not None
    return value


def _name_text(value: str, where: str) -> str:
    """``value``, refused if it holds NUL or a lone surrogate (``_json.is_name_text``)."""
    if not is_name_text(value):
        raise _bad(where, f"must not contain NUL or a lone surrogate, got {value!r}")
    return value


def _abs_path_text(value: str, where: str) -> str:
    _name_text(value, where)
    if not os.path.isabs(value):
        raise _bad(where, f"must be an absolute path, got {value!r}")
    return value


def _abs_path(obj: Mapping[str, Any], key: str) -> str:
    return _abs_path_text(_req_str(obj, key), key)


def _session_id(obj: Mapping[str, Any]) -> str:
    return _name_text(_req_str(obj, "sessionId"), "sessionId")


def _bool(obj: Mapping[str, Any], key: str, path: str) -> bool:
    value = obj.get(key, False)
    # The schema marks these x-deserialize-default-on-error: a wrong type reads as false.
    return value is True


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("_meta")
    return meta if isinstance(meta, dict) else {}


@attrs.frozen
class ClientCapabilities:
    read_text_file: bool = False
    write_text_file: bool = False
    terminal: bool = False


@attrs.frozen
class InitializeParams:
    protocol_version: int
    capabilities: ClientCapabilities
    client_info: dict[str, Any] | None
    meta: dict[str, Any]


def parse_authenticate(params: Params) -> str:
    """``authenticate``'s ``methodId`` (required, a string)."""
    obj = params_object(params)
    method_id = obj.get("methodId")
    if not isinstance(method_id, str):
        raise _bad("methodId", "is required (a string)")
    return method_id


def parse_initialize(params: Params) -> InitializeParams:
    obj = params_object(params)
    if "protocolVersion" not in obj:
        raise _bad("protocolVersion", "is required")
    version = obj["protocolVersion"]
    if isinstance(version, str):
        # Versions before 1 were strings ("0.2.0"): read as 0, as the reference SDK does,
        # so such a client is answered with version 1 and can tell the mismatch.
        version = 0
    elif isinstance(version, float) and version.is_integer():
        version = int(version)  # (1.0 is an integer to JSON Schema)
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= 65535:
        raise _bad("protocolVersion", "must be an integer from 0 to 65535")
    caps_obj = obj.get("clientCapabilities")
    caps = ClientCapabilities()
    if isinstance(caps_obj, dict):
        fs_obj = caps_obj.get("fs")
        fs: dict[str, Any] = fs_obj if isinstance(fs_obj, dict) else {}
        caps = ClientCapabilities(
            read_text_file=_bool(fs, "readTextFile", "clientCapabilities.fs."),
            write_text_file=_bool(fs, "writeTextFile", "clientCapabilities.fs."),
            terminal=_bool(caps_obj, "terminal", "clientCapabilities."),
        )
    info = obj.get("clientInfo")
    return InitializeParams(version, caps, info if isinstance(info, dict) else None, _meta(obj))


@attrs.frozen
class NewSessionParams:
    cwd: str
    additional_directories: tuple[str, ...]
    meta: dict[str, Any]


def _mcp_servers(obj: Mapping[str, Any], required: bool) -> None:
    """Read ``mcpServers`` as the schema tells a receiver to: it is marked
    ``x-deserialize-default-on-error`` (a value that is not an array reads as ``[]``) and
    ``x-deserialize-skip-invalid-items`` (an entry that is not an ``McpServer`` is
    skipped). An entry refused by a capability is -32602: ``http`` and ``sse`` servers, as
    ``mcpCapabilities`` advertises. The stdio servers are not started yet (no model
    backend calls MCP tools: docs/architecture.md). (Refusing malformed entries, as this
    once did, refused whole sessions that the reference agents accept.)"""
    if "mcpServers" not in obj:
        if required:
            raise _bad("mcpServers", "is required (send [] for none)")
        return
    servers = obj["mcpServers"]
    if not isinstance(servers, list):
        return
    for i, server in enumerate(servers):
        kind = server.get("type") if isinstance(server, dict) else None
        if kind in ("http", "sse"):
            raise _bad(
                f"mcpServers[{i}].type", f"{kind!r} MCP servers are not supported: "
                f"mcpCapabilities.{kind} is false (use a stdio server)",
            )  # fmt: skip


#: The most ``additionalDirectories`` a session/new, load or resume may name.
MAX_ADDITIONAL_DIRECTORIES = 256


def _directories(obj: Mapping[str, Any]) -> tuple[str, ...]:
    """``additionalDirectories`` as the schema reads it (marked default-on-error and
    skip-invalid-items: not an array reads as none, an item that is not a string is
    skipped); each path must be absolute, or it is -32602 naming it."""
    value = obj.get("additionalDirectories")
    if not isinstance(value, list):
        return ()
    count = sum(1 for item in value if isinstance(item, str))
    if count > MAX_ADDITIONAL_DIRECTORIES:
        # Before any is resolved: each is a walk of the file system in the server's one
        # thread, and 200,000 of them (a 5 MB message) held every client up for 7.5 s.
        raise RpcError.invalid_params(
            f"Invalid params: additionalDirectories has {count} paths, "
            f"over the limit of {MAX_ADDITIONAL_DIRECTORIES}"
        )
    return tuple(
        _abs_path_text(item, f"additionalDirectories[{i}]")
        for i, item in enumerate(value)
        if isinstance(item, str)
    )


def parse_new_session(params: Params) -> NewSessionParams:
    obj = params_object(params)
    cwd = _abs_path(obj, "cwd")
    _mcp_servers(obj, required=True)
    return NewSessionParams(cwd, _directories(obj), _meta(obj))


@attrs.frozen
class SessionRef:
    """Params of methods that name one session (and, for load/resume, its cwd)."""

    session_id: str
    cwd: str | None = None
    additional_directories: tuple[str, ...] = ()


def parse_session_id(params: Params) -> SessionRef:
    return SessionRef(_session_id(params_object(params)))


def parse_load_session(params: Params, *, mcp_required: bool) -> SessionRef:
    obj = params_object(params)
    session_id = _session_id(obj)
    cwd = _abs_path(obj, "cwd")
    _mcp_servers(obj, required=mcp_required)
    return SessionRef(session_id, cwd, _directories(obj))


@attrs.frozen
class ListSessionsParams:
    cwd: str | None
    cursor: str | None


def parse_list_sessions(params: Params) -> ListSessionsParams:
    obj = params_object(params)
    cwd = _str(obj, "cwd", required=False)
    if cwd is not None:
        _abs_path_text(cwd, "cwd")
    return ListSessionsParams(cwd, _str(obj, "cursor", required=False))


@attrs.frozen
class PromptParams:
    session_id: str
    prompt: tuple[dict[str, Any], ...]

    def text(self) -> str:
        """The prompt as plain text for a model (see :func:`prompt_text`)."""
        return prompt_text(self.prompt)


def prompt_text(blocks: Iterable[Any]) -> str:
    """Prompt content blocks as plain text for a model: text blocks verbatim, resources by
    content when embedded, links as ``[name](uri)``, a line each.

    One function for a prompt as it comes and for its blocks read back from the store
    (its ``user_message_chunk``s): the history a load gives the model must be the one the
    live session kept. (The stored history once held the text blocks alone, so after a
    restart the model no longer saw the files an earlier prompt had linked or embedded.)
    Blocks from the store are not checked as a prompt is: anything else is skipped."""
    parts: list[str] = []
    for block in blocks:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if isinstance(text, str):
                parts.append(text)
        elif kind == "resource_link":
            parts.append(f"[{block.get('name')}]({block.get('uri')})")
        elif kind == "resource":
            resource = block.get("resource")
            if isinstance(resource, dict):
                text = resource.get("text")
                parts.append(text if isinstance(text, str) else f"<{resource.get('uri', '')}>")
    return "\n".join(parts)


#: What a bare text block adds to a prompt beyond its text: ``{"type":"text","text":""}``.
TEXT_BLOCK_ENVELOPE = 25


def _utf8_len(text: str) -> int:
    """The UTF-8 size of ``text``. A lone surrogate (valid JSON: ``"\\ud800"``) counts as
    the 3 bytes ``surrogatepass`` gives it; the prompt is not refused for it (it is sent
    on and stored escaped, see ``punie_trio._json``)."""
    return len(text.encode("utf-8", "surrogatepass"))


#: Optional fields the schema marks ``x-deserialize-default-on-error`` (a receiver reads a
#: bad value as absent), with the JSON types each may hold, by content block type.
_META = ("_meta", (dict,))
_LENIENT: dict[str, tuple[tuple[str, tuple[type, ...]], ...]] = {
    "text": (("annotations", (dict,)), _META),
    "resource_link": (
        ("annotations", (dict,)), ("mimeType", (str,)), ("size", (int,)), ("title", (str,)),
        ("description", (str,)), _META,
    ),
    "resource": (("annotations", (dict,)), _META),
}  # fmt: skip
_LENIENT_RESOURCE = (("mimeType", (str,)), _META)
_LENIENT_ANNOTATIONS = (("lastModified", (str,)), ("priority", (int, float)), _META)
_ROLES = frozenset({"assistant", "user"})


def _drop_bad(
    obj: dict[str, Any], fields: tuple[tuple[str, tuple[type, ...]], ...]
) -> dict[str, Any]:
    """``obj`` without the listed optional fields whose value has the wrong type (``obj``
    itself when none has: the usual case costs no copy). ``None`` counts as absent."""
    bad = [
        key
        for key, types in fields
        if (value := obj.get(key)) is not None
        and (not isinstance(value, types) or isinstance(value, bool))
    ]
    if not bad:
        return obj
    return {k: v for k, v in obj.items() if k not in bad}


def _lenient_fields(block: dict[str, Any], kind: str) -> dict[str, Any]:
    """The block as the schema reads it: optional fields marked default-on-error that hold a
    bad value are dropped, as a receiver would read them, so the block is stored and replayed
    (``user_message_chunk``) valid. Required fields are checked by the caller (-32602)."""
    fixed = _drop_bad(block, _LENIENT[kind])
    annotations = fixed.get("annotations")
    if isinstance(annotations, dict):
        clean = _drop_bad(annotations, _LENIENT_ANNOTATIONS)
        audience = clean.get("audience")
        if audience is not None:
            if not isinstance(audience, list):
                clean = {k: v for k, v in clean.items() if k != "audience"}
            elif not all(isinstance(r, str) and r in _ROLES for r in audience):
                # (the schema: x-deserialize-skip-invalid-items)
                roles = [r for r in audience if isinstance(r, str) and r in _ROLES]
                clean = {**clean, "audience": roles}
        if clean is not annotations:
            fixed = {**fixed, "annotations": clean}
    if kind == "resource":
        resource = fixed["resource"]
        clean_resource = _drop_bad(resource, _LENIENT_RESOURCE)
        if clean_resource is not resource:
            fixed = {**fixed, "resource": clean_resource}
    return fixed


def _check_size(size: int, max_bytes: int | None, i: int, count: int) -> None:
    """Refuse the prompt at the block (``i`` of ``count``) that takes it past ``max_bytes``:
    the work a refusal costs is bounded by the limit, not the message (walked to its end,
    500,000 empty text blocks held the event loop, every client's, for 2.3 s)."""
    if max_bytes is None or size <= max_bytes:
        return
    if i + 1 < count:
        raise PromptTooLarge(
            INVALID_PARAMS,
            f"Invalid params: prompt is at least {size} bytes (by prompt[{i}] of {count}), "
            f"over the {max_bytes}-byte limit",
        )
    raise PromptTooLarge(
        INVALID_PARAMS, f"Invalid params: prompt is {size} bytes, over the {max_bytes}-byte limit"
    )


class PromptTooLarge(RpcError):
    """-32602 for a prompt over ``max_bytes``: an :class:`RpcError` like any invalid
    params, told apart so the hub can count the limit hit (``punie_limits_hit_total``)."""


def parse_prompt(params: Params, *, max_bytes: int | None = None) -> PromptParams:
    obj = params_object(params)
    session_id = _session_id(obj)
    blocks = obj.get("prompt")
    if not isinstance(blocks, list):
        raise _bad("prompt", "is required and must be an array of content blocks")
    size = 0
    cleaned: list[dict[str, Any]] | None = None  # a copy, made only if a block changes
    for i, block in enumerate(blocks):
        path = f"prompt[{i}]"
        if not isinstance(block, dict):
            raise _bad(path, "must be a content block object")
        kind = block.get("type")
        if not isinstance(kind, str) or kind not in _CONTENT_TYPES:
            raise _bad(f"{path}.type", f"must be one of {sorted(_CONTENT_TYPES)}, got {kind!r}")
        if kind not in SUPPORTED_PROMPT_TYPES:
            raise _bad(
                f"{path}.type", f"{kind!r} is not supported: promptCapabilities.{kind} is false"
            )
        if kind == "text":
            _req_str(block, "text", f"{path}.")
            if len(block) == 2:
                # A bare text block counts its text (past the first, its JSON envelope
                # too: each block is a transcript entry, and 500,000 empty ones, 15 MB,
                # were once 0 bytes), and has no optional field to clean.
                size += _utf8_len(block["text"]) + (TEXT_BLOCK_ENVELOPE if i else 0)
                _check_size(size, max_bytes, i, len(blocks))
                continue
        elif kind == "resource_link":
            _req_str(block, "name", f"{path}.")
            _req_str(block, "uri", f"{path}.")
        else:
            resource = block.get("resource")
            if not isinstance(resource, dict):
                raise _bad(f"{path}.resource", "must be an object")
            _req_str(resource, "uri", f"{path}.resource.")
            contents, blob = resource.get("text"), resource.get("blob")
            if not isinstance(contents, str) and not isinstance(blob, str):
                raise _bad(f"{path}.resource", "must hold a string text or blob (the schema's "
                           "TextResourceContents or BlobResourceContents)")  # fmt: skip
        # Any other block (or a text block with more fields: annotations, _meta) counts
        # its whole JSON text, which is what is stored and replayed: an 8 MiB blob or
        # _meta is as big as 8 MiB of text.
        size += _utf8_len(_json.dumps(block))
        _check_size(size, max_bytes, i, len(blocks))
        fixed = _lenient_fields(block, kind)
        if fixed is not block:
            if cleaned is None:
                cleaned = list(blocks)
            cleaned[i] = fixed
    if cleaned is not None:
        blocks = cleaned
    return PromptParams(session_id, tuple(blocks))
