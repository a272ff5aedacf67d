"""Nothing lost: mailboxes, acks, redelivery, restart and SIGKILL, export, limits, soak."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

import mux
from mux.client import open_ws
from mux.frames import held_bytes
from mux.server import ServeInfo

from .procs import node_process
from .wsutil import recv, send, ws_url


async def test_offline_target_gets_frames_in_order_then_acks(node: mux.Mux) -> None:
    ch = await node.open("bob", "chat", agent="alice")
    for i in range(10):
        await ch.send({"n": i})
    await ch.close("sent")
    boxes = node.status()["mailboxes"]
    assert (boxes["agents"], boxes["frames"]) == (1, 10)
    assert boxes["bytes"] == sum(held_bytes(f) for f in (await node.export(ch.id))[1:11])

    async with node.attach("bob") as bob:
        got = await bob.accept()
        assert got.id == ch.id and got.state == "closed"
        frames = [f async for f in got]  # ends after the last stored frame: the channel is closed
        assert [f.payload["n"] for f in frames] == list(range(10))
        await got.ack(frames[4].seq)
    assert node.status()["mailboxes"]["frames"] == 5

    async with node.attach("bob") as bob:  # unacknowledged frames come again
        again = [f async for f in await bob.accept()]
        assert [f.payload["n"] for f in again] == list(range(5, 10))
        await (await node.open("x", "chat", agent="bob")).close()
        assert node.ack("bob", ch.id, again[-1].seq) == 5
    assert node.status()["mailboxes"] == {"agents": 0, "frames": 0, "bytes": 0}
    async with node.attach("bob") as bob:
        assert bob.accept_nowait() is None


async def test_live_target_is_delivered_at_once(node: mux.Mux) -> None:
    async with node.attach("bob") as bob:
        ch = await node.open("bob", "push", agent="alice")
        receipt = await ch.post({"p": 1})
        assert receipt.stored and receipt.delivered
        peer = await bob.accept()
        assert (await peer.receive()).payload == {"p": 1}


async def test_mailbox_full_refuses_with_a_clear_error() -> None:
    async with mux.open_mux(agent="n", mailbox_max_frames=3) as m:
        ch = await m.open("bob", "chat", agent="alice")
        for i in range(3):
            await ch.send(i)
        try:
            await ch.send(3)
        except mux.ChannelError as exc:
            assert exc.code == "mailbox_full" and "3 frames" in exc.detail
        else:
            raise AssertionError("the fourth frame must be refused")
        assert ch.state == "open"
        assert [f.seq for f in await m.export(ch.id)] == [0, 1, 2, 3]  # the refused frame was never chained
        m.ack("bob", ch.id, 2)  # bob's ack frees room
        await ch.send(4)


async def test_all_mailboxes_together_stay_within_their_memory_bound() -> None:
    """``mailboxes_max_bytes`` bounds every agent's mailbox together (each under its own
    limit), counted as the frames hold memory: small frames to many offline agents are
    refused ``mailbox_full`` once the node holds that much, acks and expiry give it back."""
    bound = 64 << 10
    async with mux.open_mux(agent="n", mailboxes_max_bytes=bound, max_channels_per_agent=64) as m:
        channels = [await m.open(f"offline-{i}", "chat", agent="alice") for i in range(40)]
        sent = 0
        with pytest.raises(mux.ChannelError) as refused:
            for n in range(1000):
                await channels[n % len(channels)].send({"n": n})
                sent += 1
        assert refused.value.code == "mailbox_full" and "node's mailboxes" in refused.value.detail
        boxes = m.status()["mailboxes"]
        assert boxes["frames"] == sent and boxes["agents"] == len(channels)
        assert bound - 1024 < boxes["bytes"] <= bound
        assert 64 < sent < 120, "each small frame counts what it holds, not its few payload bytes"
        assert m.ack("offline-0", channels[0].id, 10**6) > 0  # one agent's ack makes room for any
        await channels[1].send({"n": "again"})
        for i, ch in enumerate(channels):
            m.ack(f"offline-{i}", ch.id, 10**6)
        assert m.status()["mailboxes"] == {"agents": 0, "frames": 0, "bytes": 0}


AGE_S = 0.4
"""A mailbox retention age short enough for a test (looked for every tenth of a second)."""


async def test_mailbox_frames_past_the_retention_age_expire_counted(tmp_path: Path) -> None:
    """An offline agent's unacknowledged frames older than ``mailbox_max_age_s`` leave its
    mailbox (counted in ``expired``, and gone from the store: a restart does not bring them
    back) on the next durable put; newer frames stay and are delivered."""
    async with mux.open_mux(agent="n", data_dir=tmp_path, mailbox_max_age_s=AGE_S) as m:
        old = await m.open("bob", "chat", agent="alice")
        for i in range(3):
            await old.send({"old": i})
        await trio.sleep(AGE_S * 1.5)
        new = await m.open("bob", "task", agent="carol")
        await new.send({"new": 0})  # this put looks for expired frames
        status = m.status()
        kept = held_bytes((await m.export(new.id))[1])  # the expired frames hold nothing any more
        assert status["expired"] == 3 and status["mailboxes"] == {"agents": 1, "frames": 1, "bytes": kept}
        await old.send({"old": 3})  # the channel stays usable
        assert m.status()["mailboxes"]["frames"] == 2
        held = m.status()["mailboxes"]["bytes"]
        async with m.attach("bob") as bob:  # delivered live, not acknowledged
            live = {}
            for _ in range(2):
                ch = await bob.accept()
                live[ch.id] = [(await ch.receive()).payload]
            assert live == {old.id: [{"old": 3}], new.id: [{"new": 0}]}
    async with mux.open_mux(agent="n", data_dir=tmp_path, mailbox_max_age_s=3600) as m2, m2.attach("bob") as bob:
        assert m2.status()["mailboxes"]["bytes"] == held, "a restart counts the mail it restores"
        got = {}
        for _ in range(2):
            ch = await bob.accept()
            got[ch.id] = [f.payload async for f in ch]  # closed by the restart: ends after its mail
        assert got == {old.id: [{"old": 3}], new.id: [{"new": 0}]}


async def test_an_agent_attaching_after_the_retention_age_gets_nothing_expired() -> None:
    """Frames that passed the retention age while nothing else was put are expired when
    their agent attaches, before anything is delivered; the channel itself is announced
    (still open) and goes on."""
    async with mux.open_mux(agent="n", mailbox_max_age_s=AGE_S) as m:
        ch = await m.open("bob", "chat", agent="alice")
        for i in range(4):
            await ch.send(i)
        await trio.sleep(AGE_S * 1.5)
        async with m.attach("bob") as bob:
            assert m.status()["expired"] == 4 and m.status()["mailboxes"]["frames"] == 0
            peer = await bob.accept()
            assert peer.id == ch.id and peer.receive_nowait() is None
            await ch.send(4)
            frame = await peer.receive()
            assert frame.payload == 4
            await peer.ack(frame.seq)
        assert m.status()["mailboxes"] == {"agents": 0, "frames": 0, "bytes": 0}


async def test_restart_on_the_same_data_dir_delivers_and_forgets_acked(tmp_path: Path) -> None:
    async with mux.open_mux(agent="n", data_dir=tmp_path) as m1:
        key = m1.public_key
        ch = await m1.open("bob", "task", agent="alice")
        for i in range(5):
            await ch.send({"i": i})
        cid = ch.id
    async with mux.open_mux(agent="n", data_dir=tmp_path) as m2:
        assert m2.public_key == key
        async with m2.attach("bob") as bob:
            got = await bob.accept()
            frames = [f async for f in got]
            assert [f.payload["i"] for f in frames] == list(range(5))
            assert got.close_reason == "mux_shutdown"
            await got.ack(frames[2].seq)
        assert mux.verify_chain(await m2.export(cid), key).closed
    async with mux.open_mux(agent="n", data_dir=tmp_path) as m3, m3.attach("bob") as bob:
        frames = [f async for f in await bob.accept()]
        assert [f.payload["i"] for f in frames] == [3, 4]


async def test_sigkill_with_unacked_frames_then_restart(tmp_path: Path) -> None:
    n = 30
    async with node_process(tmp_path) as node:
        key = node.public_key
        async with open_ws(ws_url(node.url, "alice")) as a:
            await recv(a)
            await send(a, action="open", target="bob", intent="chat")
            cid = (await recv(a))["channel_id"]
            for i in range(n):
                await send(a, action="send", channel_id=cid, payload={"i": i}, ref=i)
            acks = [await recv(a) for _ in range(n)]
            assert all(ack["event"] == "frame_ack" and ack["stored"] and not ack["delivered"] for ack in acks)
            # SIGKILL with every frame stored and none acknowledged, while alice is still
            # connected: her leaving would close the channel (ws_disconnect) before the kill
            node.kill()
            with trio.fail_after(10):
                await node.process.wait()
    async with node_process(tmp_path) as node:
        assert node.public_key == key
        async with open_ws(ws_url(node.url, "bob")) as b:
            await recv(b)
            opened = await recv(b)
            assert opened["event"] == "channel_opened" and opened["channel_id"] == cid
            frames = [await recv(b) for _ in range(n)]
            assert [f["payload"]["i"] for f in frames] == list(range(n))
            closed = await recv(b)
            assert closed["event"] == "channel_closed" and closed["reason"] == "node_restart"
            # acknowledge the first 20 only
            await send(b, action="ack", channel_id=cid, seq=frames[19]["seq"], ref="k")
            assert (await recv(b))["removed"] == 20
        async with open_ws(ws_url(node.url, "bob")) as b:
            await recv(b)
            await recv(b)  # channel_opened again: 10 frames still unacknowledged
            rest = [await recv(b) for _ in range(10)]
            assert [f["payload"]["i"] for f in rest] == list(range(20, 30))
            await recv(b)  # channel_closed
            await send(b, action="ack", channel_id=cid, seq=rest[-1]["seq"])
            assert (await recv(b))["removed"] == 10
        async with httpx.AsyncClient() as c:
            chain = (await c.get(node.url + f"/api/mux/channel/{cid}/chain", params={"agent": "bob"})).content
        frames_out = [orjson.loads(line) for line in chain.splitlines()]
        report = mux.verify_chain(frames_out, key)
        assert report.frames == n + 2 and report.closed
        node.terminate()
    async with node_process(tmp_path) as node, open_ws(ws_url(node.url, "bob")) as b:
        await recv(b)
        await send(b, action="list", ref=1)
        listed = await recv(b)  # nothing was announced before the list answer: nothing redelivered
        assert listed["event"] == "channel_list" and listed["channels"] == []

    # edit a payload inside the database: the exported chain no longer verifies, precisely
    db = sqlite3.connect(tmp_path / "mux.sqlite3")
    row = db.execute("SELECT frame FROM frames WHERE channel_id = ? AND seq = 5", (cid,)).fetchone()
    edited = orjson.loads(row[0])
    edited["payload"]["i"] = 999
    db.execute("UPDATE frames SET frame = ? WHERE channel_id = ? AND seq = 5", (orjson.dumps(edited), cid))
    db.commit()
    db.close()
    async with node_process(tmp_path) as node, httpx.AsyncClient() as c:
        # the channel is long closed and forgotten in memory: the chain comes from the store
        r = await c.get(node.url + f"/api/mux/channel/{cid}/chain", params={"agent": "alice"})
        assert r.status_code == 200
        foreign = await c.get(node.url + f"/api/mux/channel/{cid}/chain", params={"agent": "mallory"})
        assert foreign.status_code == 403
    frames_db = [orjson.loads(line) for line in r.content.splitlines()]
    assert len(frames_db) == n + 2
    try:
        mux.verify_chain(frames_db, key)
    except mux.VerificationError as exc:
        assert (exc.reason, exc.seq) == ("bad_hash", 5)
    else:
        raise AssertionError("an edited frame must fail verification")


async def test_soak_random_reconnects_deliver_everything(server: ServeInfo) -> None:
    """N senders x M messages to an agent that connects and disconnects at random."""
    n_senders, m_messages = 4, 40
    rng = random.Random(20261126)
    received: list[tuple[str, int, Any]] = []
    sent_done = trio.Event()

    async def sender(k: int) -> None:
        async with open_ws(ws_url(server.url, f"s{k}")) as ws:
            await recv(ws)
            await send(ws, action="open", target="sink", intent="chat")
            cid = (await recv(ws))["channel_id"]
            for i in range(m_messages):
                await send(ws, action="send", channel_id=cid, payload={"k": k, "i": i})
                ack = await recv(ws)
                assert ack["event"] == "frame_ack" and ack["stored"], ack
                if rng.random() < 0.2:
                    await trio.sleep(rng.random() * 0.01)
            # keep the channel open until the sink has everything
            await sent_done.wait()

    async def sink_session(deadline: float) -> None:
        async with open_ws(ws_url(server.url, "sink")) as ws:
            await recv(ws)
            with trio.move_on_after(deadline):
                while True:
                    msg = await recv(ws, timeout=30)
                    if msg.get("event") == "frame":
                        received.append((msg["channel_id"], msg["seq"], msg["payload"]))
                        if rng.random() < 0.5:  # ack some frames, leave others to redelivery
                            await send(ws, action="ack", channel_id=msg["channel_id"], seq=msg["seq"])

    async def sink() -> None:
        with trio.fail_after(60):
            while True:
                await sink_session(rng.uniform(0.01, 0.15))
                unique = {(c, s) for c, s, _ in received}
                if len(unique) == n_senders * m_messages:
                    break
                await trio.sleep(rng.uniform(0, 0.05))
        sent_done.set()

    async with trio.open_nursery() as nursery:
        for k in range(n_senders):
            nursery.start_soon(sender, k)
        nursery.start_soon(sink)

    unique = {(c, s): p for c, s, p in received}
    assert len(unique) == n_senders * m_messages
    by_sender: dict[int, list[int]] = {}
    for (_, _), p in sorted(unique.items()):
        by_sender.setdefault(p["k"], []).append(p["i"])
    assert all(sorted(v) == list(range(m_messages)) for v in by_sender.values())
    print(f"soak: {n_senders}x{m_messages} frames, {len(received)} deliveries, {len(unique)} unique")
