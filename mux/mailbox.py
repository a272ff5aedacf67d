"""Mailboxes: the durable frames waiting for an agent, per channel, until acknowledged.

How this works: a durable (store-and-forward) frame is put into its target's
:class:`Mailbox` and recorded in the store. While the target's end of the channel is
attached, frames move from the mailbox into the end's bounded inbox as room allows
(``ChannelMail.sent`` is how many already went in during this attachment). They leave the
mailbox only when the target acknowledges them (cumulatively, by seq). When the target
attaches again, every unacknowledged frame is delivered again, in order: at-least-once, and
exactly-once for a target that drops duplicates by ``(channel_id, seq)``.

Limits per agent (frames, bytes) and one for all mailboxes together (bytes) refuse new
frames with ``mailbox_full``; bytes are what the frames hold in memory, payload and
bookkeeping (:func:`mux.frames.held_bytes`). Frames older than the retention age are
expired (counted, logged), never silently.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import attrs

from .errors import ChannelError
from .frames import Frame, held_bytes

if TYPE_CHECKING:
    from .channel import ChannelState

__all__ = ["ChannelMail", "Mailbox", "MailboxFull", "check_room"]


class MailboxFull(ChannelError):
    """The target's mailbox is at its frame or byte limit; the frame was refused."""

    code = "mailbox_full"


@attrs.define(eq=False)
class ChannelMail:
    """Unacknowledged durable frames of one channel for one agent, oldest first."""

    state: ChannelState
    frames: collections.deque[Frame] = attrs.field(factory=collections.deque)
    sent: int = 0
    """How many frames from the left are already in the current inbox."""

    @property
    def undelivered(self) -> int:
        """Frames not yet handed to the current attachment."""
        return len(self.frames) - self.sent


@attrs.define(eq=False)
class Mailbox:
    """Everything waiting for one agent."""

    agent: str
    channels: dict[str, ChannelMail] = attrs.field(factory=dict)
    frames: int = 0
    bytes: int = 0
    expired: int = 0

    def put(self, state: ChannelState, frame: Frame) -> ChannelMail:
        """Add ``frame`` (of channel ``state``) at the end."""
        mail = self.channels.get(frame.channel_id)
        if mail is None:
            mail = self.channels[frame.channel_id] = ChannelMail(state)
        mail.frames.append(frame)
        self.frames += 1
        self.bytes += held_bytes(frame)
        return mail

    def ack(self, channel_id: str, upto_seq: int) -> int:
        """Remove the channel's frames with ``seq <= upto_seq``; returns how many."""
        mail = self.channels.get(channel_id)
        if mail is None:
            return 0
        removed = 0
        while mail.frames and mail.frames[0].seq <= upto_seq:
            frame = mail.frames.popleft()
            self.frames -= 1
            self.bytes -= held_bytes(frame)
            removed += 1
        mail.sent = max(0, mail.sent - removed)
        if not mail.frames:
            del self.channels[channel_id]
        return removed

    def expire(self, oldest_ts_ms: int) -> list[Frame]:
        """Remove and return frames chained before ``oldest_ts_ms`` (retention)."""
        gone: list[Frame] = []
        for channel_id in list(self.channels):
            mail = self.channels[channel_id]
            while mail.frames and mail.frames[0].ts < oldest_ts_ms:
                frame = mail.frames.popleft()
                mail.sent = max(0, mail.sent - 1)
                gone.append(frame)
                self.frames -= 1
                self.bytes -= held_bytes(frame)
            if not mail.frames:
                del self.channels[channel_id]
        self.expired += len(gone)
        return gone

    def rewind(self) -> None:
        """A new attachment: everything unacknowledged is to be delivered again."""
        for mail in self.channels.values():
            mail.sent = 0


def check_room(agent: str, box: Mailbox | None, held: int, max_frames: int, max_bytes: int, channel_id: str) -> None:
    """Raise MailboxFull if ``agent``'s mailbox (``box``; None when it has none) cannot take
    one more frame holding ``held`` bytes: a frame over the byte limit alone is refused too."""
    frames, kept = (0, 0) if box is None else (box.frames, box.bytes)
    if frames >= max_frames or kept + held > max_bytes:
        raise MailboxFull(
            f"{agent}'s mailbox is full ({frames} frames, {kept} bytes; limits {max_frames} frames, {max_bytes} bytes)",
            channel_id=channel_id,
        )
