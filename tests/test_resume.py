"""Resume (phantom): a connection cut mid-stream gets exactly what it missed; fork."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
import trio

import mux
from mux.client import open_ws
from mux.core import MuxConfig, start_mux
from mux.session import WireSession
from mux.signing import NodeKey
from mux.storage import MemoryStore

from .nodes import outbox_events, send_numbered, serve_node, started_sessions
from .wsutil import open_cuttable_ws, recv, recv_until, send, ws_url


@pytest.fixture
async def node_url(nursery: trio.Nursery) -> str:
    return (await serve_node(nursery, resume_grace_s=1.0)).url


def resumable(url: str, agent: str) -> str:
    return ws_url(url, agent) + "&resumable=1"


async def _frames(ws: Any, count: int) -> list[dict[str, Any]]:
    out = []
    with trio.fail_after(5):
        while len(out) < count:
            msg = await recv(ws)
            if msg.get("event") == "frame":
                out.append(msg)
    return out


async def test_cut_connection_resumes_with_exactly_what_it_missed(node_url: str) -> None:
    async with open_ws(ws_url(node_url, "alice")) as a:
        await recv(a)
        async with open_cuttable_ws(resumable(node_url, "bob")) as (b, stream):
            hello = await recv(b)
            token = hello["resume_token"]
            assert hello["resume_grace_s"] == 1.0 and len(token) >= 32
            chans = {}
            for intent in ("stream", "call:voice", "chat"):
                await send(a, action="open", target="bob", intent=intent)
                chans[intent] = (await recv(a))["channel_id"]
                await recv(b)
            for i in range(3):
                await send(a, action="send", channel_id=chans["stream"], payload={"i": i})
            seen = await _frames(b, 3)
            last_seen = seen[-1]["seq"]
            await trio.aclose_forcefully(stream)  # the TCP connection is cut mid-stream
        async with httpx.AsyncClient() as http:
            with trio.fail_after(5):
                while "bob" in (await http.get(node_url + "/api/mux/status")).json()["agents_attached"]:  # noqa: ASYNC110
                    await trio.sleep(0.01)  # until the node has noticed
        # while bob is away: more frames on every channel
        for i in range(3, 10):
            await send(a, action="send", channel_id=chans["stream"], payload={"i": i})
        await send(a, action="send", channel_id=chans["call:voice"], payload={"type": "offer", "sdp": "v=0"})
        await a.send_message(mux.wire.pack_binary({"action": "send", "channel_id": chans["call:voice"]}, b"\x00" * 40))
        await send(a, action="send", channel_id=chans["chat"], payload={"text": "while you were away"})
        acks = [await recv(a) for _ in range(3 + 10)]  # the 3 sends before the cut, then these
        assert all(ack.get("event") == "frame_ack" for ack in acks), acks
        assert all(ack["disposition"] == "delivered" for ack in acks[:3])
        acks = acks[3:]
        # held for bob's resume (replayed if he does), except the call's media (never replayed)
        # and the chat frame, stored in his mailbox
        assert [(ack["disposition"], ack["delivered"]) for ack in acks] == [("held", False)] * 8 + [
            ("dropped", False),
            ("stored", False),
        ]
        async with httpx.AsyncClient() as http:
            status = (await http.get(node_url + "/api/mux/status")).json()
        assert status["dropped"] == 1, "frames held for a resume are not counted as drops"

        async with open_ws(resumable(node_url, "bob")) as b2:
            hello2 = await recv(b2)
            assert hello2["resume_token"] != token
            # before resuming, nothing of the lingering channels is announced again...
            # ...except the durable chat channel, which redelivers through the mailbox
            await send(b2, action="resume", token=token, last={chans["stream"]: last_seen}, ref="r")
            got: dict[str, list[Any]] = {cid: [] for cid in chans.values()}
            with trio.fail_after(5):
                while True:  # the chat channel's mailbox may deliver before the resume answer
                    msg = await recv(b2)
                    if msg.get("event") == "frame":
                        got[msg["channel_id"]].append(msg["payload"])
                    if msg.get("event") == "resumed":
                        resumed = msg
                        break
            modes = {c["channel_id"]: c["replay"] for c in resumed["channels"]}
            assert modes == {chans["stream"]: "ledger", chans["call:voice"]: "signalling"}
            assert resumed["closed"] == []
            assert got[chans["stream"]] == got[chans["call:voice"]] == []  # nothing replayed before resume
            await send(a, action="send", channel_id=chans["stream"], payload={"i": 10})  # live again
            with trio.fail_after(5):
                while len(got[chans["stream"]]) < 8 or not got[chans["call:voice"]] or not got[chans["chat"]]:
                    msg = await recv(b2)
                    if msg.get("event") == "frame":
                        got[msg["channel_id"]].append(msg["payload"])
            assert [p["i"] for p in got[chans["stream"]]] == list(range(3, 11))  # exactly the missed, then live
            assert got[chans["call:voice"]] == [{"type": "offer", "sdp": "v=0"}]  # no stale media replayed
            assert got[chans["chat"]] == [{"text": "while you were away"}]
            # the resumed channels work both ways
            await send(b2, action="send", channel_id=chans["stream"], payload="back")
            assert (await recv_until(a, lambda m: m.get("event") == "frame"))["payload"] == "back"


async def test_unresumed_channels_close_after_grace(node_url: str) -> None:
    async with open_ws(ws_url(node_url, "alice")) as a:
        await recv(a)
        async with open_ws(resumable(node_url, "bob")) as b:
            token = (await recv(b))["resume_token"]
            await send(a, action="open", target="bob", intent="stream")
            cid = (await recv(a))["channel_id"]
            await recv(b)
        with trio.move_on_after(0.5):
            msg = await recv(a)
            raise AssertionError(f"closed before the grace period: {msg}")
        closed = await recv_until(a, lambda m: m.get("event") == "channel_closed", timeout=3)
        assert (closed["channel_id"], closed["reason"]) == (cid, "ws_disconnect")
        async with open_ws(resumable(node_url, "bob")) as b:
            await recv(b)
            await send(b, action="resume", token=token, ref=1)
            err = await recv(b)
            assert (err["error"], err["ref"]) == ("resume_failed", 1)


async def test_a_connection_that_held_no_channel_resumes_with_none(node_url: str) -> None:
    """Its token is as good as any within the grace period (the client cannot know whether
    a channel was opened to it just before it dropped); used once, or after the grace
    period, it is refused."""
    async with open_ws(resumable(node_url, "bob")) as b:
        token = (await recv(b))["resume_token"]
    async with open_ws(resumable(node_url, "bob")) as b:
        await recv(b)
        await send(b, action="resume", token=token, ref=1)
        assert await recv(b) == {"event": "resumed", "ref": 1, "channels": [], "closed": []}
        await send(b, action="resume", token=token, ref=2)
        assert (await recv(b))["error"] == "resume_failed"
    async with open_ws(resumable(node_url, "bob")) as b:
        token = (await recv(b))["resume_token"]
    await trio.sleep(1.2)  # the grace period (1 s) passes
    async with open_ws(resumable(node_url, "bob")) as b:
        await recv(b)
        await send(b, action="resume", token=token, ref=3)
        assert (await recv(b))["error"] == "resume_failed"


async def test_token_of_another_agent_is_refused(node_url: str) -> None:
    async with open_ws(resumable(node_url, "bob")) as b:
        token = (await recv(b))["resume_token"]
        async with open_ws(ws_url(node_url, "alice")) as a:
            await recv(a)
            await send(a, action="open", target="bob", intent="stream")
            await recv(a)
    async with open_ws(ws_url(node_url, "mallory")) as m:
        await recv(m)
        await send(m, action="resume", token=token)
        assert (await recv(m))["error"] == "resume_failed"


async def test_fork_continues_the_parent_chain(node_url: str) -> None:
    async with open_ws(ws_url(node_url, "alice")) as a, open_ws(ws_url(node_url, "bob")) as b:
        await recv(a)
        await recv(b)
        await send(a, action="open", target="bob", intent="session")
        parent = (await recv(a))["channel_id"]
        await recv(b)
        for i in range(3):
            await send(a, action="send", channel_id=parent, payload={"i": i})
            await recv(a)
        await send(a, action="fork", channel_id=parent, ref="f")
        forked = await recv_until(a, lambda m: m.get("event") == "channel_opened")
        assert forked["ref"] == "f" and forked["intent"] == "session" and forked["target"] == "bob"
        child = forked["channel_id"]
        await send(a, action="send", channel_id=child, payload={"branch": True})
        await recv(a)
        await send(b, action="fork", channel_id="ch-" + "0" * 32)
        assert (await recv_until(b, lambda m: "error" in m))["error"] == "unknown_channel"
    async with httpx.AsyncClient() as c:
        key = (await c.get(node_url + "/api/mux/keys")).json()["keys"][0]["public_key"]
        chains = {}
        for cid in (parent, child):
            r = await c.get(node_url + f"/api/mux/channel/{cid}/chain", params={"agent": "alice"})
            chains[cid] = [orjson.loads(line) for line in r.content.splitlines()]
    report = mux.verify_chain(chains[child], key)
    assert report.fork_of == parent
    assert chains[child][0]["prev"] == chains[parent][3]["tbz_hash"]  # continues the parent's head
    assert chains[child][0]["payload"]["fork_of"] == {
        "channel_id": parent,
        "seq": 3,
        "head": chains[parent][3]["tbz_hash"],
    }
    tampered = [dict(chains[child][0], prev="f" * 64), *chains[child][1:]]
    with pytest.raises(mux.VerificationError):
        mux.verify_chain(tampered, key)


@pytest.mark.parametrize("kept", [4, None], ids=["ledger-bounded", "ledger-whole"])
async def test_a_replay_the_ledger_cannot_give_whole_says_what_is_missing(
    nursery: trio.Nursery, kept: int | None
) -> None:
    """The in-memory ledger keeps the newest frames of a chain: a resume asking for older
    ones gets ``replay_incomplete`` naming the frames no longer held, then what is held; with
    the whole chain held, every missed frame and no such error."""
    store = MemoryStore(max_frames_per_channel=kept) if kept else MemoryStore()
    node = await start_mux(nursery, agent="node", key=NodeKey.generate(), config=MuxConfig(), store=store)
    (alice,) = started_sessions(node, nursery, "alice")
    bob = WireSession(node, node.attach("bob"), max_message_bytes=1 << 20, resume_grace_s=5.0)
    bob.start(nursery)
    (opened,) = outbox_events(alice.handle(orjson.dumps({"action": "open", "target": "bob"}).decode()))
    cid = opened["channel_id"]
    for n in (1, 2):
        assert send_numbered(alice, cid, n, binary=False)["disposition"] == "delivered"
    seen = [e for e in outbox_events(list(iter(bob.outbox.get_nowait, None))) if e.get("event") == "frame"]
    assert [e["payload"]["n"] for e in seen] == [1, 2]
    token = bob.resume_token
    bob.close("ws_disconnect")  # the connection drops: its channels wait for the token
    for n in range(3, 13):  # seqs 3 to 12, sent while bob is away
        send_numbered(alice, cid, n, binary=False)
    bob2 = WireSession(node, node.attach("bob"), max_message_bytes=1 << 20, resume_grace_s=5.0)
    bob2.start(nursery)
    resume = {"action": "resume", "token": token, "last": {cid: seen[-1]["seq"]}}
    (resumed,) = outbox_events(bob2.handle(orjson.dumps(resume).decode()))
    assert resumed["channels"] == [{"channel_id": cid, "replay": "ledger", "after_seq": 2, "head_seq": 12}]
    events: list[dict[str, Any]] = []
    with trio.fail_after(5):
        while len([e for e in events if e.get("event") == "frame"]) < (kept or 10):
            await trio.sleep(0.01)
            events += outbox_events(list(iter(bob2.outbox.get_nowait, None)))
    gaps = [e for e in events if e.get("error") == "replay_incomplete"]
    frames = [e["payload"]["n"] for e in events if e.get("event") == "frame"]
    if kept:
        (gap,) = gaps
        assert gap["channel_id"] == cid and "frames 3 to 8 " in gap["detail"]
        assert events.index(gap) == 0 and frames == [9, 10, 11, 12]  # told first, then what is held
    else:
        assert gaps == [] and frames == list(range(3, 13))
