"""The mail backend against a real SMTP server (aiosmtpd on 127.0.0.1) and a real node."""

from __future__ import annotations

import email
import email.policy
import functools
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio
from aiosmtpd.controller import Controller

import mux
from mux.client import ClientChannel, MuxClient, connect
from mux.core import MuxConfig
from mux.errors import BadRequest, MuxError
from mux.server import ServeInfo

from .nodes import serve_node

T = TypeVar("T")
SENDER = "node@mux.example"


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking call off the Trio thread (the node runs on it)."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args))


def free_port() -> int:
    """A loopback TCP port nobody listens on (for a server that is down, or started later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@attrs.define
class Inbox:
    """An aiosmtpd handler that keeps every message; refuses some recipients with 550 and
    answers the first ``tempfail`` RCPTs with 451."""

    refuse: set[str] = attrs.field(factory=set)
    tempfail: int = 0
    messages: list[Any] = attrs.field(factory=list)
    rcpts_seen: int = 0

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        self.rcpts_seen += 1
        if self.tempfail > 0:
            self.tempfail -= 1
            return "451 4.3.0 mailbox busy, try again later"
        if address in self.refuse:
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope)
        return "250 Message accepted for delivery"

    def parsed(self, i: int = -1) -> email.message.EmailMessage:
        """Message ``i`` parsed as the receiver sees it."""
        msg = email.message_from_bytes(self.messages[i].content, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg


@asynccontextmanager
async def smtp_server(handler: Inbox, port: int) -> AsyncIterator[Controller]:
    """A real SMTP server on 127.0.0.1:``port`` (aiosmtpd runs it in its own thread)."""
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    await in_thread(controller.start)
    try:
        yield controller
    finally:
        await in_thread(controller.stop)


async def mail_node(nursery: trio.Nursery, **options: Any) -> ServeInfo:
    """A real node whose mail backend has ``options``."""
    return await serve_node(nursery, mux=MuxConfig(backends={"mail": options}))


async def reports(ch: ClientChannel, until: str = "") -> list[dict[str, Any]]:
    """Report payloads from the node, up to and including the first whose status is final
    (or ``until``)."""
    out: list[dict[str, Any]] = []
    while True:
        frame = await ch.receive()
        assert frame["sender"] == "node"
        out.append(frame["payload"])
        if out[-1]["status"] in ("sent", "failed", "rejected", until):
            return out


async def outbox_frames(url: str) -> int:
    """Messages waiting in the node's outbox (its own mailbox), from GET /status."""
    with MuxClient(url, "watcher") as c:
        status = await in_thread(c.status)
    frames: int = status["mailboxes"]["frames"]
    return frames


# ---- delivery ---------------------------------------------------------------------------------


async def test_a_message_arrives_with_its_headers_and_the_sender_hears_sent(nursery: trio.Nursery) -> None:
    inbox = Inbox()
    port = free_port()
    with trio.fail_after(20):
        async with smtp_server(inbox, port):
            node = await mail_node(nursery, host="127.0.0.1", port=port, timeout_s=5, **{"from": SENDER})
            async with connect(node.url, "alice") as alice:
                ch = await alice.open("node", "mail")
                assert ch.route == {"backend": "mail", "description": "Email delivery"}
                ack = await ch.send({"to": "bob@example.org", "subject": "Hi ✓ there", "body": "Hello\nBob", "ref": 1})
                assert ack["stored"] is True  # durable: acknowledged once stored
                [sent] = await reports(ch)
                assert sent["status"] == "sent" and sent["attempts"] == 1
                assert (sent["seq"], sent["ref"]) == (ack["seq"], 1)

                [env] = inbox.messages
                assert env.mail_from == SENDER and env.rcpt_tos == ["bob@example.org"]
                msg = inbox.parsed()
                assert msg["From"] == SENDER and msg["To"] == "bob@example.org"
                assert msg["Subject"] == "Hi ✓ there" and msg["Message-ID"] == sent["message_id"]
                assert msg["X-Mux-Agent"] == "alice" and msg["X-Mux-Frame"] == ack["tbz_hash"]
                assert msg["Date"] and msg.get_content().replace("\r\n", "\n") == "Hello\nBob\n"

                # an explicit sender and several recipients, one refused: sent, and says who was refused
                inbox.refuse.add("ghost@example.org")
                await ch.send({"from": "alice@agents.example", "to": ["c@x.example", "ghost@example.org"],
                               "subject": "", "body": "b"})  # fmt: skip
                [partial] = await reports(ch)
                assert partial["status"] == "sent" and list(partial["refused"]) == ["ghost@example.org"]
                assert partial["refused"]["ghost@example.org"][0] == 550
                assert inbox.messages[-1].mail_from == "alice@agents.example"
                assert inbox.messages[-1].rcpt_tos == ["c@x.example"]

                info = next(c for c in await alice.list() if c["channel_id"] == ch.id)
                assert info["backend_state"] == {"queued": 2, "sent": 2, "failed": 0, "rejected": 0}
                assert await outbox_frames(node.url) == 0  # delivered mail left the outbox


async def test_bad_requests_are_rejected_and_nothing_is_sent(nursery: trio.Nursery) -> None:
    inbox = Inbox()
    port = free_port()
    with trio.fail_after(20):
        async with smtp_server(inbox, port):
            node = await mail_node(nursery, host="127.0.0.1", port=port, max_bytes=100, max_recipients=2)
            async with connect(node.url, "alice") as alice:
                ch = await alice.open("node", "mail")
                ok = {"to": "bob@example.org", "from": "a@example.org", "subject": "s", "body": "b"}
                bad: list[tuple[Any, str]] = [
                    ("just text", "bad_request"),
                    ({**ok, "to": "not an address"}, "bad_address"),
                    ({**ok, "to": "bob@example.org\r\nBcc: all@example.org"}, "bad_address"),
                    ({**ok, "to": []}, "bad_address"),
                    ({**ok, "to": ["a@b.example", "c@d.example", "e@f.example"]}, "too_many_recipients"),
                    ({**ok, "from": "Eve <eve@example.org>"}, "bad_address"),
                    ({k: v for k, v in ok.items() if k != "from"}, "bad_address"),  # no default sender configured
                    ({**ok, "subject": "two\nlines"}, "bad_request"),
                    ({**ok, "body": 42}, "bad_request"),
                    ({**ok, "body": "x" * 200}, "too_large"),
                    ({**ok, "cc": "x@y.example"}, "bad_request"),
                ]
                for request, code in bad:
                    await ch.send({**request, "ref": "r"} if isinstance(request, dict) else request)
                    [answer] = await reports(ch)
                    assert (answer["status"], answer["code"]) == ("rejected", code), request
                    assert answer["error"]
                assert ch.is_open and inbox.messages == []
                await ch.send(ok)  # the channel still works
                assert (await reports(ch))[-1]["status"] == "sent"


async def test_a_permanent_refusal_is_failed_at_once(nursery: trio.Nursery) -> None:
    inbox = Inbox(refuse={"nobody@example.org"})
    port = free_port()
    with trio.fail_after(20):
        async with smtp_server(inbox, port):
            node = await mail_node(nursery, host="127.0.0.1", port=port, backoff_s=0.05, **{"from": SENDER})
            async with connect(node.url, "alice") as alice:
                ch = await alice.open("node", "mail")
                await ch.send({"to": "nobody@example.org", "subject": "s", "body": "b"})
                [failed] = await reports(ch)
                assert (failed["status"], failed["reason"], failed["code"], failed["attempts"]) == (
                    "failed",
                    "permanent",
                    550,
                    1,
                )
                assert "no such user" in failed["error"]
                assert inbox.messages == [] and inbox.rcpts_seen == 1  # not retried
                assert await outbox_frames(node.url) == 0


async def test_a_server_down_at_first_is_retried_until_sent(nursery: trio.Nursery) -> None:
    inbox = Inbox()
    port = free_port()  # nothing listens there yet
    with trio.fail_after(20):
        node = await mail_node(
            nursery, host="127.0.0.1", port=port, backoff_s=0.1, max_backoff_s=0.3, max_attempts=50, timeout_s=5
        )
        async with connect(node.url, "alice") as alice:
            ch = await alice.open("node", "mail")
            await ch.send({"to": "bob@example.org", "from": SENDER, "subject": "later", "body": "b", "ref": 9})
            [retrying] = await reports(ch, until="retrying")
            assert (retrying["status"], retrying["attempts"], retrying["code"], retrying["ref"]) == (
                "retrying",
                1,
                None,
                9,
            )
            assert "Connection" in retrying["error"] and retrying["next_in_s"] == pytest.approx(0.1)
            assert await outbox_frames(node.url) == 1  # kept until delivered
            async with smtp_server(inbox, port):
                got = await reports(ch)
                assert [r["status"] for r in got[:-1]] == ["retrying"] * (len(got) - 1)
                sent = got[-1]
                assert sent["status"] == "sent" and sent["attempts"] >= 2 and sent["ref"] == 9
                assert [m.rcpt_tos for m in inbox.messages] == [["bob@example.org"]]
            assert await outbox_frames(node.url) == 0


async def test_temporary_4xx_is_retried_with_backoff(nursery: trio.Nursery) -> None:
    inbox = Inbox(tempfail=2)
    port = free_port()
    with trio.fail_after(20):
        async with smtp_server(inbox, port):
            node = await mail_node(nursery, host="127.0.0.1", port=port, backoff_s=0.05, **{"from": SENDER})
            async with connect(node.url, "alice") as alice:
                ch = await alice.open("node", "mail")
                await ch.send({"to": "bob@example.org", "subject": "s", "body": "b"})
                got = await reports(ch)
                assert [(r["status"], r["attempts"]) for r in got] == [("retrying", 1), ("retrying", 2), ("sent", 3)]
                assert [r["code"] for r in got[:2]] == [451, 451] and "busy" in got[0]["error"]
                assert [r["next_in_s"] for r in got[:2]] == [0.05, 0.1]  # exponential
                assert len(inbox.messages) == 1


async def test_max_attempts_exceeded_gives_up(nursery: trio.Nursery) -> None:
    port = free_port()  # never started
    with trio.fail_after(20):
        node = await mail_node(nursery, host="127.0.0.1", port=port, backoff_s=0.02, max_attempts=3)
        async with connect(node.url, "alice") as alice:
            ch = await alice.open("node", "mail")
            await ch.send({"to": "bob@example.org", "from": SENDER, "subject": "s", "body": "b"})
            got = await reports(ch)
            assert [r["status"] for r in got] == ["retrying", "retrying", "failed"]
            final = got[-1]
            assert (final["reason"], final["attempts"], final["code"]) == ("gave_up", 3, None)
            assert "Connection" in final["error"]
            assert await outbox_frames(node.url) == 0  # the outcome is final and was reported
            info = next(c for c in await alice.list() if c["channel_id"] == ch.id)
            assert info["backend_state"]["failed"] == 1


async def test_channels_are_refused_without_smtp_or_to_another_agent(server: ServeInfo, nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        async with connect(server.url, "alice") as alice:  # the default node: no SMTP configured
            with pytest.raises(MuxError) as info:
                await alice.open("node", "mail")
            assert info.value.code == "mail_not_configured"
        bad = await mail_node(nursery, host="127.0.0.1", port="25")
        async with connect(bad.url, "alice") as alice:
            with pytest.raises(MuxError) as info:
                await alice.open("node", "mail")
            assert info.value.code == "mail_misconfigured"
        node = await mail_node(nursery, host="127.0.0.1", port=free_port())
        async with connect(node.url, "alice") as alice:
            with pytest.raises(BadRequest) as bad_target:
                await alice.open("bob", "mail")
            assert bad_target.value.code == "bad_target"


async def test_accepted_mail_survives_a_node_restart(tmp_path: Path) -> None:
    port = free_port()
    down = {"mail": {"host": "127.0.0.1", "port": port, "from": SENDER, "backoff_s": 60.0}}
    with trio.fail_after(20):
        async with mux.open_mux(agent="node", data_dir=tmp_path, config=MuxConfig(backends=down)) as m1:
            ch = await m1.open("node", "mail", agent="alice")
            frame = await ch.send({"to": "bob@example.org", "subject": "kept", "body": "across restarts"})
            assert (await ch.receive()).payload["status"] == "retrying"  # first attempt failed; next in 60 s
            assert m1.status()["mailboxes"]["frames"] == 1
        # the node stopped with the message still in its outbox; it starts again with SMTP up
        inbox = Inbox()
        up = {"mail": {**down["mail"], "backoff_s": 0.05}}
        async with smtp_server(inbox, port):
            async with mux.open_mux(agent="node", data_dir=tmp_path, config=MuxConfig(backends=up)) as m2:
                # set by the SMTP server's thread and the node's recovery task; bounded by fail_after
                while not inbox.messages or m2.status()["mailboxes"]["frames"]:  # noqa: ASYNC110
                    await trio.sleep(0.02)
                msg = inbox.parsed()
                assert msg["Subject"] == "kept" and msg["X-Mux-Frame"] == frame.tbz_hash
                assert m2.channel_state(ch.id).close_reason == "mux_shutdown"
        async with mux.open_mux(agent="node", data_dir=tmp_path, config=MuxConfig(backends=up)) as m3:
            assert m3.status()["mailboxes"]["frames"] == 0  # delivered once, never again
            await trio.sleep(0.1)
        assert len(inbox.messages) == 1
