"""TIBET tokens: the format (mux.tokens) and the ``tibet:token`` backend over a real node."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import trio

from mux.client import ClientChannel, MuxClient, connect
from mux.errors import BadRequest, VerificationError
from mux.frames import canonical_json
from mux.server import ServeInfo
from mux.signing import NodeKey
from mux.tokens import issue_token, key_id, signing_bytes, verify_token

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking REST call off the Trio thread (the node runs on it)."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args))


async def ask(ch: ClientChannel, request: Any) -> dict[str, Any]:
    """Send one request on a tibet:token channel and return the node's answer payload."""
    ack = await ch.send(request)
    frame = await ch.receive()
    assert frame["sender"] == "node" and frame["target"] == ch.agent
    answer: dict[str, Any] = frame["payload"]
    assert answer["seq"] == ack["seq"]  # every answer names the request it answers
    return answer


def reason_of(token: Any, key: str | NodeKey, **kw: Any) -> str:
    """The VerificationError reason verify_token gives for ``token``."""
    with pytest.raises(VerificationError) as info:
        verify_token(token, key.public_hex if isinstance(key, NodeKey) else key, **kw)
    return info.value.reason


def resign(token: dict[str, Any], key: NodeKey) -> dict[str, Any]:
    """``token`` signed again by ``key`` (a forger's key), kid untouched."""
    return {**token, "sig": key.sign(signing_bytes(token))}


# ---- the format, offline ---------------------------------------------------------------------


def test_format_round_trip_and_signed_bytes() -> None:
    key = NodeKey.generate()
    ref = "ab" * 32
    tok = issue_token(
        key, issuer="node", subject="alice", claim={"n": 1, "s": "é"}, refs=[ref], ttl_s=10, now_ms=1_000_000
    )
    assert set(tok) == {"v", "iss", "kid", "sub", "claim", "intent", "refs", "iat", "exp", "jti", "sig"}
    assert (tok["v"], tok["iss"], tok["sub"], tok["intent"], tok["refs"]) == (1, "node", "alice", "tibet:token", [ref])
    assert tok["kid"] == key.public_hex[:16] == key_id(key.public_hex)
    assert (tok["iat"], tok["exp"]) == (1_000_000, 1_010_000) and len(tok["jti"]) == 32
    # the signature covers exactly the canonical JSON of everything but sig
    body = {k: v for k, v in tok.items() if k != "sig"}
    assert signing_bytes(tok) == canonical_json(body)
    key.signing_key.verify_key.verify(canonical_json(body), bytes.fromhex(tok["sig"]))
    claims = verify_token(tok, key.public_hex, now_ms=1_000_000)
    assert claims == body
    # time bounds: valid on [iat, exp)
    assert reason_of(tok, key, now_ms=999_999) == "not_yet_valid"
    assert verify_token(tok, key.public_hex, now_ms=999_999, leeway_ms=1) == body
    assert verify_token(tok, key.public_hex, now_ms=1_009_999) == body
    assert reason_of(tok, key, now_ms=1_010_000) == "expired"


def test_issue_refuses_unusable_arguments() -> None:
    key = NodeKey.generate()
    with pytest.raises(BadRequest):
        issue_token(key, issuer="node", subject="a", refs=["not-a-hash"])
    with pytest.raises(BadRequest):
        issue_token(key, issuer="node", subject="a", ttl_s=0)
    with pytest.raises(BadRequest) as info:
        issue_token(key, issuer="node", subject="a", claim={"x": {1, 2}})
    assert info.value.code == "bad_payload"


def test_malformed_tokens_are_named_malformed() -> None:
    key = NodeKey.generate()
    tok = issue_token(key, issuer="node", subject="alice", claim=None)
    bad: list[Any] = [
        [tok],
        {k: v for k, v in tok.items() if k != "sig"},
        {**tok, "extra": 1},
        {**tok, "v": 2},
        {**tok, "v": True},
        {**tok, "kid": "XYZ"},
        {**tok, "refs": ["00"]},
        {**tok, "iat": "1"},
        {**tok, "exp": tok["iat"]},
        {**tok, "sub": ""},
        {**tok, "sig": "00" * 10},
    ]
    for b in bad:
        assert reason_of(b, key) == "malformed", b


# ---- the backend over a real node -------------------------------------------------------------


async def test_issue_over_a_real_node_then_verify_offline(server: ServeInfo) -> None:
    with trio.fail_after(20):
        async with connect(server.url, "alice") as alice:
            ch = await alice.open("node", "tibet:token")
            assert ch.route == {"backend": "tibet", "description": "TIBET token operations"}
            refs = [ch.tbz_hash]  # the channel's own signed open frame
            answer = await ask(ch, {"op": "issue", "claim": {"did": "x", "n": 3}, "refs": refs, "ttl_s": 60, "ref": 7})
            assert answer["op"] == "issued" and answer["ref"] == 7
            token = answer["token"]
            assert (token["iss"], token["sub"], token["claim"], token["refs"]) == (
                "node",
                "alice",
                {"did": "x", "n": 3},
                refs,
            )
            assert token["intent"] == "tibet:token" and token["exp"] - token["iat"] == 60_000

        with MuxClient(server.url, "carol") as carol:  # anyone, offline, with the published key
            keys = await in_thread(carol.keys)
        entry = keys["keys"][0]
        assert token["kid"] == entry["kid"] == entry["public_key"][:16]
        claims = verify_token(token, entry["public_key"])
        assert claims["sub"] == "alice" and claims["claim"] == {"did": "x", "n": 3} and "sig" not in claims
        # a short-lived token: refused as expired at its exp (explicit clock), valid just before
        verify_token(token, entry["public_key"], now_ms=token["exp"] - 1)
        assert reason_of(token, entry["public_key"], now_ms=token["exp"]) == "expired"
        assert reason_of(token, entry["public_key"], now_ms=token["iat"] - 1) == "not_yet_valid"


async def test_forged_tokens_are_refused_precisely(server: ServeInfo) -> None:
    with trio.fail_after(20):
        async with connect(server.url, "alice") as alice:
            ch = await alice.open("node", "tibet:token")
            token = (await ask(ch, {"op": "issue", "claim": {"role": "reader"}, "ttl_s": 1}))["token"]
            pub = alice.public_key
    verify_token(token, pub, now_ms=token["iat"])
    assert reason_of(token, pub, now_ms=token["exp"] + 5) == "expired"
    forger = NodeKey.generate()
    edited = {**token, "claim": {"role": "admin"}}
    assert reason_of(edited, pub, now_ms=token["iat"]) == "bad_signature"  # claim edited
    assert reason_of({**token, "sub": "mallory"}, pub, now_ms=token["iat"]) == "bad_signature"
    assert reason_of({**token, "exp": token["exp"] + 10**9}, pub, now_ms=token["iat"]) == "bad_signature"
    # signed by another key, claiming the node's kid: the signature check catches it
    assert reason_of(resign(edited, forger), pub, now_ms=token["iat"]) == "bad_signature"
    # signed by another key under its own kid: refused as not the node's key
    own = issue_token(forger, issuer="node", subject="alice", claim={"role": "admin"})
    assert reason_of(own, pub) == "bad_signature"
    verify_token(own, forger.public_hex)  # ... while being a fine token of the forger's own
    # forged-expired: authenticity is checked before time, so the reason is the signature
    assert reason_of(resign(token, forger), pub, now_ms=token["exp"] + 5) == "bad_signature"


async def test_verify_and_errors_over_the_channel(server: ServeInfo) -> None:
    with trio.fail_after(20):
        async with connect(server.url, "alice") as alice:
            ch = await alice.open("node", "tibet:token")
            token = (await ask(ch, {"op": "issue", "claim": ["a", 1], "refs": []}))["token"]
            assert token["exp"] - token["iat"] == 3_600_000  # default ttl

            ok = await ask(ch, {"op": "verify", "token": token, "ref": "v1"})
            assert ok["op"] == "verified" and ok["ok"] is True and ok["ref"] == "v1"
            assert ok["claims"] == {k: v for k, v in token.items() if k != "sig"}

            forged = await ask(ch, {"op": "verify", "token": {**token, "claim": ["a", 2]}})
            assert (forged["op"], forged["ok"], forged["reason"]) == ("verified", False, "bad_signature")
            other = issue_token(NodeKey.generate(), issuer="node", subject="alice", claim=1)
            assert (await ask(ch, {"op": "verify", "token": other}))["reason"] == "bad_signature"
            assert (await ask(ch, {"op": "verify", "token": {"v": 1}}))["reason"] == "malformed"

            short = (await ask(ch, {"op": "issue", "claim": 1, "ttl_s": 0.001}))["token"]
            await trio.sleep(0.01)
            expired = await ask(ch, {"op": "verify", "token": short})
            assert (expired["ok"], expired["reason"]) == (False, "expired")

            # malformed requests are answered with an error frame; the channel stays open
            errors = [
                ("hello", "bad_request"),
                ({"op": "burn"}, "unknown_op"),
                ({"op": "issue", "refs": ["zz"]}, "bad_refs"),
                ({"op": "issue", "refs": "x"}, "bad_refs"),
                ({"op": "issue", "ttl_s": -1}, "bad_ttl"),
                ({"op": "issue", "ttl_s": 10**12}, "bad_ttl"),
                ({"op": "issue", "sub": "root"}, "bad_request"),  # the subject is never the caller's choice
                ({"op": "issue", "intent": "Bad Intent"}, "bad_request"),
                ({"op": "verify"}, "bad_request"),
            ]
            for request, code in errors:
                answer = await ask(ch, request)
                assert (answer["op"], answer["code"]) == ("error", code), request
            assert ch.is_open
            assert (await ask(ch, {"op": "issue", "claim": 2, "intent": "chat"}))["token"]["intent"] == "chat"

            listed = next(c for c in await alice.list() if c["channel_id"] == ch.id)
            assert listed["backend_state"] == {"issued": 3, "verified": 1, "refused": 4, "errors": len(errors)}
            await ch.close()


async def test_only_channels_to_the_node_and_rest_openers(server: ServeInfo) -> None:
    with trio.fail_after(20):
        async with connect(server.url, "alice") as alice:
            with pytest.raises(BadRequest) as info:
                await alice.open("bob", "tibet:token")
            assert info.value.code == "bad_target"
        # a REST opener has no live inbox: it reads the node's answer from the ledger
        with MuxClient(server.url, "dave") as dave:
            opened = await in_thread(dave.open, "node", "tibet:token")
            cid = opened["channel_id"]
            await in_thread(dave.send, cid, {"op": "issue", "claim": "rest"})
            got = await in_thread(dave.frames, cid, 0, 5.0)
            [frame] = got["frames"]
            assert frame["sender"] == "node" and frame["payload"]["op"] == "issued"
            token = frame["payload"]["token"]
            assert token["sub"] == "dave" and verify_token(token, opened_key(await in_thread(dave.keys)))
            await in_thread(dave.close, cid)


def opened_key(keys: dict[str, Any]) -> str:
    """The node's public key from a ``GET /keys`` answer."""
    key: str = keys["keys"][0]["public_key"]
    return key
