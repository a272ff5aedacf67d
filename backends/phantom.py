"""The phantom backend (``session``): a live relay whose history survives a dropped connection.

A ``session`` channel relays like ``stream``. What makes it a session is the node around it:
a resumable connection's channels wait for it after a drop and replay what it missed
(``mux.resume``), and ``fork`` starts a new channel that continues a channel's chain. Both
work for every live intent; ``session`` is the intent for channels that exist for that.
"""

from __future__ import annotations

from .stream import StreamBackend

__all__ = ["PhantomBackend"]


class PhantomBackend(StreamBackend):
    """Live relay for ``session`` channels (resume and fork are node features)."""

    name = "phantom"
