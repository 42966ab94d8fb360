"""Validate every ACP message the agent sends against the official v1 schema, per method.

The schema's ``$defs`` carry ``x-method`` and ``x-side``; a message is checked against the
definition for its method and role: ``<X>Request`` params for agent->client requests,
``<X>Notification`` params for notifications, ``<X>Response`` results for answers to the
client's requests (the checker remembers which method each request id was for), and the
``Error`` definition for error answers.

Strict: the schema leaves its objects open (``additionalProperties: true``, so a reader of
a newer version keeps working), which would let a misspelt optional field (``rawinput``)
or a field of our own at the root of a spec type through unnoticed; the extensibility page
says implementations "MUST NOT add any custom fields at the root of a type that's part of
the specification" (extensions go in ``_meta``). So messages are validated against a
closed copy of the schema (:func:`_closed`), and the JSON-RPC envelope is checked too.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import referencing.jsonschema

SCHEMA_PATH = Path(__file__).parent / "data" / "acp" / "schema.json"
_SCHEMA = json.loads(SCHEMA_PATH.read_text())


def _allof_bases(node: Any, found: set[str]) -> set[str]:
    """The definitions an object schema extends through ``allOf`` (``{"properties":
    {"sessionUpdate": ...}, "allOf": [{"$ref": "#/$defs/ToolCall"}]}``): closing those
    would refuse the extending object's own fields, so the extending object is closed
    instead (``unevaluatedProperties`` sees the fields ``allOf`` evaluated)."""
    if isinstance(node, dict):
        if "properties" in node or "required" in node:
            for sub in node.get("allOf", ()):
                ref = sub.get("$ref") if isinstance(sub, dict) else None
                if ref is not None:
                    found.add(ref.rsplit("/", 1)[-1])
        for value in node.values():
            _allof_bases(value, found)
    elif isinstance(node, list):
        for value in node:
            _allof_bases(value, found)
    return found


def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` in which every object that lists its ``properties`` admits no
    others (``_meta`` and free-form values such as ``rawInput`` list none: they stay open)."""
    closed = copy.deepcopy(schema)
    bases = _allof_bases(closed, set())

    def close(node: Any, in_properties: bool) -> None:
        if isinstance(node, dict):
            open_object = node.get("additionalProperties", True) is True
            if not in_properties and "properties" in node and open_object:
                node.pop("additionalProperties", None)
                node["unevaluatedProperties"] = False
            for key, value in node.items():
                close(value, key == "properties")
        elif isinstance(node, list):
            for value in node:
                close(value, False)

    for name, definition in closed["$defs"].items():
        if name not in bases:
            close(definition, False)
        else:  # (its nested objects are still closed)
            for key, value in definition.items():
                close(value, key == "properties")
    # A base used as it is, not extended (``session/request_permission``'s ``toolCall`` is
    # a ``ToolCallUpdate``), was open there: such a use refers to a closed copy of it.
    for name in bases:
        standalone = copy.deepcopy(closed["$defs"][name])
        close(standalone, False)
        closed["$defs"][name + _STANDALONE] = standalone
    _use_standalone(closed, bases, extending=False)
    return closed


_STANDALONE = "--standalone"


def _use_standalone(node: Any, bases: set[str], *, extending: bool) -> None:
    """Point each ``$ref`` to one of ``bases`` at its closed copy, but where an object
    extends it (a member of the ``allOf`` of an object listing ``properties``)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if not extending and isinstance(ref, str) and ref.rsplit("/", 1)[-1] in bases:
            node["$ref"] = ref + _STANDALONE
        extends = "properties" in node or "required" in node
        for key, value in node.items():
            if key == "allOf" and isinstance(value, list):
                for sub in value:
                    _use_standalone(sub, bases, extending=extends)
            else:
                _use_standalone(value, bases, extending=False)
    elif isinstance(node, list):
        for value in node:
            _use_standalone(value, bases, extending=False)


def _registry(schema: dict[str, Any]) -> referencing.Registry[Any]:
    resource = referencing.jsonschema.DRAFT202012.create_resource(schema)
    return referencing.Registry().with_resource("urn:acp", resource)


_REGISTRIES = (_registry(_SCHEMA), _registry(_closed(_SCHEMA)))

_BY_METHOD: dict[tuple[str, str], str] = {}
for _name, _def in _SCHEMA["$defs"].items():
    _method = _def.get("x-method")
    if _method is None:
        continue
    for _suffix in ("Request", "Response", "Notification"):
        if _name.endswith(_suffix):
            _BY_METHOD[(_method, _suffix)] = _name


def _validator(def_name: str, registry: referencing.Registry[Any]) -> Any:
    cls = jsonschema.validators.validator_for(_SCHEMA)
    return cls({"$ref": f"urn:acp#/$defs/{def_name}"}, registry=registry)


_VALIDATORS: dict[str, list[Any]] = {}


def validate_def(def_name: str, instance: Any, *, strict: bool = True) -> None:
    """Validate ``instance`` against the definition closed (``strict``: what passes it
    passes the schema as written too, the closed copy only adds refusals), or as written."""
    validators = _VALIDATORS.get(def_name)
    if validators is None:
        validators = _VALIDATORS[def_name] = [_validator(def_name, r) for r in _REGISTRIES]
    validators[1 if strict else 0].validate(instance)


_REQUEST_KEYS = frozenset({"jsonrpc", "id", "method", "params"})
_RESPONSE_KEYS = frozenset({"jsonrpc", "id", "result", "error"})


class SchemaChecker:
    """Feed it what the client sends (:meth:`client_sent`) and what the agent sends
    (:meth:`agent_sent`); every agent message is validated, and ``checked`` counts them.
    ``strict`` False validates against the schema as written only (open objects)."""

    def __init__(self, *, strict: bool = True) -> None:
        self.requests: dict[Any, str] = {}
        self.checked = 0
        self.strict = strict

    def client_sent(self, msg: dict[str, Any]) -> None:
        if "method" in msg and "id" in msg:
            self.requests[msg["id"]] = msg["method"]

    def agent_sent(self, msg: dict[str, Any]) -> None:
        assert msg.get("jsonrpc") == "2.0", msg
        method = msg.get("method")
        if method is not None:
            assert set(msg) <= _REQUEST_KEYS, f"unexpected members in {msg}"
            kind = "Request" if "id" in msg else "Notification"
            if kind == "Request":
                validate_def("RequestId", msg["id"])
            name = _BY_METHOD.get((method, kind))
            if name is None:
                assert method.startswith("_"), f"agent sent unknown {kind.lower()} {method}"
                return
            validate_def(name, msg.get("params", {}), strict=self.strict)
        elif "error" in msg:
            assert set(msg) <= _RESPONSE_KEYS and "result" not in msg, msg
            assert "id" in msg, f"an error answer must carry an id (null if unknown): {msg}"
            validate_def("RequestId", msg["id"])
            validate_def("Error", msg["error"], strict=self.strict)
            self.requests.pop(msg.get("id"), None)
        else:
            assert set(msg) <= _RESPONSE_KEYS and "result" in msg, msg
            request_method = self.requests.pop(msg["id"], None)
            assert request_method is not None, f"answer to unknown request id {msg['id']!r}"
            name = _BY_METHOD.get((request_method, "Response"))
            if name is not None:
                validate_def(name, msg["result"], strict=self.strict)
        self.checked += 1
