"""Project workers: the agent loop, model backends and tools for one project root."""

from ._envelopes import (
    CancelTurn,
    ClientCall,
    ClientReply,
    Command,
    ForgetSession,
    ForgetTurn,
    SeedHistory,
    StartTurn,
    TurnEnv,
    TurnEvent,
    TurnFinished,
    Update,
)
from ._events import EventReceiver, EventSender, EventSink, open_event_channel
from ._models import (
    EchoModel,
    Model,
    ScriptError,
    ScriptModel,
    TurnContext,
    echo_chunks,
    load_script,
    model_from_spec,
)
from ._paths import CONFIG_FILE, DATA_DIRECTORY, PathEscape, resolve_inside
from ._worker import ProjectWorker, ToolCallLimiter, seconds_up

__all__ = [
    "CONFIG_FILE",
    "DATA_DIRECTORY",
    "CancelTurn",
    "ClientCall",
    "ClientReply",
    "Command",
    "EchoModel",
    "EventReceiver",
    "EventSender",
    "EventSink",
    "ForgetSession",
    "ForgetTurn",
    "Model",
    "PathEscape",
    "ProjectWorker",
    "ScriptError",
    "ScriptModel",
    "SeedHistory",
    "StartTurn",
    "ToolCallLimiter",
    "TurnContext",
    "TurnEnv",
    "TurnEvent",
    "TurnFinished",
    "Update",
    "echo_chunks",
    "load_script",
    "model_from_spec",
    "open_event_channel",
    "resolve_inside",
    "seconds_up",
]
