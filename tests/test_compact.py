"""After a burst of closes the node keeps what it remembers of closed channels compact and in
new objects.

``Mux.compact`` (the trimmer runs it) shelves each settled closed channel's state
(``ShelvedChannel``: one ``bytes`` beside its intent and backend, revived at each lookup)
and copies the shelves anew; the in-memory ledger keeps a closed channel's chain packed
(``mux.packed_frames``) and copies it anew too. Lookups, exports, refusals and repeated
closes see no difference; a closed channel that still has work (mail not yet delivered)
keeps its state as it is.
"""

from __future__ import annotations

import logging
import sys

import httpx
import pytest
import trio

import mux
from mux import storage
from mux.channel import ShelvedChannel
from mux.errors import ChannelClosed, ChannelForbidden
from mux.signing import verify_chain
from mux.storage import MemoryStore

from .nodes import serve_node


def _same_text(a: str, b: str) -> bool:
    return a == b and a is not b


async def test_compact_shelves_a_closed_channel_and_nothing_changes_for_its_users(node: mux.Mux) -> None:
    alice, _bob = node.attach("alice"), node.attach("bob")
    ch = alice.open_nowait("bob", metadata={"room": "blue", "n": [1, 2]})
    for i in range(3):
        ch.post_nowait({"i": i})
    close = await ch.close("done")
    old = node.channel_state(ch.id)
    info, chain = old.info(), await node.export(ch.id)
    assert verify_chain(chain, node.public_key).frames == 5

    node.compact()
    shelf = node._closed[ch.id]
    assert isinstance(shelf, ShelvedChannel) and old.ctx is None
    assert sys.getsizeof(shelf.data) < 1200
    assert _same_text(next(iter(node._closed)), ch.id)
    new = node.channel_state(ch.id, caller="bob")
    assert new is not old and new is not node.channel_state(ch.id), "made anew at each lookup"
    assert new.info() == info
    assert new.metadata == old.metadata and new.opened_at == old.opened_at
    assert [e.agent for e in new.ends.values()] == ["alice", "bob"]
    assert all(e.ended and not e.attached and e.holder is None for e in new.ends.values())
    assert new.open_frame == chain[0] and new.close_frame == close == chain[-1] and new.extra_seal is None
    assert new.chain.head == close.tbz_hash and new.chain.next_seq == 5 and new.chain.intent == old.chain.intent
    assert (new.bucket.rate, new.bucket.burst) == (old.bucket.rate, old.bucket.burst)
    assert await node.export(ch.id, caller="alice") == chain
    node.compact()
    again = node._closed[ch.id]
    assert isinstance(again, ShelvedChannel) and again.data == shelf.data and again.data is not shelf.data
    with pytest.raises(ChannelForbidden):
        node.channel_state(ch.id, caller="mallory")
    with pytest.raises(ChannelClosed):
        node._post(new, "alice", {"late": True})
    assert await node.close_channel(ch.id, by="bob") == close  # closing again: the same close frame
    assert [s["channel_id"] for s in node.channels(agent="bob", include_closed=True)] == [ch.id]


async def test_a_closed_channel_with_mail_still_to_deliver_keeps_its_state(node: mux.Mux) -> None:
    """A durable channel whose receiver was away: its mail still points at its state, which
    must stay the one the node delivers from when the receiver comes."""
    alice = node.attach("alice")
    ch = alice.open_nowait("carol", "chat")
    ch.post_nowait({"text": "hi"})
    await ch.close("done")
    kept = node.channel_state(ch.id)
    assert node._undelivered(kept, "carol")
    node.compact()
    assert node.channel_state(ch.id) is kept and kept.ctx is not None


async def test_the_ledger_keeps_a_closed_channels_chain_packed(node: mux.Mux) -> None:
    store = node.store
    assert isinstance(store, MemoryStore)
    alice, _bob = node.attach("alice"), node.attach("bob")
    ch = alice.open_nowait("bob")
    ch.post_nowait(b"\x00binary")
    before = await store.chain(ch.id)
    held = store.usage()["bytes"]
    await ch.close("done")
    assert isinstance(store._chains[ch.id], bytes)
    assert store.usage()["packed"] == 1 and store.usage()["frames"] == 3
    assert store.usage()["bytes"] < held, "a closed chain holds less than its open part did"
    chain = await store.chain(ch.id)
    assert chain[:2] == before and chain[-1].kind == "close"
    assert verify_chain(chain, node.public_key).frames == 3
    key, packed = next(iter(store._chains.items()))
    node.compact()
    key2, packed2 = next(iter(store._chains.items()))
    assert _same_text(key2, key) and packed2 == packed and packed2 is not packed
    assert await store.chain(ch.id, after_seq=0) == chain[1:]
    assert await store.channel_ends(ch.id) == ("alice", "bob")


async def test_a_long_chain_is_not_packed(node: mux.Mux, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "PACK_FRAMES_MAX", 3)
    alice, _bob = node.attach("alice"), node.attach("bob")
    short, long = alice.open_nowait("bob"), alice.open_nowait("bob")
    for _ in range(3):
        long.post_nowait({"x": 1})
    await short.close("done")
    await long.close("done")
    chains = node.store._chains  # type: ignore[attr-defined]
    assert isinstance(chains[short.id], bytes) and isinstance(chains[long.id], list)


async def test_a_running_node_shelves_its_closed_channels_and_serves_them_as_before(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Over HTTP, on a node whose trimmer runs after 40 closes: the closed channels' states
    are shelved and the chains copied anew, and the node answers for them exactly as before."""
    caplog.set_level(logging.INFO, logger="mux.heap")
    info = await serve_node(nursery, trim_after_closes=40)
    node = info.node.mux
    node.config.max_channels_per_agent = 100
    async with httpx.AsyncClient(base_url=info.url) as http:
        ids = []
        for i in range(50):
            reply = await http.post("/api/mux/open", json={"agent": "alice", "target": "bob", "intent": "stream"})
            assert reply.status_code == 200, reply.text
            cid = reply.json()["channel_id"]
            reply = await http.post("/api/mux/send", json={"channel_id": cid, "agent": "alice", "payload": {"i": i}})
            assert reply.status_code == 200, reply.text
            ids.append(cid)
        cid = ids[0]  # closed first: in the first trim however soon after the 40th close it comes
        for i, closing in enumerate(ids):
            reply = await http.post("/api/mux/close", json={"channel_id": closing, "agent": "alice"})
            assert reply.status_code == 200, reply.text
            if i == 0:  # its closed state, before any trim could run
                old = node.channel_state(cid)
                before = (await http.get(f"/api/mux/channel/{cid}", params={"agent": "bob"})).json()
        with trio.fail_after(15):  # the trimmer checks every second, once the closes settle
            while "released memory after" not in caplog.text:  # noqa: ASYNC110  (a log line, not a state)
                await trio.sleep(0.1)
        assert isinstance(node._closed[cid], ShelvedChannel) and node.channel_state(cid) is not old
        after = (await http.get(f"/api/mux/channel/{cid}", params={"agent": "bob"})).json()
        assert after == before and after["state"] == "closed"
        reply = await http.post("/api/mux/send", json={"channel_id": cid, "agent": "alice", "payload": {}})
        assert reply.status_code == 409 and reply.json()["error"] == "channel_closed", reply.text
        chain = await node.export(cid, caller="bob")
        assert [f.kind for f in chain] == ["open", "data", "close"]
        assert verify_chain(chain, node.public_key).frames == 3
