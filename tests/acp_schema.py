"""Validate every ACP message the agent sends against the official v1 schema, per method.

The schema's ``$defs`` carry ``x-method`` and ``x-side``; a message is checked against the
definition for its method and role: ``<X>Request`` params for agent->client requests,
``<X>Notification`` params for notifications, ``<X>Response`` results for answers to the
client's requests (the checker remembers which method each request id was for).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import referencing.jsonschema

SCHEMA_PATH = Path(__file__).parent / "data" / "acp" / "schema.json"
_SCHEMA = json.loads(SCHEMA_PATH.read_text())
_RESOURCE = referencing.jsonschema.DRAFT202012.create_resource(_SCHEMA)
_REGISTRY = referencing.Registry().with_resource("urn:acp", _RESOURCE)

_BY_METHOD: dict[tuple[str, str], str] = {}
for _name, _def in _SCHEMA["$defs"].items():
    _method = _def.get("x-method")
    if _method is None:
        continue
    for _suffix in ("Request", "Response", "Notification"):
        if _name.endswith(_suffix):
            _BY_METHOD[(_method, _suffix)] = _name


def _validator(def_name: str) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(_SCHEMA)
    return cls({"$ref": f"urn:acp#/$defs/{def_name}"}, registry=_REGISTRY)


_VALIDATORS: dict[str, Any] = {}


def validate_def(def_name: str, instance: Any) -> None:
    validator = _VALIDATORS.get(def_name)
    if validator is None:
        validator = _VALIDATORS[def_name] = _validator(def_name)
    validator.validate(instance)


class SchemaChecker:
    """Feed it what the client sends (:meth:`client_sent`) and what the agent sends
    (:meth:`agent_sent`); every agent message is validated, and ``checked`` counts them."""

    def __init__(self) -> None:
        self.requests: dict[Any, str] = {}
        self.checked = 0

    def client_sent(self, msg: dict[str, Any]) -> None:
        if "method" in msg and "id" in msg:
            self.requests[msg["id"]] = msg["method"]

    def agent_sent(self, msg: dict[str, Any]) -> None:
        assert msg.get("jsonrpc") == "2.0", msg
        method = msg.get("method")
        if method is not None:
            kind = "Request" if "id" in msg else "Notification"
            name = _BY_METHOD.get((method, kind))
            if name is None:
                assert method.startswith("_"), f"agent sent unknown {kind.lower()} {method}"
                return
            validate_def(name, msg.get("params", {}))
        elif "error" in msg:
            error = msg["error"]
            assert isinstance(error.get("code"), int) and isinstance(error.get("message"), str)
            self.requests.pop(msg.get("id"), None)
        else:
            request_method = self.requests.pop(msg["id"], None)
            assert request_method is not None, f"answer to unknown request id {msg['id']!r}"
            name = _BY_METHOD.get((request_method, "Response"))
            if name is not None:
                validate_def(name, msg["result"])
        self.checked += 1
