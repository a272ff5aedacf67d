"""Session resume: a broken connection's channels wait for it, then it gets what it missed.

How this works: a connection that asked to be resumable (``?resumable=1``) gets a
``resume_token`` in its ``connected`` event. When it drops, instead of closing its channels
(``ws_disconnect``), :meth:`Resumes.linger` detaches their ends and reserves them for the
token for ``grace_s`` seconds; frames sent meanwhile still go into each channel's chain (the
ledger) and durable ones into the agent's mailbox. A new connection of the same agent sends
``{"action": "resume", "token": ..., "last": {channel_id: last_seq_seen}}``:
:meth:`Resumes.resume` re-attaches the ends to the new connection and says, per channel,
which frames to replay from the ledger (``after < seq <= head``) before live frames flow.
What is replayed depends on the intent's delivery (see ``REPLAY``). When the grace period
passes unresumed, the channels close with ``ws_disconnect`` as if there were no resume.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import attrs
import trio

from .channel import Channel
from .errors import MuxError

if TYPE_CHECKING:
    from .core import Mux
    from .endpoint import Endpoint

__all__ = ["REPLAY", "Lingering", "Resumed", "Resumes", "new_token"]

REPLAY = {
    "live": "ledger",
    "realtime": "signalling",
    "durable": "mailbox",
}
"""What a resumed channel replays, by intent delivery: ``ledger`` = every frame addressed to
the agent after its last seen seq; ``signalling`` = the same minus binary media frames
(stale media is worthless); ``mailbox`` = every unacknowledged frame (as on any reconnect)."""


def new_token() -> str:
    """An unguessable resume token (192 random bits)."""
    return secrets.token_urlsafe(24)


@attrs.define
class Lingering:
    """Channels of a dropped connection, reserved for its resume token until ``deadline``."""

    agent: str
    channel_ids: list[str]
    deadline: float


@attrs.frozen
class Resumed:
    """One re-attached channel: the new handle and the seq range to replay."""

    channel: Channel
    after_seq: int
    head_seq: int
    mode: str


@attrs.define(eq=False)
class Resumes:
    """The lingering channels of a node, by resume token."""

    mux: Mux
    _lingering: dict[str, Lingering] = attrs.field(factory=dict)

    def __len__(self) -> int:
        return len(self._lingering)

    def linger(self, endpoint: Endpoint, token: str, grace_s: float) -> None:
        """``endpoint`` dropped: keep its open channels for ``token`` for ``grace_s`` s."""
        ids = []
        for handle in list(endpoint._held.values()):
            state = handle._state
            end = handle._end
            end.detach()
            if state.is_open and not (state.durable and handle.local == state.target):
                end.reserved = token
                ids.append(state.id)
        endpoint._held.clear()
        endpoint._detach()
        # kept with no channels too: the client cannot know whether it held any when it
        # dropped (one opened to it may have been on the way), and its token is still good
        self._lingering[token] = Lingering(endpoint.agent, ids, trio.current_time() + grace_s)
        self.mux._nursery.start_soon(self._expire, token, grace_s, name=f"mux-linger-{endpoint.agent}")

    async def _expire(self, token: str, grace_s: float) -> None:
        await trio.sleep(grace_s)
        record = self._lingering.pop(token, None)
        if record is None:
            return
        for channel_id in record.channel_ids:
            state = self.mux._channels.get(channel_id)
            if state is not None and state.ends[record.agent].reserved == token:
                state.ends[record.agent].reserved = None
                self.mux._close_nowait(state, "ws_disconnect", by=record.agent)

    def resume(self, endpoint: Endpoint, token: str, last: dict[str, int]) -> tuple[list[Resumed], list[str]]:
        """Re-attach the token's channels to ``endpoint``; returns the resumed channels and
        the ids of those that closed meanwhile. Raises ``resume_failed`` for an unknown,
        expired or foreign token."""
        record = self._lingering.get(token)
        if record is None or record.agent != endpoint.agent:
            raise MuxError("unknown or expired resume token (or another agent's)", code="resume_failed")
        del self._lingering[token]
        resumed: list[Resumed] = []
        closed: list[str] = []
        for channel_id in record.channel_ids:
            state = self.mux._channels.get(channel_id)
            if state is None:
                closed.append(channel_id)
                continue
            end = state.ends[endpoint.agent]
            end.reserved = None
            end.attach(endpoint)
            end.wake()  # backends waiting to send to this end may go on
            handle = Channel(self.mux, state, end)
            endpoint._held[channel_id] = handle
            after = last.get(channel_id, 0)
            if not isinstance(after, int) or isinstance(after, bool) or after < 0:
                after = 0
            resumed.append(Resumed(handle, after, state.chain.next_seq - 1, REPLAY[state.intent.delivery]))
            if state.on_room is not None:
                state.on_room(state, end)
        return resumed, closed
