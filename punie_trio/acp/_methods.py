"""ACP v1 method names and the protocol version this agent speaks."""

from __future__ import annotations

PROTOCOL_VERSION = 1

INITIALIZE = "initialize"
AUTHENTICATE = "authenticate"
SESSION_NEW = "session/new"
SESSION_LOAD = "session/load"
SESSION_LIST = "session/list"
SESSION_RESUME = "session/resume"
SESSION_CLOSE = "session/close"
SESSION_DELETE = "session/delete"
SESSION_PROMPT = "session/prompt"
SESSION_CANCEL = "session/cancel"
SESSION_SET_MODE = "session/set_mode"
SESSION_SET_CONFIG_OPTION = "session/set_config_option"
LOGOUT = "logout"

#: Every method of the agent side of v1 (the schema's ``x-side: agent``, meta.json's
#: ``agentMethods``), served or not: called before ``initialize``, such a method is
#: -32600 "call initialize first", where a name ACP does not define is -32601.
AGENT_METHODS = frozenset(
    {
        INITIALIZE,
        AUTHENTICATE,
        SESSION_NEW,
        SESSION_LOAD,
        SESSION_LIST,
        SESSION_RESUME,
        SESSION_CLOSE,
        SESSION_DELETE,
        SESSION_PROMPT,
        SESSION_CANCEL,
        SESSION_SET_MODE,
        SESSION_SET_CONFIG_OPTION,
        LOGOUT,
    }
)

# Client-side methods (the agent calls them).
SESSION_UPDATE = "session/update"
REQUEST_PERMISSION = "session/request_permission"
FS_READ_TEXT_FILE = "fs/read_text_file"
FS_WRITE_TEXT_FILE = "fs/write_text_file"

CLIENT_METHODS = frozenset(
    {
        SESSION_UPDATE,
        REQUEST_PERMISSION,
        FS_READ_TEXT_FILE,
        FS_WRITE_TEXT_FILE,
        "terminal/create",
        "terminal/output",
        "terminal/release",
        "terminal/wait_for_exit",
        "terminal/kill",
        "elicitation/create",
        "elicitation/complete",
    }
)

STOP_REASONS = frozenset({"end_turn", "max_tokens", "max_turn_requests", "refusal", "cancelled"})
