"""punie-trio: serve AI coding agents to IDEs over ACP, on Trio.

The public surface is small: :mod:`punie_trio.cli` (the ``punie-trio`` command) and
:func:`punie_trio.server.serve`. Everything else lives in private modules below the
sub-packages named in ``docs/architecture.md``.
"""

from ._version import __version__

__all__ = ["__version__"]
