"""The hub: the manager of connections, sessions and project workers."""

from ._connection import AGENT_INFO, ClientConnection
from ._manager import Manager
from ._session import ActiveTurn, Limits, Session

__all__ = ["AGENT_INFO", "ActiveTurn", "ClientConnection", "Limits", "Manager", "Session"]
