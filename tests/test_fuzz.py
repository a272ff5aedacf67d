"""Fuzzing: random and mutated messages against real nodes over real sockets, and the parser.

How this works: each node test starts ONE real node as a subprocess (``python -m mux serve``
on 127.0.0.1, port 0; an open-mode node with an in-memory store, and a token-mode node with a
SQLite store) and keeps it for every Hypothesis example. An example is a batch of messages:
random text and bytes (invalid UTF-8 travels as binary messages), random JSON values, and
templates of every action of ``docs/protocol.md`` mutated (fields dropped, wrong types,
extra fields, foreign and unknown channel ids, huge/negative/bool seq, deep nesting up to
2000 levels, strings near the size limits, binary framing with wrong header lengths). Each
example connects fresh WebSockets (the fuzzing agent and a peer that reads and acks), sends
its messages one by one, each followed by a sync ``ping``, and checks what came back before
that ping's ``pong``: every error has a documented code (the tables of ``docs/protocol.md``
are parsed), a message the sans-I/O parser refuses gets exactly that error, and after the
batch the same socket still answers a ``ping``. REST examples POST random bodies and GET
random paths: never a 5xx, always JSON with a documented code. At the end the node process
is alive, holds no connection and no open channel, its log has no traceback, and it shuts
down cleanly on SIGTERM. The parser (``mux.wire.parse_message``) is fuzzed alone with many
more examples: it returns an Action or raises a MuxError with a documented code.

Channels: every channel a fuzzing WebSocket agent opens (any intent, durable ``chat``
included) is closed with ``ws_disconnect`` when that agent's socket closes, because it holds
the opener end; durable channels stay open only for their *target* (the peer detaches, the
opener still closes them). REST has no connection: every channel a REST example opened is
closed by the example itself. So ``channels_open`` must be 0 once all examples are done.
The ``⟦foreign⟧`` channel, between two agents no example is, must still be open at the end
(the test closes it then), unless a REST example closed it where the protocol allows: on an
open-mode node, a ``POST /close`` naming no agent acts as the channel's opener. Until then
each REST example ends by sending to it and closing it as its own agent, refused 403 both
times (random messages alone seldom reach it with valid credentials).
Intents are limited to those served by the ``stream`` and ``ipoll`` backends (plus malformed
names): other backends have codes of their own, documented in docs/backends.md.

The figures (examples, WebSocket messages, HTTP requests) are printed (``pytest -s``).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import itertools
import math
import os
import re
import select
import signal
import struct
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import nacl.signing
import orjson
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, WebSocketConnection

from mux import wire
from mux.agents import normalize_agent
from mux.auth import issue_token
from mux.client import open_ws
from mux.errors import MuxError
from mux.intents import resolve_intent
from mux.signing import NodeKey

__all__: list[str] = []

REPO = Path(__file__).resolve().parent.parent
PROTOCOL = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")

MAX_MESSAGE = 65536
"""The fuzzed nodes' ``max_message_bytes`` (small, so messages near the limit are cheap)."""
MAX_PAYLOAD = 32768
"""The fuzzed nodes' ``[mux] max_payload_bytes`` (below the message limit: reachable)."""
MAX_METADATA = 16 << 10
CONFIG = f"max_message_bytes = {MAX_MESSAGE}\ngraceful_timeout_s = 1.0\n[mux]\nmax_payload_bytes = {MAX_PAYLOAD}\n"

WS_EXAMPLES = 40
REST_EXAMPLES = 40
PARSER_EXAMPLES = 1000


def _table(heading: str) -> frozenset[str]:
    """The first-column names (`` `name` ``) of the table under ``heading`` in protocol.md."""
    start = PROTOCOL.index(heading)
    end = PROTOCOL.find("\n#", start + len(heading))
    section = PROTOCOL[start : end if end >= 0 else None]
    return frozenset(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE))


DOCUMENTED_CODES = _table("## Error codes")
"""Every error code the protocol documents."""
DOCUMENTED_EVENTS = _table("### Events")
"""Every event name the protocol documents."""

NOT_IN_PROTOCOL_DOC = frozenset(
    {
        # answered by the node but missing from the error table of docs/protocol.md (reported;
        # delete from here once the table lists them)
        "not_found",  # an unknown REST path (404)
        "method_not_allowed",  # a wrong HTTP method (405)
    }
)
ALLOWED_CODES = DOCUMENTED_CODES | NOT_IN_PROTOCOL_DOC


# ---- a node as a subprocess ----------------------------------------------------------------


@attrs.define
class NodeProc:
    """A running ``python -m mux serve``: its process, base URL, key and log file."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path
    key: NodeKey | None

    @property
    def api(self) -> str:
        """The REST base URL."""
        return self.url + "/api/mux"

    def log_text(self) -> str:
        """Everything the node wrote to stderr so far."""
        return self.log.read_text(errors="replace")

    def problems(self) -> list[str]:
        """Log lines that mean a bug: tracebacks and errors."""
        return [
            line
            for line in self.log_text().splitlines()
            if "Traceback" in line or " ERROR " in line or "Error:" in line
        ]

    def tail(self, n: int = 40) -> str:
        """The last ``n`` log lines, for failure messages."""
        return "\n".join(self.log_text().splitlines()[-n:])


@contextlib.contextmanager
def node_proc(tmp: Path, *, open_mode: bool, timeout: float = 30.0) -> Iterator[NodeProc]:
    """Start a node on a free loopback port (killed on exit); yield once it listens."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "node.toml").write_text(CONFIG)
    args = [sys.executable, "-m", "mux", "serve", "--host", "127.0.0.1", "--port", "0", "--agent", "node"]
    args += ["--config", str(tmp / "node.toml")]
    key = None
    if open_mode:
        args += ["--open", "--memory"]
    else:
        key = NodeKey.load_or_create(tmp / "data")
        args += ["--data-dir", str(tmp / "data")]
    log_path = tmp / "node.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, cwd=REPO)
    assert process.stdout is not None
    try:
        buf = b""
        url = ""
        deadline = time.monotonic() + timeout
        while not url:
            left = deadline - time.monotonic()
            assert left > 0, f"node did not start: {log_path.read_text(errors='replace')}"
            ready, _, _ = select.select([process.stdout], [], [], left)
            if not ready:
                continue
            chunk = os.read(process.stdout.fileno(), 4096)
            assert chunk, f"node exited early: {log_path.read_text(errors='replace')}"
            buf += chunk
            for line in buf.decode(errors="replace").splitlines():
                if "listening on" in line:
                    url = next(w for w in line.split() if w.startswith("http")).rstrip(",")
        yield NodeProc(process, url, log_path, key)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        process.stdout.close()


def stop_gracefully(node: NodeProc) -> int:
    """SIGTERM, then the exit code (killed after 15 s)."""
    node.process.send_signal(signal.SIGTERM)
    try:
        return node.process.wait(15)
    except subprocess.TimeoutExpired:
        node.process.kill()
        node.process.wait(5)
        raise AssertionError("the node did not stop within 15 s of SIGTERM") from None


# ---- strategies ----------------------------------------------------------------------------
# Sentinels are replaced when a message is rendered: ⟦own⟧ -> a channel the fuzzing agent
# holds, ⟦deep:N⟧ -> N nested lists (spliced into the JSON text, past orjson's depth limit).

OWN, CHAT, CLOSED, FOREIGN = "⟦own⟧", "⟦chat⟧", "⟦closed⟧", "⟦foreign⟧"
ME, PEER, NODE = "⟦me⟧", "⟦peer⟧", "⟦node⟧"
DEPTHS = [2, 64, 250, 251, 252, 253, 254, 255, 300, 1023, 1024, 1025, 2000]
_TEXT_SENTINEL = re.compile(r'"⟦(deep|deepobj|bigint|bigneg)(?::(\d+))?⟧"')
_VALUE_SENTINEL = re.compile(r"^⟦(big|pings):(\d+)⟧$")

_chars = st.characters(codec="utf-8")  # no lone surrogates: they are not UTF-8
texts = st.text(_chars, max_size=24)
ints64 = st.integers(-(2**63), 2**63 - 1)
scalars = st.none() | st.booleans() | ints64 | st.floats() | texts


def _nested(kids: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(kids, max_size=4) | st.dictionaries(texts, kids, max_size=4)


json_values = st.recursive(scalars, _nested, max_leaves=10)
deep = st.sampled_from(DEPTHS).map(lambda d: f"⟦deep:{d}⟧")
deep_obj = st.sampled_from(DEPTHS).map(lambda d: f"⟦deepobj:{d}⟧")
big_ints = st.sampled_from(["⟦bigint⟧", "⟦bigneg⟧"])


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of ``choices``, each as often as its weight (``st.one_of`` drops duplicates)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


def _big(*sizes: int) -> st.SearchStrategy[str]:
    return st.sampled_from([f"⟦big:{n}⟧" for n in sizes])


refs = weighted(
    (3, st.integers(0, 1000) | st.sampled_from(["r", "x" * 128])),
    (1, st.sampled_from([-1, "x" * 129, True, 1.5, [], {}])),
    (1, ints64 | texts),
    (1, big_ints),
)
good_ids = st.sampled_from([OWN, OWN, CHAT, CLOSED, FOREIGN])
channel_ids = weighted(
    (6, good_ids),
    (1, st.sampled_from(["", "ch-", "ch-" + "0" * 32, "CH-" + "a" * 32, "ch-" + "g" * 32, "ch-" + "0" * 100])),
    (1, texts),
    (1, _big(100, 70_000)),
    (1, json_values),
)
targets = weighted(
    (6, st.sampled_from([PEER, PEER, PEER, "fz-void"])),
    (2, st.sampled_from([ME, NODE, "Gemini.aint", "", " ", "UP", "a" * 129, "-x"])),
    (1, texts),
    (1, json_values),
)


def _safe_intent(name: str) -> bool:
    """Intents of the stream and ipoll backends, or malformed names (bad_intent)."""
    try:
        return resolve_intent(name).backend in ("stream", "ipoll")
    except MuxError:
        return True


intents = weighted(
    (6, st.sampled_from(["stream", "chat", "custom:thing"])),
    (2, st.sampled_from(["push", "Stream", "chat:x", "bad intent", "", "a" * 129])),
    (1, st.just("call:voice")),  # in token mode the token refuses it before the voice backend
    (1, texts.filter(_safe_intent)),
    (1, json_values),
)
metadata = weighted(
    (4, st.dictionaries(texts, json_values, max_size=4)),
    (1, deep_obj),
    (1, st.fixed_dictionaries({"k": _big(MAX_METADATA - 10, MAX_METADATA + 10)})),
    (1, json_values),
)
payloads = weighted(
    (6, json_values),
    (1, deep),
    (1, deep_obj),
    (1, _big(MAX_PAYLOAD - 2, MAX_PAYLOAD - 1, MAX_PAYLOAD + 1, MAX_MESSAGE - 40)),
)
seqs = weighted(
    (4, st.integers(0, 20)),
    (2, st.sampled_from([-1, 2**63 - 1, -(2**63), True, False, 1.5, "1", [], {}])),
    (1, big_ints),
    (1, ints64),
)
reasons = weighted((3, st.sampled_from(["closed", "", "x" * 200, "x" * 201])), (1, texts), (1, json_values))
FIELD_NAMES = sorted({k for spec in wire.ACTIONS.values() for k in spec} | {"action", "ref"})
extras = st.dictionaries(st.sampled_from(FIELD_NAMES) | texts, json_values | channel_ids, max_size=3)
sigs = st.sampled_from(["00" * 64, "zz", "", "ab" * 100])


def _action(name: str, required: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"action": st.just(name), **required}, optional={"ref": refs, **optional})


templates: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "open": _action("open", {"target": targets}, {"intent": intents, "metadata": metadata}),
    "send": _action(
        "send",
        {"channel_id": channel_ids, "payload": payloads},
        {"enc": st.sampled_from(["base64", "hex"]) | json_values, "agent_sig": sigs, "agent_nonce": texts},
    ),
    "close": _action("close", {"channel_id": channel_ids}, {"reason": reasons}),
    "ack": _action("ack", {"channel_id": channel_ids, "seq": seqs}, {}),
    "list": _action("list", {}, {}),
    "ping": _action("ping", {}, {}),
    "resume": _action(
        "resume",
        {"token": texts | json_values},
        {"last": st.dictionaries(channel_ids.filter(lambda c: isinstance(c, str)), seqs, max_size=3) | json_values},
    ),
    "fork": _action("fork", {"channel_id": channel_ids}, {"target": targets, "intent": intents, "metadata": metadata}),
}
base64_sends = st.fixed_dictionaries(
    {
        "action": st.just("send"),
        "channel_id": st.sampled_from([OWN, CHAT]),
        "enc": st.just("base64"),
        "payload": st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())
        | st.sampled_from(["!!", "QQ", "QQ=="]),
    }
)


def _mutate(base: dict[str, Any], drops: list[int], extra: dict[str, Any], swap: Any) -> dict[str, Any]:
    out = dict(base)
    for i in drops:
        keys = sorted(out)
        if keys:
            del out[keys[i % len(keys)]]
    out.update(extra)
    if swap is not None:
        out["action"] = swap[0]
    return out


def mutated(base: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """``base`` as is (half the time) or with fields dropped, extra (or retyped) fields, or
    another ``action``."""
    swaps = st.none() | st.tuples(st.sampled_from([*wire.ACTIONS, "", "OPEN", "nope"]) | json_values)
    return base | st.builds(_mutate, base, st.lists(st.integers(0, 9), max_size=2), extras, swaps)


plain_sends = st.fixed_dictionaries(
    {"action": st.just("send"), "channel_id": st.sampled_from([OWN, CHAT]), "payload": payloads},
    optional={"ref": st.integers(0, 1000)},
)
"""Well-formed sends on the agent's own channels: frames chained, relayed, stored, acked."""
single_actions = weighted(
    *((1, mutated(t)) for t in templates.values()), (1, base64_sends), (3, plain_sends), (1, templates["open"])
)
batch_items = st.lists(
    st.one_of(single_actions, json_values, st.just({"action": "batch", "items": []})), max_size=6
) | st.sampled_from(["⟦pings:256⟧", "⟦pings:257⟧"])
actions = st.one_of(single_actions, mutated(_action("batch", {"items": batch_items}, {})))
"""JSON objects: every action's template, mutated."""

piece_sends = st.builds(
    lambda send, part, parts: {**send, "part": part, "parts": parts}, plain_sends, st.integers(0, 3), st.integers(1, 4)
)
"""Sends in pieces (``mux.pieces``), in and out of order: some finish, some are left unfinished."""
headers = weighted((2, plain_sends), (1, piece_sends), (1, mutated(templates["send"]))).map(
    lambda d: {k: v for k, v in d.items() if k != "payload"}
)
binary_payloads = weighted(
    (6, st.binary(max_size=64)), (1, st.sampled_from([MAX_PAYLOAD - 1, MAX_PAYLOAD + 1, MAX_MESSAGE - 8]))
)
header_deltas = weighted((6, st.just(0)), (1, st.sampled_from([1, -1, 5, -5, 2**31])), (1, st.integers(-12, 12)))

json_actions = st.tuples(st.just("json"), actions, st.sampled_from(["", "", "", "", "", " ", "x", "}", "\n{}"]))
messages = weighted(
    (12, json_actions),
    (1, st.tuples(st.just("json"), json_values, st.just(""))),
    (3, st.tuples(st.just("bin"), headers, binary_payloads, header_deltas)),
    (1, st.tuples(st.just("text"), st.text(_chars, max_size=64))),
    (1, st.tuples(st.just("bytes"), st.binary(max_size=64))),
    (1, st.tuples(st.just("text"), deep | _big(MAX_MESSAGE - 2, MAX_MESSAGE + 1))),
)
"""One WebSocket message, unrendered (sentinels not yet replaced)."""


@attrs.define
class Context:
    """What sentinels stand for in one example."""

    me: str
    peer: str
    node: str = "node"
    own: str = "ch-" + "1" * 32
    chat: str = "ch-" + "2" * 32
    closed: str = "ch-" + "3" * 32
    foreign: str = "ch-" + "4" * 32

    def value(self, v: Any) -> Any:
        """``v`` with value sentinels replaced (recursively)."""
        if isinstance(v, str):
            simple = {OWN: self.own, CHAT: self.chat, CLOSED: self.closed, FOREIGN: self.foreign}
            simple |= {ME: self.me, PEER: self.peer, NODE: self.node}
            if v in simple:
                return simple[v]
            m = _VALUE_SENTINEL.match(v)
            if m:
                n = int(m.group(2))
                return "x" * n if m.group(1) == "big" else [{"action": "ping"}] * n
            return v
        if isinstance(v, list):
            return [self.value(x) for x in v]
        if isinstance(v, dict):
            return {k: self.value(x) for k, x in v.items()}
        return v

    def json(self, obj: Any) -> str:
        """``obj`` as JSON text, text sentinels spliced in."""

        def splice(m: re.Match[str]) -> str:
            kind, n = m.group(1), int(m.group(2) or 0)
            if kind == "deep":
                return "[" * n + "0" + "]" * n
            if kind == "deepobj":
                return '{"a":' * n + "0" + "}" * n
            return "18446744073709551616" if kind == "bigint" else "-99999999999999999999999"

        return _TEXT_SENTINEL.sub(splice, orjson.dumps(self.value(obj)).decode())

    def render(self, spec: tuple[Any, ...]) -> str | bytes:
        """The exact WebSocket message of a ``messages`` example."""
        kind = spec[0]
        if kind == "json":
            return self.json(spec[1]) + str(spec[2])
        if kind == "bin":
            head = self.json(spec[1]).encode()
            payload = spec[2] if isinstance(spec[2], bytes) else b"\x00" * spec[2]
            n = min(max(0, len(head) + spec[3]), 2**32 - 1)
            return struct.pack(">I", n) + head + payload
        if kind == "text":
            return self.text(spec[1])
        assert kind == "bytes"
        return bytes(spec[1])

    def text(self, s: str) -> str:
        """A raw text message: a sentinel's expansion (not quoted), or ``s`` itself."""
        if _VALUE_SENTINEL.match(s):
            return str(self.value(s))
        if _TEXT_SENTINEL.fullmatch(f'"{s}"'):
            return self.json(s)
        return s


def predict(raw: str | bytes) -> MuxError | None:
    """What the node's own parser says of ``raw``: the error it raises, or None."""
    try:
        wire.parse_message(raw, MAX_MESSAGE)
    except MuxError as exc:
        return exc
    return None


def short(raw: Any, n: int = 300) -> str:
    """A bounded repr for failure messages."""
    text = repr(raw)
    return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"


# ---- checks --------------------------------------------------------------------------------


def check_error(msg: dict[str, Any], context: str) -> None:
    """An error object: documented code, a detail text, nothing else."""
    assert set(msg) <= {"error", "detail", "channel_id", "ref"}, f"odd error object {short(msg)} ({context})"
    assert msg["error"] in ALLOWED_CODES, f"undocumented error code {msg['error']!r} ({context}): {short(msg)}"
    assert isinstance(msg["detail"], str), short(msg)
    assert msg.get("ref") is None or isinstance(msg["ref"], (str, int)), short(msg)


def check_incoming(msg: dict[str, Any], context: str) -> None:
    """Anything the node sends: a documented event or a well-formed error."""
    if "error" in msg:
        check_error(msg, context)
    else:
        assert msg.get("event") in DOCUMENTED_EVENTS, f"undocumented event {short(msg)} ({context})"


def flatten(raw: str | bytes) -> list[dict[str, Any]]:
    """A received message as dicts: binary frames decoded, ``batch`` events expanded."""
    if isinstance(raw, bytes):
        header, payload = wire.unpack_binary(raw)
        return [{**header, "payload": payload}]
    msg: dict[str, Any] = orjson.loads(raw)
    if msg.get("event") == "batch" and "ref" not in msg:
        return [msg, *itertools.chain.from_iterable(flatten(orjson.dumps(i).decode()) for i in msg["items"])]
    return [msg]


@attrs.define
class Tally:
    """What a node test sent and saw."""

    examples: int = 0
    ws_messages: int = 0
    http_requests: int = 0
    connections: int = 0
    codes: collections.Counter[str] = attrs.field(factory=collections.Counter)
    statuses: collections.Counter[int] = attrs.field(factory=collections.Counter)
    events: collections.Counter[str] = attrs.field(factory=collections.Counter)
    counter: Iterator[int] = attrs.field(factory=itertools.count)
    foreign_closed: str | None = None
    """The REST request that closed the ``⟦foreign⟧`` channel, if one did: in open mode a
    ``POST /close`` naming no agent acts as the channel's opener (docs/protocol.md, "Who is
    calling"), and the examples know its id."""

    def report(self, name: str) -> str:
        """One line with the figures."""
        return (
            f"{name}: {self.examples} examples, {self.ws_messages} WebSocket messages, "
            f"{self.http_requests} HTTP requests, {self.connections} connections; "
            f"events {dict(self.events.most_common())}; error codes {dict(self.codes.most_common())}; "
            f"HTTP statuses {dict(sorted(self.statuses.items()))}"
            + (f"; the foreign channel closed by {self.foreign_closed}" if self.foreign_closed else "")
        )


# ---- the WebSocket side --------------------------------------------------------------------


@attrs.define(eq=False)
class Reader:
    """Reads one socket in the background into an unbounded queue of dicts."""

    ws: WebSocketConnection
    name: str
    tally: Tally
    acks_durable: bool = False
    send: trio.MemorySendChannel[dict[str, Any]] = attrs.field(init=False)
    recv: trio.MemoryReceiveChannel[dict[str, Any]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.send, self.recv = trio.open_memory_channel[dict[str, Any]](math.inf)

    async def run(self) -> None:
        """Read until the socket closes (then queue ``{"closed": reason}``)."""
        try:
            while True:
                raw = await self.ws.get_message()
                for msg in flatten(raw):
                    check_incoming(msg, self.name)
                    if "error" in msg:
                        self.tally.codes[msg["error"]] += 1
                    else:
                        self.tally.events[msg.get("event", "?")] += 1
                    if self.acks_durable and msg.get("event") == "frame" and _durable(msg.get("intent")):
                        await self.ws.send_message(
                            wire.dumps({"action": "ack", "channel_id": msg["channel_id"], "seq": msg["seq"]})
                        )
                    self.send.send_nowait(msg)
        except ConnectionClosed as exc:
            self.send.send_nowait({"closed": str(exc.reason)})

    async def until(
        self, pred: Callable[[dict[str, Any]], bool], what: str, node: NodeProc, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Messages up to and including the first that satisfies ``pred``."""
        got: list[dict[str, Any]] = []
        with trio.fail_after(timeout):
            while True:
                msg = await self.recv.receive()
                if "closed" in msg and "event" not in msg and "error" not in msg:
                    raise AssertionError(
                        f"{self.name}: the node closed the socket ({msg['closed']}) {what}\n--- node log\n{node.tail()}"
                    )
                got.append(msg)
                if pred(msg):
                    return got


def pong(ref: str) -> Callable[[dict[str, Any]], bool]:
    """A predicate: the ``pong`` answering ``ref``."""
    return lambda m: m.get("event") == "pong" and m.get("ref") == ref


def _durable(intent: Any) -> bool:
    try:
        return isinstance(intent, str) and resolve_intent(intent).delivery == "durable"
    except MuxError:
        return False


@attrs.define
class Credentials:
    """How an example's agents authenticate (token mode) or name themselves (open mode)."""

    key: NodeKey | None

    def ws_url(self, node: NodeProc, agent: str, **params: str) -> str:
        """The WebSocket URL of ``agent``, with a token in token mode."""
        base = node.url.replace("http", "ws", 1) + "/api/mux/ws?"
        if self.key is None:
            return base + urllib.parse.urlencode({"agent": agent, **params})
        return base + urllib.parse.urlencode({"token": self.token(agent), **params})

    def token(self, agent: str, **kw: Any) -> str:
        """A valid token for ``agent``."""
        assert self.key is not None
        return issue_token(self.key, agent, ttl_s=kw.pop("ttl_s", 600), **kw)[0]

    def headers(self, variant: str, ctx: Context) -> dict[str, str]:
        """REST credentials of a variant: ``me``, ``peer``, ``forged``, ``expired``, ``garbage``, ``none``."""
        key = self.key
        if key is None or variant == "none":
            return {}
        if variant in ("me", "peer"):
            token = self.token(ctx.me if variant == "me" else ctx.peer)
        elif variant == "forged":
            token = issue_token(NodeKey.generate(), ctx.me, ttl_s=600)[0]
        elif variant == "expired":
            token = issue_token(key, ctx.me, ttl_s=1, now_ms=int(time.time() * 1000) - 60_000)[0]
        else:
            token = "mux1.abc.def"
        return {"Authorization": f"Bearer {token}"}


connect_queries = st.fixed_dictionaries(
    {},
    optional={
        "agent": st.sampled_from([NODE, "", "a" * 129, "UP.aint", "-x"]) | texts,
        "token": st.sampled_from(["", "mux1.a.b", "x" * 5000]) | texts,
        "batch": st.sampled_from(["1", "0", "yes"]) | texts,
    },
)


async def _connect_fuzz(node: NodeProc, creds: Credentials, ctx: Context, query: dict[str, str], tally: Tally) -> None:
    """A connection with fuzzed credentials: ``connected`` or one documented error."""
    q = {k: ctx.value(v) for k, v in query.items()}
    url = node.url.replace("http", "ws", 1) + "/api/mux/ws?" + urllib.parse.urlencode(q)
    tally.connections += 1
    async with open_ws(url) as ws:
        with trio.fail_after(10):
            first = flatten(await ws.get_message())[0]
        check_incoming(first, f"connect {short(q)}")
        if "error" in first:
            tally.codes[first["error"]] += 1
            with trio.fail_after(10), contextlib.suppress(ConnectionClosed):
                await ws.get_message()  # the node closes after the error
        else:
            assert first["event"] == "connected", first
            if creds.key is None:
                assert first["agent"] == normalize_agent(q["agent"]), first


async def _send(ws: WebSocketConnection, raw: str | bytes, what: str, node: NodeProc) -> None:
    try:
        await ws.send_message(raw)
    except ConnectionClosed as exc:
        raise AssertionError(f"the node closed the socket ({exc.reason}) {what}\n--- node log\n{node.tail()}") from None


async def _request(ws: WebSocketConnection, reader: Reader, node: NodeProc, msg: dict[str, Any]) -> dict[str, Any]:
    await _send(ws, wire.dumps(msg), f"before {short(msg)}", node)
    got = await reader.until(lambda m: m.get("ref") == msg["ref"], f"after {short(msg)}", node)
    return got[-1]


async def ws_example(
    node: NodeProc,
    creds: Credentials,
    foreign: str,
    specs: list[tuple[Any, ...]],
    batching: bool,
    connects: list[dict[str, str]],
    tally: Tally,
) -> None:
    """One WebSocket example: fuzzed connections, then ``specs`` from a fresh agent."""
    n = next(tally.counter)
    tag = f"{os.getpid()}x{n}"
    ctx = Context(me=f"fz{tag}a", peer=f"fz{tag}b", foreign=foreign)
    tally.examples += 1
    for query in connects:
        await _connect_fuzz(node, creds, ctx, query, tally)
    agent_key = bytes(nacl.signing.SigningKey.generate().verify_key).hex()
    a_params = {"batch": "1"} if batching else {}
    a_url = (
        creds.ws_url(node, ctx.me, **a_params)
        if creds.key is None
        else node.url.replace("http", "ws", 1)
        + "/api/mux/ws?"
        + urllib.parse.urlencode(
            {
                "token": creds.token(ctx.me, intents=["stream", "chat", "push", "custom:*"], agent_key=agent_key),
                **a_params,
            }
        )
    )
    tally.connections += 2
    async with open_ws(a_url) as a, open_ws(creds.ws_url(node, ctx.peer)) as b, trio.open_nursery() as nursery:
        ra, rb = Reader(a, ctx.me, tally), Reader(b, ctx.peer, tally, acks_durable=True)
        nursery.start_soon(ra.run)
        nursery.start_soon(rb.run)
        for r in (ra, rb):
            hello = await r.until(lambda m: m.get("event") == "connected" or "error" in m, "at hello", node)
            assert hello[-1].get("event") == "connected", hello
        ctx.own = (await _request(a, ra, node, {"action": "open", "target": ctx.peer, "ref": "zz-1"}))["channel_id"]
        opened = await _request(a, ra, node, {"action": "open", "target": ctx.peer, "intent": "chat", "ref": "zz-2"})
        ctx.chat = opened["channel_id"]
        ctx.closed = (await _request(a, ra, node, {"action": "open", "target": "fz-void", "ref": "zz-3"}))["channel_id"]
        await _request(a, ra, node, {"action": "close", "channel_id": ctx.closed, "ref": "zz-4"})
        for i, spec in enumerate(specs):
            raw = ctx.render(spec)
            expected = predict(raw)
            parsed = None if expected is not None else wire.parse_message(raw, MAX_MESSAGE)
            sync = f"zz-sync-{i}"
            what = f"after message {i}: {short(raw)}"
            await _send(a, raw, what, node)
            await _send(a, wire.dumps({"action": "ping", "ref": sync}), what, node)
            tally.ws_messages += 2
            window = await ra.until(pong(sync), what, node)
            if expected is not None:
                matching = [m for m in window if m.get("error") == expected.code and m.get("ref") == expected.ref]
                assert matching, (
                    f"{what}: expected error {expected.code} (ref {expected.ref!r}), got {short(window, 900)}"
                )
            elif parsed is not None and parsed.ref is not None and parsed.name not in ("send", "batch", wire.SEND_PART):
                assert any(m.get("ref") == parsed.ref for m in window[:-1]), f"{what}: no answer: {short(window, 900)}"
        for ws, r, who in ((a, ra, "the fuzzing agent"), (b, rb, "the peer")):
            await _send(ws, wire.dumps({"action": "ping", "ref": "alive"}), f"({who}, at the end)", node)
            tally.ws_messages += 1
            await r.until(pong("alive"), f"({who}, at the end)", node)
        nursery.cancel_scope.cancel()


# ---- the REST side -------------------------------------------------------------------------

_ascii = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20).map(str.strip)
auths = st.sampled_from(["me", "me", "me", "peer", "forged", "expired", "garbage", "none"])
agents = weighted(
    (4, st.just(ME)), (1, st.sampled_from([PEER, NODE, "", "UP.aint", "-x"])), (1, texts), (1, json_values)
)
rest_bodies = {
    "open": st.fixed_dictionaries(
        {"target": targets}, optional={"agent": agents, "intent": intents, "metadata": metadata}
    ),
    "send": st.fixed_dictionaries({"channel_id": channel_ids, "payload": payloads}, optional={"agent": agents}),
    "close": st.fixed_dictionaries({"channel_id": channel_ids}, optional={"agent": agents, "reason": reasons}),
    "ack": st.fixed_dictionaries({"channel_id": channel_ids, "seq": seqs}, optional={"agent": agents}),
}


def _bodies(route: str) -> st.SearchStrategy[tuple[Any, ...]]:
    return weighted(
        (8, st.tuples(st.just("json"), mutated(rest_bodies[route]), st.just(""))),
        (1, st.tuples(st.just("json"), json_values, st.sampled_from(["", "x"]))),
        (1, st.tuples(st.just("bytes"), st.binary(max_size=64))),
        (1, st.tuples(st.just("text"), deep | _big(MAX_MESSAGE + 1))),
    )


posts = st.sampled_from(sorted(rest_bodies)).flatmap(
    lambda route: st.tuples(st.just("POST"), st.just("/" + route), _bodies(route), auths, st.none() | _ascii)
)
path_ids = channel_ids.filter(lambda c: c != "⟦big:70000⟧") | _big(8000, 20000)
"""Channel ids for URL paths (httpx refuses URLs over 64 KiB)."""
_segment = st.text(_chars, max_size=12)
paths = weighted(
    (2, st.sampled_from(["/channels", "/intents", "/status", "/keys", "/ws", "/", "/open", "/channel/"])),
    (
        4,
        st.tuples(st.sampled_from(["/channel/{}", "/channel/{}/frames", "/channel/{}/chain"]), path_ids).map(
            lambda t: ("cid", t[0], t[1])
        ),
    ),
    (1, st.lists(_segment, min_size=1, max_size=3).map(lambda segs: ("segs", segs))),
)
query_values = weighted(
    (3, st.sampled_from([ME, ME, PEER, "0", "3"])),
    (1, st.sampled_from(["-1", "9" * 5000, "1e400", "nan", "", "abc"])),
    (1, _segment),
)
queries = st.fixed_dictionaries(
    {},
    optional={
        "agent": query_values,
        "after": query_values,
        "limit": query_values,
        "token": query_values,
        "wait": st.sampled_from(["0", "0.01", "-5", "nan", "inf", "1e400", "abc", ""]),
    },
) | st.dictionaries(_segment.filter(lambda k: k != "wait"), query_values, max_size=3)
requests = weighted(
    (5, posts),
    (4, st.tuples(st.just("GET"), paths, queries, auths, st.none() | _ascii)),
    (
        1,
        st.tuples(
            st.sampled_from(["PUT", "DELETE", "PATCH", "GET"]),
            st.sampled_from(["/open", "/send", "/status"]),
            st.none(),
            auths,
            st.none(),
        ),
    ),
)


def _rest_path(path: Any, ctx: Context) -> str:
    if isinstance(path, str):
        return path
    if path[0] == "cid":
        cid = ctx.value(path[2])
        text = cid if isinstance(cid, str) else wire.dumps(cid)
        return str(path[1]).format(urllib.parse.quote(text, safe=""))
    return "/" + "/".join(urllib.parse.quote(s, safe="") for s in path[1])


async def _check_response(r: httpx.Response, what: str, node: NodeProc, tally: Tally) -> Any:
    tally.statuses[r.status_code] += 1
    assert r.status_code < 500, f"{what}: HTTP {r.status_code} {short(r.text)}\n--- node log\n{node.tail()}"
    if 300 <= r.status_code < 400:  # e.g. the router's redirect of "//" to "/"
        assert r.headers.get("location"), f"{what}: HTTP {r.status_code} without a Location"
        return None
    if r.status_code < 300 and r.headers.get("content-type", "").startswith("application/x-ndjson"):
        return [orjson.loads(line) for line in r.content.splitlines() if line]
    try:
        body = orjson.loads(r.content)
    except orjson.JSONDecodeError:
        raise AssertionError(f"{what}: HTTP {r.status_code} answer is not JSON: {short(r.text)}") from None
    if r.status_code >= 400:
        assert isinstance(body, dict) and "error" in body, f"{what}: {short(body)}"
        check_error(body, what)
        tally.codes[body["error"]] += 1
    return body


async def rest_example(
    node: NodeProc, creds: Credentials, foreign: str, reqs: list[tuple[Any, ...]], tally: Tally
) -> None:
    """One REST example: a fresh pair of agents, their channels, then ``reqs``."""
    n = next(tally.counter)
    tag = f"{os.getpid()}r{n}"
    ctx = Context(me=f"rz{tag}a", peer=f"rz{tag}b", foreign=foreign)
    tally.examples += 1
    opened: list[tuple[str, str, dict[str, str]]] = []  # (channel, opener, credentials)
    timeout = httpx.Timeout(10.0)
    async with httpx.AsyncClient(base_url=node.api, timeout=timeout) as c:

        async def setup(body: dict[str, Any]) -> str:
            tally.http_requests += 1
            r = await c.post("/open", json={"agent": ctx.me, **body}, headers=creds.headers("me", ctx))
            assert r.status_code == 200, r.text
            cid: str = r.json()["channel_id"]
            opened.append((cid, ctx.me, creds.headers("me", ctx)))
            return cid

        ctx.own = await setup({"target": ctx.peer})
        ctx.chat = await setup({"target": ctx.peer, "intent": "chat"})
        ctx.closed = await setup({"target": "rz-void"})
        for method, path, body, auth, agent_header in reqs:
            hdrs = creds.headers(auth, ctx)
            if agent_header is not None:
                hdrs["X-Mux-Agent"] = ctx.value(agent_header)
            kwargs: dict[str, Any] = {"headers": hdrs}
            if method == "POST" and body is not None:
                kind = body[0]
                if kind == "json":
                    content = (ctx.json(body[1]) + body[2]).encode()
                elif kind == "text":
                    content = ctx.text(body[1]).encode()
                else:
                    content = bytes(body[1])
                kwargs["content"] = content
                hdrs["Content-Type"] = "application/json"
                url = path
            elif method == "GET" and isinstance(body, dict):
                url = _rest_path(path, ctx)
                kwargs["params"] = {k: ctx.value(v) for k, v in body.items()}
            else:
                url = _rest_path(path, ctx)
            tally.http_requests += 1
            r = await c.request(method, url, **kwargs)
            what = f"{method} {url} {short(kwargs, 400)}"
            answer = await _check_response(r, what, node, tally)
            if url == "/close" and r.status_code == 200 and answer["channel_id"] == foreign:
                assert creds.key is None, f"{what} closed a channel of two other agents"
                tally.foreign_closed = what
            if method == "POST" and url == "/open" and r.status_code == 200:
                auth_only = {k: v for k, v in hdrs.items() if k == "Authorization"}
                opened.append((answer["channel_id"], answer["agent"], auth_only))
        if tally.foreign_closed is None:  # another pair's channel, the caller named: refused
            for route, extra in (("/send", {"payload": 1}), ("/close", {})):
                tally.http_requests += 1
                body = {"channel_id": foreign, "agent": ctx.me, **extra}
                r = await c.post(route, json=body, headers=creds.headers("me", ctx))
                assert (r.status_code, r.json().get("error")) == (403, "forbidden"), f"POST {route} {body}: {r.text}"
        for cid, opener, auth in opened:  # REST opens have no connection to close them
            tally.http_requests += 1
            r = await c.post("/close", json={"channel_id": cid, "agent": opener}, headers=auth)
            assert r.status_code in (200, 409), r.text  # 409: the example closed it already
        tally.http_requests += 1
        assert (await c.get("/status")).status_code == 200


# ---- the tests -----------------------------------------------------------------------------

FUZZ_SETTINGS = settings(
    deadline=None,
    report_multiple_bugs=False,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)
"""Examples against a node are not shrunk: each replay costs real round trips, and the
failure message already shows the offending message and the node's log."""


async def _foreign_channel(node: NodeProc, creds: Credentials, close: str | None = None) -> str:
    """A channel between two agents no example is (``⟦foreign⟧``); with ``close``, checks that
    channel is still open, then closes it."""
    ctx = Context(me="fx-1", peer="fx-2")
    async with httpx.AsyncClient(base_url=node.api, timeout=10) as c:
        if close is not None:  # asked first: a close is idempotent, and answers 200 again
            r = await c.get(f"/channel/{close}", params={"agent": "fx-1"}, headers=creds.headers("me", ctx))
            assert r.status_code == 200 and r.json()["state"] == "open", r.text
            r = await c.post("/close", json={"channel_id": close}, headers=creds.headers("me", ctx))
            assert r.status_code == 200, r.text
            return close
        r = await c.post("/open", json={"agent": "fx-1", "target": "fx-2"}, headers=creds.headers("me", ctx))
        assert r.status_code == 200, r.text
        cid: str = r.json()["channel_id"]
        return cid


async def _settled_status(node: NodeProc) -> dict[str, Any]:
    """``GET /status`` once connections, channels and attached agents are all gone (≤ 10 s)."""
    status: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=node.api, timeout=10) as c:
        with trio.move_on_after(10):
            while True:
                r = await c.get("/status")
                assert r.status_code == 200, r.text
                status = r.json()
                if status["connections"] == 0 and status["channels_open"] == 0 and not status["agents_attached"]:
                    break
                await trio.sleep(0.05)
    return status


def run_trio(fn: Any, *args: Any) -> Any:
    """``trio.run(fn, *args)``; a failed check comes out as its plain AssertionError (not
    wrapped in nursery exception groups), so Hypothesis sees one consistent failure."""
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        found = group.subgroup(lambda e: isinstance(e, AssertionError))
        if found is None:
            raise
        while isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]
        raise found from group


def _fuzz_node(tmp: Path, *, open_mode: bool) -> Tally:
    tally = Tally()
    with node_proc(tmp, open_mode=open_mode) as node:
        creds = Credentials(node.key)
        foreign = trio.run(_foreign_channel, node, creds)

        @settings(FUZZ_SETTINGS, max_examples=WS_EXAMPLES, phases=NO_SHRINK)
        @given(
            specs=st.lists(messages, min_size=4, max_size=24),
            batching=st.booleans(),
            connects=st.lists(connect_queries, max_size=2),
        )
        def fuzz_websocket(specs: list[tuple[Any, ...]], batching: bool, connects: list[dict[str, str]]) -> None:
            run_trio(ws_example, node, creds, foreign, specs, batching, connects, tally)

        @settings(FUZZ_SETTINGS, max_examples=REST_EXAMPLES, phases=NO_SHRINK)
        @given(reqs=st.lists(requests, min_size=4, max_size=16))
        def fuzz_rest(reqs: list[tuple[Any, ...]]) -> None:
            run_trio(rest_example, node, creds, foreign, reqs, tally)

        fuzz_websocket()
        fuzz_rest()
        if tally.foreign_closed is None:  # still open: no example could touch it; closed now
            trio.run(_foreign_channel, node, creds, foreign)
        assert node.process.poll() is None, f"the node died\n{node.tail()}"
        status = trio.run(_settled_status, node)
        assert status["connections"] == 0, status
        assert status["readers"]["connections"] == 0, status  # every session that joined the share left it
        assert status["pieces"]["sends"] == status["pieces"]["bytes"] == 0, status  # gone with their connections
        assert status["channels_open"] == 0, status  # see the module docstring
        assert status["agents_attached"] == [], status
        assert not node.problems(), "\n".join(node.problems()) + "\n--- node log\n" + node.tail()
        assert stop_gracefully(node) == 0, node.tail()
    print("\n" + tally.report(f"fuzz {'open' if open_mode else 'token'}-mode node"))
    return tally


def test_fuzz_open_mode_node_survives_and_leaks_nothing(tmp_path: Path) -> None:
    tally = _fuzz_node(tmp_path, open_mode=True)
    assert tally.ws_messages > WS_EXAMPLES and tally.http_requests > REST_EXAMPLES


def test_fuzz_token_mode_node_survives_and_leaks_nothing(tmp_path: Path) -> None:
    tally = _fuzz_node(tmp_path, open_mode=False)
    assert tally.codes["unauthenticated"] + tally.codes["bad_token"] + tally.codes["token_expired"] > 0


def test_fuzz_parser_returns_an_action_or_a_documented_error() -> None:
    ctx = Context(me="fz-me", peer="fz-peer")
    seen: collections.Counter[str] = collections.Counter()

    @settings(FUZZ_SETTINGS, max_examples=PARSER_EXAMPLES)
    @given(spec=messages)
    def fuzz(spec: tuple[Any, ...]) -> None:
        raw = ctx.render(spec)
        try:
            action = wire.parse_message(raw, MAX_MESSAGE)
        except MuxError as exc:
            assert exc.code in DOCUMENTED_CODES, f"{exc.code}: {exc} for {short(raw)}"
            assert exc.ref is None or isinstance(exc.ref, (str, int))
            seen[exc.code] += 1
            return
        assert isinstance(action, wire.Action) and action.name in (*wire.ACTIONS, wire.SEND_PART)
        if action.name == wire.SEND_PART:  # a piece of a send: the send's fields, and its place
            assert 0 <= action.get("part") < action.get("parts") <= wire.MAX_PARTS, action
            assert isinstance(action.get("payload"), bytes) and isinstance(action.get("channel_id"), str), action
        for key, (types, _required) in wire.ACTIONS["send" if action.name == wire.SEND_PART else action.name].items():
            if key in action.fields and types != (object,):
                assert isinstance(action.fields[key], types), (key, action)
        if action.name == "batch":
            try:
                items = wire.batch_items(action)
            except MuxError as exc:
                assert exc.code in DOCUMENTED_CODES, exc
                items = []
            for item in items:
                assert isinstance(item, (wire.Action, MuxError))
                if isinstance(item, MuxError):
                    assert item.code in DOCUMENTED_CODES, item
        seen["action:" + action.name] += 1

    fuzz()
    print(f"\nparser fuzz: {sum(seen.values())} messages: {dict(seen.most_common())}")
    assert seen["invalid_json"] and seen["bad_binary"] and seen["action:send"]


@pytest.fixture(scope="module")
def regression_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    """One open-mode node for the regression tests of what the fuzzers found."""
    with node_proc(tmp_path_factory.mktemp("regressions"), open_mode=True) as node:
        yield node
        assert not node.problems(), "\n".join(node.problems()) + "\n--- node log\n" + node.tail()


def test_empty_binary_message_gets_an_error_and_the_socket_lives(regression_node: NodeProc) -> None:
    """Found by fuzzing: Quart hands an empty binary message to the app as None, and
    ``WireSession.handle(None)`` raised TypeError, which killed the connection."""

    async def probe() -> None:
        url = regression_node.url.replace("http", "ws", 1) + "/api/mux/ws?agent=empty-binary"
        async with open_ws(url) as ws:
            await ws.get_message()
            for message in (b"", "", b"\x00"):
                await _send(ws, message, f"after {message!r}", regression_node)
                with trio.fail_after(5):
                    try:
                        answer = orjson.loads(await ws.get_message())
                    except ConnectionClosed as exc:
                        raise AssertionError(f"the node closed the socket on {message!r}: {exc.reason}") from None
                assert answer["error"] in ("bad_binary", "invalid_json"), answer
            await ws.send_message('{"action":"ping","ref":"alive"}')
            with trio.fail_after(5):
                assert orjson.loads(await ws.get_message())["event"] == "pong"

    trio.run(probe)


def test_an_unnamed_rest_close_acts_as_the_opener_in_open_mode(regression_node: NodeProc) -> None:
    """Found by fuzzing (the test's own mistake, not the node's): a REST example closed the
    ``⟦foreign⟧`` channel with a ``POST /close`` naming no agent, which on an open-mode node acts
    as the channel's opener (docs/protocol.md, "Who is calling"); the test's own close of it at
    the end then failed, once later closes had pushed it out of the node's lookups. A caller
    that names itself and is no end is still refused."""

    async def probe() -> None:
        async with httpx.AsyncClient(base_url=regression_node.api, timeout=10) as c:
            r = await c.post("/open", json={"agent": "unnamed-a", "target": "unnamed-b"})
            assert r.status_code == 200, r.text
            cid = r.json()["channel_id"]
            for body, headers in (({"agent": "unnamed-x"}, {}), ({}, {"X-Mux-Agent": "unnamed-x"})):
                r = await c.post("/close", json={"channel_id": cid, **body}, headers=headers)
                assert (r.status_code, r.json()["error"]) == (403, "forbidden"), r.text
            r = await c.get(f"/channel/{cid}", params={"agent": "unnamed-b"})
            assert r.json()["state"] == "open", r.text
            r = await c.post("/close", json={"channel_id": cid, "reason": "by id"})
            assert r.status_code == 200 and r.json()["reason"] == "by id", r.text
            closed = r.json()
            r = await c.get(f"/channel/{cid}", params={"agent": "unnamed-b"})
            assert r.json()["state"] == "closed", r.text
            r = await c.post("/close", json={"channel_id": cid})  # idempotent: the same close frame
            assert r.status_code == 200 and r.json() == closed, r.text

    trio.run(probe)


def test_every_http_error_is_json(regression_node: NodeProc) -> None:
    """Found by fuzzing: a plain GET of the WebSocket route answered an HTML 400 page."""

    async def probe() -> None:
        async with httpx.AsyncClient(base_url=regression_node.api, timeout=10) as c:
            for method, path in (("GET", "/ws"), ("POST", "/ws"), ("GET", "/nope"), ("DELETE", "/open")):
                r = await c.request(method, path)
                assert r.headers.get("content-type", "").startswith("application/json"), (method, path, r.text)
                assert orjson.loads(r.content)["error"] in ALLOWED_CODES

    trio.run(probe)


def test_deeply_nested_json_is_refused_or_served(regression_node: NodeProc) -> None:
    """Found by fuzzing: JSON nested just under orjson's depth limit (254) was accepted as
    metadata or payload, and every later answer that re-encodes it one level deeper failed:
    ``list`` killed the WebSocket, ``GET /channels`` and ``GET /channel/{id}/frames`` said 500.
    Either refuse it with a documented code or serve it; never fail later."""
    json_headers = {"Content-Type": "application/json"}

    async def probe(node: NodeProc) -> None:
        async with httpx.AsyncClient(base_url=node.api, timeout=10) as c:
            for depth in range(244, 258):
                me, peer = f"deep{depth}a", f"deep{depth}b"
                meta = '{"a":' * depth + "0" + "}" * depth
                body = f'{{"agent":"{me}","target":"{peer}","metadata":{meta}}}'
                r = await c.post("/open", content=body, headers=json_headers)
                assert r.status_code == 200 or r.json()["error"] in DOCUMENTED_CODES, r.text
                opened = [r.json()["channel_id"]] if r.status_code == 200 else []
                r = await c.post("/open", json={"agent": me, "target": peer})  # shallow metadata
                assert r.status_code == 200, r.text
                cid = r.json()["channel_id"]
                opened.append(cid)
                payload = "[" * depth + "0" + "]" * depth
                r = await c.post(
                    "/send",
                    content=f'{{"agent":"{me}","channel_id":"{cid}","payload":{payload}}}',
                    headers=json_headers,
                )
                assert r.status_code == 200 or r.json()["error"] in DOCUMENTED_CODES, r.text
                for path, agent in (
                    ("/channels", me),
                    *((f"/channel/{c_id}", me) for c_id in opened),
                    *((f"/channel/{c_id}/frames", peer) for c_id in opened),
                ):
                    r = await c.get(path, params={"agent": agent})
                    assert r.status_code == 200, f"depth {depth}: GET {path}: {r.status_code} {short(r.text)}"
                for c_id in opened:
                    assert (await c.post("/close", json={"channel_id": c_id})).status_code == 200
                url = node.url.replace("http", "ws", 1) + f"/api/mux/ws?agent={me}"
                async with open_ws(url) as ws:
                    await ws.get_message()
                    await ws.send_message(f'{{"action":"open","target":"{peer}","metadata":{meta},"ref":1}}')
                    with trio.fail_after(5):
                        answer = orjson.loads(await ws.get_message())
                    assert answer.get("event") == "channel_opened" or answer["error"] in DOCUMENTED_CODES, answer
                    await ws.send_message('{"action":"list","ref":2}')
                    try:
                        with trio.fail_after(5):
                            listed = orjson.loads(await ws.get_message())
                    except ConnectionClosed:
                        raise AssertionError(f"depth {depth}: the node closed the socket on list") from None
                    assert listed.get("event") == "channel_list", listed

    trio.run(probe, regression_node)
