"""Signing and offline verification: every kind of tampering is named precisely."""

from __future__ import annotations

import copy
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

import mux
from mux.frames import GENESIS, ChainHead, canonical_json
from mux.signing import NodeKey


async def _make_chain() -> tuple[list[dict[str, Any]], str]:
    async with mux.open_mux(agent="n") as m, m.attach("b") as b:
        ch = await m.open("b", "stream", {"k": "v"}, agent="a")
        peer = await b.accept()
        for i in range(3):
            await ch.send({"i": i, "f": 0.5, "s": "héllo\n"})
        await peer.send(b"\x00\xffraw")
        await peer.send([1, None, True])
        await ch.send("text")
        await ch.close("bye")
        return [f.to_dict() for f in await m.export(ch.id)], m.public_key


@pytest.fixture
def chain() -> tuple[list[dict[str, Any]], str]:
    """An exported, closed chain of 8 frames (open, 6 data both ways incl. binary, close)."""
    return trio.run(_make_chain)


def reason_of(frames: list[dict[str, Any]], key: str) -> str:
    with pytest.raises(mux.VerificationError) as info:
        mux.verify_chain(frames, key)
    return info.value.reason


def test_intact_chain_verifies(chain: tuple[list[dict[str, Any]], str]) -> None:
    frames, key = chain
    report = mux.verify_chain(frames, key)
    assert (report.frames, report.first_seq, report.last_seq, report.closed) == (8, 0, 7, True)
    assert frames[0]["kind"] == "open" and frames[0]["prev"] == GENESIS
    assert frames[4]["enc"] == "bytes"
    for f in frames:
        assert mux.verify_frame(f, key).tbz_hash == f["tbz_hash"]
    # a round trip through JSON text (as a file would) still verifies
    assert mux.verify_chain([orjson.loads(orjson.dumps(f)) for f in frames], key).frames == 8


def test_hash_follows_the_documented_encoding(chain: tuple[list[dict[str, Any]], str]) -> None:
    """Recompute tbz_hash from docs/frames.md by hand, independent of mux.frames."""
    frames, _ = chain
    for f in frames:
        import base64

        payload = base64.b64decode(f["payload"]) if f["enc"] == "bytes" else canonical_json(f["payload"])
        header = {
            k: f[k] for k in ("channel_id", "enc", "intent", "kind", "prev", "sender", "seq", "target", "ts", "v")
        }
        header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
        text = "{" + ",".join(f'"{k}":{orjson.dumps(header[k]).decode()}' for k in sorted(header)) + "}"
        assert hashlib.sha256(text.encode()).hexdigest() == f["tbz_hash"]


def test_tampered_payload_detected(chain: tuple[list[dict[str, Any]], str]) -> None:
    frames, key = chain
    bad = copy.deepcopy(frames)
    bad[2]["payload"]["i"] = 42
    assert reason_of(bad, key) == "bad_hash"
    bad = copy.deepcopy(frames)
    bad[4]["payload"] = "AAAA"  # binary payload swapped
    assert reason_of(bad, key) == "bad_hash"
    bad = copy.deepcopy(frames)
    bad[3]["sender"] = "mallory"
    assert reason_of(bad, key) == "bad_hash"


def test_resigned_with_other_key_detected(chain: tuple[list[dict[str, Any]], str]) -> None:
    frames, key = chain
    other = NodeKey.generate()
    bad = copy.deepcopy(frames)
    bad[3]["sig"] = other.sign(bytes.fromhex(bad[3]["tbz_hash"]))
    assert reason_of(bad, key) == "bad_signature"
    # a whole chain from another node fails on its first frame
    assert reason_of(frames, other.public_hex) == "bad_signature"
    bad = copy.deepcopy(frames)
    bad[1]["sig"] = "zz"
    assert reason_of(bad, key) == "bad_signature"


def test_dropped_frame_detected(chain: tuple[list[dict[str, Any]], str]) -> None:
    frames, key = chain
    with pytest.raises(mux.VerificationError) as info:
        mux.verify_chain(frames[:3] + frames[4:], key)
    assert info.value.reason == "gap" and info.value.seq == 3 and info.value.index == 3
    assert reason_of(frames[1:], key) == "bad_start"


def test_reordered_pair_detected(chain: tuple[list[dict[str, Any]], str]) -> None:
    frames, key = chain
    swapped = frames[:2] + [frames[3], frames[2]] + frames[4:]
    assert reason_of(swapped, key) == "reorder"
    assert reason_of(frames[:3] + [frames[2]] + frames[3:], key) == "duplicate"
    assert reason_of(frames + [frames[-1]], key) == "after_close"


def test_frame_from_another_node_detected(chain: tuple[list[dict[str, Any]], str]) -> None:
    """A validly signed frame of another node's channel, spliced in, fails on its signature."""
    frames, key = chain
    k = NodeKey.generate()
    head = ChainHead(frames[0]["channel_id"], "stream", k.sign, next_seq=3, head=frames[2]["tbz_hash"])
    alien = head.append("data", "a", "b", {"x": 1}, 2).to_dict()
    with pytest.raises(mux.VerificationError) as info:
        mux.verify_chain([*frames[:3], alien, *frames[4:]], key)
    assert (info.value.reason, info.value.index) == ("bad_signature", 3)


def test_wrong_channel_and_broken_link_with_the_same_key() -> None:
    k = NodeKey.generate()
    one = ChainHead("ch-" + "a" * 32, "chat", k.sign)
    two = ChainHead("ch-" + "b" * 32, "chat", k.sign)
    a = [one.append("open", "x", "y", {}, 1), one.append("data", "x", "y", 1, 2)]
    b = [two.append("open", "x", "y", {}, 1), two.append("data", "x", "y", 1, 2), two.append("data", "x", "y", 2, 3)]
    with pytest.raises(mux.VerificationError) as info:
        mux.verify_chain(a + [b[2]], k.public_hex)
    assert info.value.reason == "wrong_channel"
    # same channel, right seq, but prev points elsewhere: a forged continuation
    fork = ChainHead("ch-" + "a" * 32, "chat", k.sign, next_seq=2, head="f" * 64)
    with pytest.raises(mux.VerificationError) as info:
        mux.verify_chain(a + [fork.append("data", "x", "y", 3, 3)], k.public_hex)
    assert info.value.reason == "broken_link"


def test_after_close_and_partial(chain: tuple[list[dict[str, Any]], str]) -> None:
    frames, key = chain
    assert mux.verify_chain(frames[3:], key, require_open=False).first_seq == 3
    with pytest.raises(mux.VerificationError):
        mux.verify_chain([], key)


def _cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mux", *args],
        input=stdin.decode() if stdin else None,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_verify(chain: tuple[list[dict[str, Any]], str], tmp_path: Path) -> None:
    frames, key = chain
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"\n".join(orjson.dumps(f) for f in frames) + b"\n")
    r = _cli("verify", str(good), "--key", key)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK: 8 frames") and "closed" in r.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(orjson.dumps(f) for f in frames[:3] + frames[4:]))
    r = _cli("verify", str(bad), "--key", key)
    assert r.returncode == 1
    assert "FAILED" in r.stdout and "gap" in r.stdout and "missing" in r.stdout

    r = _cli("verify", "-", "--key", key, "--json", stdin=good.read_bytes())
    assert r.returncode == 0 and orjson.loads(r.stdout)["frames"] == 8

    r = _cli("verify", str(good), "--key", "nothex")
    assert r.returncode == 2 and "bad_key" in r.stderr
    junk = tmp_path / "junk.jsonl"
    junk.write_text("{not json\n")
    r = _cli("verify", str(junk), "--key", key)
    assert r.returncode == 2 and "line 1" in r.stderr


def test_the_node_key_signs_as_pynacl_and_verifies(tmp_path: Path) -> None:
    """``NodeKey.sign`` (through libsodium's binding) gives PyNaCl's own Ed25519 signature,
    which the public key verifies, for a fresh key and one loaded from its file."""
    for key in (NodeKey.generate(), NodeKey.load_or_create(tmp_path), NodeKey.load_or_create(tmp_path)):
        for i in range(8):
            digest = hashlib.sha256(b"frame %d" % i).digest()
            sig = key.sign(digest)
            assert sig == key.signing_key.sign(digest).signature.hex()
            key.signing_key.verify_key.verify(digest, bytes.fromhex(sig))
