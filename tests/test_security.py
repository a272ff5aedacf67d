"""Authentication, isolation with real credentials, permissions and limits on a real node."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from mux.auth import issue_token
from mux.client import open_ws
from mux.signing import NodeKey

from .nodes import serve_node
from .wsutil import recv, send


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "node"


@pytest.fixture
def key(data_dir: Path) -> NodeKey:
    return NodeKey.load_or_create(data_dir)


async def start(nursery: trio.Nursery, data_dir: Path, **over: Any) -> str:
    info = await serve_node(nursery, **{"open_mode": False, "data_dir": str(data_dir), **over})
    return info.url


def token(key: NodeKey, agent: str, **kw: Any) -> str:
    return issue_token(key, agent, ttl_s=kw.pop("ttl_s", 600), **kw)[0]


def auth(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


async def test_rest_refuses_missing_forged_expired_revoked_and_mismatched(
    nursery: trio.Nursery, data_dir: Path, key: NodeKey
) -> None:
    url = await start(nursery, data_dir)
    good = token(key, "alice")
    forged = token(NodeKey.generate(), "alice")
    expired = issue_token(key, "alice", ttl_s=1, now_ms=int(time.time() * 1000) - 60_000)[0]
    revoked, claims = issue_token(key, "alice", ttl_s=600)
    cli = await trio.run_process(
        [sys.executable, "-m", "mux", "token", "revoke", "--jti", str(claims["jti"]), "--data-dir", str(data_dir)],
        capture_stdout=True,
        capture_stderr=True,
    )
    assert cli.returncode == 0
    tampered = good[:-6] + ("A" if good[-6] != "A" else "B") + good[-5:]
    async with httpx.AsyncClient(base_url=url + "/api/mux") as c:
        body = {"target": "bob", "intent": "chat"}
        cases = [
            ({}, 401, "unauthenticated"),
            (auth(forged), 401, "bad_token"),
            (auth(tampered), 401, "bad_token"),
            (auth("mux1.garbage"), 401, "bad_token"),
            (auth(expired), 401, "token_expired"),
            (auth(revoked), 401, "token_revoked"),
        ]
        for headers, status, code in cases:
            r = await c.post("/open", json=body, headers=headers)
            assert (r.status_code, r.json()["error"]) == (status, code), headers
        r = await c.post("/open", json={**body, "agent": "mallory"}, headers=auth(good))
        assert (r.status_code, r.json()["error"]) == (403, "agent_mismatch")
        r = await c.post("/open", json=body, headers=auth(good))
        assert r.status_code == 200 and r.json()["agent"] == "alice"
        r = await c.get("/channels", params={"token": good})  # browsers: ?token=
        assert r.status_code == 200 and r.json()["agent"] == "alice"
        assert (await c.get("/status")).status_code == 200  # public
        assert (await c.get("/keys")).json()["keys"][0]["public_key"] == key.public_hex


async def test_websocket_credentials_header_query_subprotocol(
    nursery: trio.Nursery, data_dir: Path, key: NodeKey
) -> None:
    url = await start(nursery, data_dir)
    good = token(key, "alice")
    base = url.replace("http", "ws", 1) + "/api/mux/ws"
    async with open_ws(base + f"?token={good}") as ws:
        assert (await recv(ws))["agent"] == "alice"
    async with open_ws(base, extra_headers=[(b"authorization", f"Bearer {token(key, 'bob')}".encode())]) as ws:
        assert (await recv(ws))["agent"] == "bob"
    from trio_websocket import wrap_client_stream

    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream, trio.open_nursery() as inner:
        ws = await wrap_client_stream(
            inner, stream, f"{host}:{port}", "/api/mux/ws", subprotocols=["mux.v1", f"mux.token.{token(key, 'carol')}"]
        )
        assert ws.subprotocol == "mux.v1"
        assert (await recv(ws))["agent"] == "carol"
        await ws.aclose()
    for query, code in (("", "unauthenticated"), (f"?token={token(NodeKey.generate(), 'x')}", "bad_token")):
        async with open_ws(base + query) as ws:
            assert (await recv(ws))["error"] == code
    async with open_ws(base + f"?token={good}&agent=mallory") as ws:
        assert (await recv(ws))["error"] == "agent_mismatch"


async def test_authenticated_x_cannot_touch_channels_of_a_and_b(
    nursery: trio.Nursery, data_dir: Path, key: NodeKey
) -> None:
    url = await start(nursery, data_dir)
    ta, tb, tx = token(key, "a"), token(key, "b"), token(key, "x")
    base = url.replace("http", "ws", 1) + "/api/mux/ws?token="
    async with open_ws(base + ta) as a, open_ws(base + tb) as b, open_ws(base + tx) as x:
        for ws in (a, b, x):
            await recv(ws)
        await send(a, action="open", target="b", intent="chat")
        cid = (await recv(a))["channel_id"]
        await recv(b)
        for action in (
            {"action": "send", "channel_id": cid, "payload": 1},
            {"action": "close", "channel_id": cid},
            {"action": "ack", "channel_id": cid, "seq": 1},
            {"action": "fork", "channel_id": cid},
        ):
            await send(x, **action)
            assert (await recv(x))["error"] == "forbidden", action
        async with httpx.AsyncClient(base_url=url + "/api/mux", headers=auth(tx)) as c:
            for path in (f"/channel/{cid}", f"/channel/{cid}/frames", f"/channel/{cid}/chain"):
                assert (await c.get(path)).status_code == 403, path
            for path, body in (
                ("/send", {"channel_id": cid, "payload": 1}),  # no agent named: the token's agent (x) is the caller
                ("/close", {"channel_id": cid}),
                ("/ack", {"channel_id": cid, "seq": 1}),
            ):
                r = await c.post(path, json=body)
                assert (r.status_code, r.json()["error"]) == (403, "forbidden"), path
            assert (await c.get("/channels")).json()["channels"] == []
        await send(a, action="send", channel_id=cid, payload={"still": "works"})
        assert (await recv(a))["event"] == "frame_ack"
        assert (await recv(b))["payload"] == {"still": "works"}


async def test_intent_permissions_from_the_token(nursery: trio.Nursery, data_dir: Path, key: NodeKey) -> None:
    url = await start(nursery, data_dir)
    iot = token(key, "iot-1", intents=["iot:*"])
    async with open_ws(url.replace("http", "ws", 1) + f"/api/mux/ws?token={iot}") as ws:
        await recv(ws)
        await send(ws, action="open", target="hub", intent="chat", ref=1)
        err = await recv(ws)
        assert (err["error"], err["ref"]) == ("intent_forbidden", 1)
        await send(ws, action="open", target="hub", intent="iot:sensor:temp", ref=2)
        assert (await recv(ws))["event"] == "channel_opened"
    async with httpx.AsyncClient(base_url=url + "/api/mux", headers=auth(iot)) as c:
        assert (await c.post("/open", json={"target": "hub", "intent": "vpn:tunnel"})).json()[
            "error"
        ] == "intent_forbidden"


async def test_limits_answer_with_codes_and_the_connection_goes_on(
    nursery: trio.Nursery, data_dir: Path, key: NodeKey
) -> None:
    url = await start(nursery, data_dir, rate_messages_per_s=20, rate_burst=5, max_connections=2)
    base = url.replace("http", "ws", 1) + "/api/mux/ws?token="
    async with open_ws(base + token(key, "a")) as a, open_ws(base + token(key, "b")) as b:
        await recv(a)
        await recv(b)
        for i in range(8):
            await send(a, action="ping", ref=i)
        answers = [await recv(a) for _ in range(8)]
        limited = [m for m in answers if m.get("error") == "rate_limited"]
        assert limited and len(limited) < 8
        await trio.sleep(0.3)  # the bucket refills
        await send(a, action="ping", ref="after")
        assert (await recv(a))["event"] == "pong"
        async with open_ws(base + token(key, "c")) as c:  # a third connection
            assert (await recv(c))["error"] == "too_many_connections"
        await send(a, action="ping", ref="still")
        assert (await recv(a))["event"] == "pong"


async def test_connection_ends_when_its_token_expires(nursery: trio.Nursery, data_dir: Path, key: NodeKey) -> None:
    url = await start(nursery, data_dir)
    short = token(key, "brief", ttl_s=1.0)
    async with open_ws(url.replace("http", "ws", 1) + f"/api/mux/ws?token={short}") as ws:
        await recv(ws)
        with trio.fail_after(4):
            msg = await recv(ws, timeout=4)
        assert msg["error"] == "token_expired"


def test_cli_issues_a_token_the_node_accepts(data_dir: Path, key: NodeKey) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mux",
            "token",
            "issue",
            "--agent",
            "Robot.aint",
            "--ttl",
            "15m",
            "--intents",
            "iot:*,chat",
            "--data-dir",
            str(data_dir),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    import orjson

    data = orjson.loads(out)
    from mux.auth import read_token

    grant, claims = read_token(data["token"], key)
    assert grant.agent == "robot" and grant.intents == ("iot:*", "chat")
    assert 14 * 60_000 < claims["exp"] - claims["iat"] <= 15 * 60_000


async def test_agent_signed_frames_verify_end_to_end(nursery: trio.Nursery, data_dir: Path, key: NodeKey) -> None:
    import nacl.signing

    import mux
    from mux.signing import sign_as_agent, verify_agent_frame

    url = await start(nursery, data_dir)
    alice_sk = nacl.signing.SigningKey.generate()
    alice_pk = bytes(alice_sk.verify_key).hex()
    ta = token(key, "alice", agent_key=alice_pk)
    base = url.replace("http", "ws", 1) + "/api/mux/ws?token="
    async with open_ws(base + ta) as a, open_ws(base + token(key, "bob")) as b:
        await recv(a)
        await recv(b)
        await send(a, action="open", target="bob", intent="stream")
        cid = (await recv(a))["channel_id"]
        await recv(b)
        payload = {"order": 66, "note": "signed by alice"}
        sig = sign_as_agent(alice_sk, cid, "alice", payload, "n-1")
        await send(a, action="send", channel_id=cid, payload=payload, agent_sig=sig, agent_nonce="n-1", ref=1)
        assert (await recv(a))["event"] == "frame_ack"
        event = await recv(b)
        frame = {k: v for k, v in event.items() if k != "event"}
        assert (frame["agent_key"], frame["agent_nonce"]) == (alice_pk, "n-1")
        mux.verify_frame(frame, key.public_hex)  # the node attests the key was alice's
        assert verify_agent_frame(frame, alice_pk).payload == payload  # and alice wrote it
        with pytest.raises(mux.VerificationError) as info:
            verify_agent_frame(frame, bytes(nacl.signing.SigningKey.generate().verify_key).hex())
        assert info.value.reason == "wrong_agent_key"
        with pytest.raises(mux.VerificationError) as info:
            mux.verify_frame({**frame, "agent_sig": "00" * 64}, key.public_hex)
        assert info.value.reason == "bad_hash"  # the node's hash covers the agent signature

        forged = sign_as_agent(nacl.signing.SigningKey.generate(), cid, "alice", payload, "n-2")
        await send(a, action="send", channel_id=cid, payload=payload, agent_sig=forged, agent_nonce="n-2", ref=2)
        err = await recv(a)
        assert (err["error"], err["ref"]) == ("bad_agent_signature", 2)
        other = sign_as_agent(alice_sk, cid, "alice", {"order": 67}, "n-3")  # signature of another payload
        await send(a, action="send", channel_id=cid, payload=payload, agent_sig=other, agent_nonce="n-3", ref=3)
        assert (await recv(a))["error"] == "bad_agent_signature"
        await send(b, action="send", channel_id=cid, payload=1, agent_sig="00" * 64, agent_nonce="x", ref=4)
        assert (await recv(b))["error"] == "no_agent_key"  # bob registered no key
        await send(a, action="send", channel_id=cid, payload={"plain": True}, ref=5)
        assert (await recv(a))["event"] == "frame_ack"  # unsigned frames still allowed


async def test_real_client_address_behind_a_tls_terminating_proxy(nursery: trio.Nursery, data_dir: Path) -> None:
    proxied = await start(nursery, data_dir / "p", open_mode=True, trusted_proxy_hops=1)
    direct = await start(nursery, data_dir / "d", open_mode=True)
    headers = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    async with httpx.AsyncClient() as c:
        seen = (await c.get(proxied + "/api/mux/whoami", params={"agent": "a"}, headers=headers)).json()
        assert (seen["remote_addr"], seen["scheme"], seen["agent"]) == ("203.0.113.7", "https", "a")
        spoofed = (await c.get(direct + "/api/mux/whoami", headers=headers)).json()
        assert spoofed["remote_addr"] == "127.0.0.1" and spoofed["scheme"] == "http"  # untrusted headers ignored
