"""The hub: the manager of connections, sessions and project workers."""

from ._connection import AGENT_INFO, ClientConnection
from ._manager import Manager
from ._probation import MAX_ON_PROBATION, PROBATION_INITIALIZE_WITHIN
from ._session import ActiveTurn, Limits, Session

__all__ = [
    "AGENT_INFO",
    "MAX_ON_PROBATION",
    "PROBATION_INITIALIZE_WITHIN",
    "ActiveTurn",
    "ClientConnection",
    "Limits",
    "Manager",
    "Session",
]
