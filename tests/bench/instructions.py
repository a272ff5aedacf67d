"""Instructions per relayed send through a node's protocol logic, counted by callgrind.

Run: ``python -m tests.bench instructions`` (not part of the default run; needs valgrind:
``apt-get install valgrind``). Timings on these VMs scatter by 10 to 40% between runs, so a
change of a few percent to the hot path cannot be seen in them; valgrind's callgrind counts
the instructions a process executes, whatever else the machine is doing (two runs of the
same code agree within about 1%: channel ids and timestamps differ). This section counts
what one relayed send costs the node between the socket layers: ``WireSession.handle`` of a
100-byte ``send`` on one connection, through chaining, hashing, signing and the ledger, to
the receiving connection's outbox, whose messages are taken off as its writer would (no
sockets, no event loop passes per send).

Rows: every frame signed and acknowledged (the default, as relay (b) of the server section),
chain heads signed (``sign_every=16``) with ``?acks=errors`` (as (b'')), and the default with
the signer replaced by a no-op (what Ed25519 costs is the difference from the first row).

How this works: this module run as a script (``--drive N EVERY ACKS SIGN``) makes two
sessions on one :class:`mux.Mux` and relays ``N`` sends; each configuration runs under
``valgrind --tool=callgrind`` with ``N`` = ``FEW`` and ``MANY``, and the difference of the two
totals over ``MANY - FEW`` sends is the count per send (start-up and imports cancel out).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import trio

__all__ = ["CONFIGS", "count", "drive", "run"]

FEW = 500
MANY = 2000
RUN_TIMEOUT_S = 600.0

CONFIGS: tuple[tuple[str, int, bool, bool], ...] = (
    ("default (as (b))", 1, True, True),
    ("chain heads, quiet acks (as (b''))", 16, False, True),
    ("default, no-op signer", 1, True, False),
)
"""Label, ``sign_every``, acknowledged, signed."""

_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


async def drive(n: int, sign_every: int, acks: bool, sign: bool) -> None:
    """Relay ``n`` sends from one session to another through a fresh in-memory Mux."""
    import mux
    from mux.session import WireSession

    async with mux.open_mux(agent="bench", sign_every=sign_every, sign_within_ms=3_600_000) as node:
        if not sign:
            node._sign = lambda digest: ""  # measurement only: the path without Ed25519
        async with trio.open_nursery() as nursery:
            alice = WireSession(node, node.attach("alice"), max_message_bytes=1 << 20, live_acks=acks)
            bob = WireSession(node, node.attach("bob"), max_message_bytes=1 << 20)
            alice.start(nursery)
            bob.start(nursery)
            alice.handle('{"action":"open","target":"bob","intent":"stream"}')
            with trio.fail_after(10):  # bob's session takes the channel: frames go to its outbox
                while '"channel_opened"' not in str(await bob.outbox.get()):
                    pass
            while bob.outbox.get_nowait() is not None:
                pass
            cid = node.channels(agent="bob")[0]["channel_id"]
            payload = '{"t":1790000000000000000,"p":"' + "x" * 69 + '"}'  # 100 bytes
            messages = [f'{{"action":"send","channel_id":"{cid}","ref":{i},"payload":{payload}}}' for i in range(n)]
            delivered = 0
            for message in messages:
                replies = alice.handle(message)
                if acks and not (replies and '"frame_ack"' in replies[0]):
                    raise RuntimeError(f"send not acknowledged: {replies!r:.200}")
                while alice.outbox.get_nowait() is not None:
                    pass
                while bob.outbox.get_nowait() is not None:
                    delivered += 1
            if delivered < n:
                raise RuntimeError(f"{delivered} messages reached the receiver's outbox for {n} sends")
            nursery.cancel_scope.cancel()


def count(n: int, sign_every: int, acks: bool, sign: bool) -> int:
    """Instructions callgrind counts for a whole ``--drive`` run of ``n`` sends."""
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "tests.bench.instructions",
        "--drive",
        str(n),
        str(sign_every),
        str(int(acks)),
        str(int(sign)),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    found = _REFS.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run failed ({done.returncode}): {done.stderr[-400:]}")
    return int(found[1].replace(",", ""))


def run() -> list[tuple[str, str]]:
    """Count each configuration at ``FEW`` and ``MANY`` sends (two runs at a time); rows."""
    if shutil.which("valgrind") is None:
        return [("instructions per relayed send", "n/a (valgrind not installed: apt-get install valgrind)")]
    jobs = [(n, *config[1:]) for config in CONFIGS for n in (FEW, MANY)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        totals = list(pool.map(lambda job: count(*job), jobs))
    per_send = [(totals[2 * i + 1] - totals[2 * i]) / (MANY - FEW) for i in range(len(CONFIGS))]
    rows = [
        (f"instructions per relayed send, protocol logic only: {label}", f"{value:>9.0f}")
        for (label, *_), value in zip(CONFIGS, per_send, strict=True)
    ]
    rows.append(("    of which Ed25519 signing (first row less the last)", f"{per_send[0] - per_send[2]:>9.0f}"))
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--drive"]:
        n, every, acks, sign = (int(x) for x in sys.argv[2:6])
        trio.run(drive, n, every, bool(acks), bool(sign))
    else:
        for label, value in run():
            print(f"{label:<90} {value}")
