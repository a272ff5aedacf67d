"""The intents table, prefix resolution, unknown intents and custom registration."""

from __future__ import annotations

import pytest

import mux
from mux.errors import BadRequest
from mux.intents import DEFAULT_POLICY

# The 1.0.0 table from DESIGN.md: intent, backend, priority, rate, burst, preemptible.
TABLE = [
    ("call:voice", "voice", 0, 128000, 32000, False),
    ("call:video", "webrtc", 1, 2000000, 500000, False),
    ("tibet:ping", "tping", 2, 10000, 5000, False),
    ("chat", "ipoll", 3, 50000, 20000, False),
    ("push", "ipoll", 3, 50000, 20000, False),
    ("task", "ipoll", 4, 100000, 50000, True),
    ("sync", "ipoll", 4, 200000, 100000, True),
    ("session", "phantom", 5, 500000, 200000, True),
    ("tibet:token", "tibet", 5, 50000, 20000, True),
    ("mail", "mail", 6, 500000, 200000, True),
    ("file:sync", "sync", 7, 1000000, 500000, True),
    ("vpn:tunnel", "overlay", 8, 0, 0, True),
    ("stream", "stream", 8, 0, 0, True),
]


@pytest.mark.parametrize(("name", "backend", "prio", "rate", "burst", "preempt"), TABLE)
def test_builtin_intent_route_and_policy(
    name: str, backend: str, prio: int, rate: int, burst: int, preempt: bool
) -> None:
    intent = mux.resolve_intent(name)
    assert intent.matched == name
    assert intent.backend == backend
    assert mux.INTENT_ROUTES[name].backend == backend
    assert intent.policy == mux.BandwidthPolicy(prio, rate, burst, preempt)
    assert mux.BANDWIDTH_POLICIES[name] == intent.policy


def test_table_is_exactly_the_thirteen_builtins() -> None:
    assert sorted(mux.INTENT_ROUTES) == sorted(row[0] for row in TABLE)
    assert {mux.resolve_intent(n).delivery for n in ("call:voice", "call:video")} == {"realtime"}
    assert {mux.resolve_intent(n).delivery for n in ("chat", "push", "task", "sync", "mail")} == {"durable"}


def test_longest_prefix_wins() -> None:
    i = mux.resolve_intent("call:voice:opus")
    assert (i.name, i.matched, i.backend) == ("call:voice:opus", "call:voice", "voice")
    assert mux.resolve_intent("chat:group:42").matched == "chat"
    assert mux.resolve_intent("file:sync:delta:v2").matched == "file:sync"
    assert mux.resolve_intent("CALL:Video").matched == "call:video"


def test_unknown_intent_is_generic_with_default_policy() -> None:
    for name in ("weather", "call", "filex:sync", "x:y:z"):
        i = mux.resolve_intent(name)
        assert i.backend == "stream"
        assert i.matched == "*"
        assert i.policy == DEFAULT_POLICY == mux.BandwidthPolicy(5, 200000, 100000, True)


@pytest.mark.parametrize("bad", ["", " ", ":chat", "chat:", "a b", "x" * 200, "chat::x"])
def test_malformed_intent_refused(bad: str) -> None:
    with pytest.raises(BadRequest) as info:
        mux.resolve_intent(bad)
    assert info.value.code == "bad_intent"


async def test_custom_intent_registration(node: mux.Mux) -> None:
    node.register_intent("iot:sensor", backend="mqtt", description="IoT sensor data")
    i = node.resolve("iot:sensor:temp")
    assert (i.matched, i.backend, i.route.description) == ("iot:sensor", "mqtt", "IoT sensor data")
    assert any(d["intent"] == "iot:sensor" for d in node.intents())
    # the module-level table is untouched: registrations are per Mux
    assert mux.resolve_intent("iot:sensor").backend == "stream"
    # the backend is not installed: the channel is served by the generic relay and says so
    ch = await node.open(target="thermo", intent="iot:sensor", agent="hub")
    assert ch.route == {"backend": "mqtt", "description": "IoT sensor data", "served_by": "stream", "fallback": True}


async def test_node_can_override_an_intent_policy() -> None:
    async with mux.open_mux(agent="n", intent_policies={"file:sync": {"rate": 0}, "chat": {"burst": 99}}) as m:
        fs = m.resolve("file:sync")
        assert (fs.backend, fs.policy.rate, fs.policy.priority) == ("sync", 0, 7)
        assert m.resolve("chat").policy == mux.BandwidthPolicy(3, 50000, 99, False)
        assert m.resolve("chat").delivery == "durable"
    with pytest.raises(mux.BadRequest):
        async with mux.open_mux(agent="n", intent_policies={"chat": {"speed": 1}}):
            pass
