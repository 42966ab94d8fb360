"""The ASGI side: the router, the ``/acp`` WebSocket, health/echo/metrics, the dev app."""

from ._app import App
from ._asgi_ws import AsgiWebSocketStream

__all__ = ["App", "AsgiWebSocketStream"]
