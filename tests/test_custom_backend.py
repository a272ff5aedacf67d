"""Third-party backends: registered in code, installed as a package (entry point), missing."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

import backends
from backends import registry
from backends.base import Disposition
from mux.client import MuxClient, connect
from mux.errors import BadRequest, MuxError
from mux.server import ServeInfo

if TYPE_CHECKING:
    from mux.channel import ChannelContext
    from mux.frames import Frame

DOCS = Path(__file__).resolve().parent.parent / "docs" / "backends.md"


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Registrations and entry points of this test stay in this test: the process-wide
    registry is swapped for a copy and entry points are looked up again on first use."""
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    yield
    sys.modules.pop("mqtt_backend", None)


def node_mux(server: ServeInfo) -> Any:
    """The running node's Mux (to register intents on it, as an operator's code would)."""
    m = server.node.mux
    assert m is not None
    return m


class UpperBackend:
    """Answers every frame sent to the node with the same text upper-cased."""

    name = "upper"

    def __init__(self, mux: Any) -> None:
        self.mux = mux

    def check_open(self, ctx: ChannelContext) -> None:
        if ctx.target != ctx.mux.agent:
            raise BadRequest("upper channels go to the node", code="bad_target")
        ctx.state.extra["answered"] = 0

    async def run(self, ctx: ChannelContext) -> None:
        """Nothing in the background."""

    def admit(self, ctx: ChannelContext, sender: str, size: int) -> None:
        ctx.require_room(ctx.agent)

    def on_frame(self, ctx: ChannelContext, frame: Frame) -> Disposition:
        payload = frame.payload
        ctx.emit(payload.upper() if isinstance(payload, str) else {"error": "send text"}, to=ctx.agent)
        ctx.state.extra["answered"] += 1
        return Disposition.CONSUMED

    def on_close(self, ctx: ChannelContext, reason: str) -> None:
        """Nothing held."""


async def test_a_backend_registered_in_code_serves_its_intent(server: ServeInfo, isolated_registry: None) -> None:
    backends.register_backend("upper", UpperBackend)
    assert "upper" in backends.available_backends()
    node_mux(server).register_intent("shout", backend="upper", description="Upper-cases text")
    with trio.fail_after(20):
        async with connect(server.url, "alice") as alice:
            ch = await alice.open("node", "shout:loud")  # sub-intents resolve by prefix
            assert ch.route == {"backend": "upper", "description": "Upper-cases text"}
            for text in ("hello", "mux ✓"):
                await ch.send(text)
                frame = await ch.receive()
                assert (frame["payload"], frame["sender"]) == (text.upper(), "node")
                alice.verify(frame)  # backend-made frames are signed and chained like any other
            listed = next(c for c in await alice.list() if c["channel_id"] == ch.id)
            assert listed["backend_state"] == {"answered": 2}
            with pytest.raises(BadRequest) as info:
                await alice.open("bob", "shout")
            assert info.value.code == "bad_target"
            await ch.close()


def documented_example() -> str:
    """The ``mqtt_backend.py`` of docs/backends.md ("Writing a backend"), verbatim."""
    text = DOCS.read_text(encoding="utf-8")
    start = text.index("```python\n# mqtt_backend.py\n") + len("```python\n")
    return text[start : text.index("```", start)]


def install_fake_distribution(root: Path) -> None:
    """What ``pip install`` of a package shipping the example leaves on sys.path."""
    (root / "mqtt_backend.py").write_text(documented_example(), encoding="utf-8")
    info = root / "mqtt_backend-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mqtt-backend\nVersion: 1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text("[mux.backends]\nmqtt = mqtt_backend:MqttBackend\n", encoding="utf-8")


async def test_an_entry_point_backend_serves_iot_sensor(
    server: ServeInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_registry: None
) -> None:
    install_fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    factory = backends.get_backend_factory("mqtt")
    assert factory is not None and factory.__module__ == "mqtt_backend" and factory.__name__ == "MqttBackend"
    assert "mqtt" in backends.available_backends()

    node_mux(server).register_intent("iot:sensor", backend="mqtt", description="IoT sensor data")
    with trio.fail_after(20):
        async with connect(server.url, "thermo") as thermo, connect(server.url, "hub") as hub:
            with pytest.raises(MuxError) as refused:
                await thermo.open("hub", "iot:sensor", {"topic": "home/#"})
            assert refused.value.code == "bad_topic"

            ch = await thermo.open("hub", "iot:sensor:temp", {"topic": "home/kitchen/temp"})
            assert ch.route == {"backend": "mqtt", "description": "IoT sensor data"}  # no fallback
            sub = await hub.accept()
            assert sub.id == ch.id and sub.metadata == {"topic": "home/kitchen/temp"}
            for value in (20, 21):
                ack = await ch.send({"c": value})
                assert ack["disposition"] == "delivered"
                assert (await sub.receive())["payload"] == {"c": value}
            with pytest.raises(MuxError) as ro:
                await sub.send({"c": 99})  # subscribers only listen: refused before chaining
            assert ro.value.code == "read_only"
            with MuxClient(server.url, "thermo") as rest:
                info = await trio.to_thread.run_sync(rest.channel, ch.id)
            assert info["backend_state"] == {"topic": "home/kitchen/temp", "published": 2, "last": {"c": 21}}
            assert info["seq"] == 2  # open + two readings: the refused frame was never chained
            await ch.close()
            # the retained reading outlives the channel: the next one starts from it
            again = await thermo.open("hub", "iot:sensor", {"topic": "home/kitchen/temp"})
            listed = next(c for c in await thermo.list() if c["channel_id"] == again.id)
            assert listed["backend_state"]["last"] == {"c": 21}
            await again.close()


async def test_an_intent_whose_backend_is_missing_falls_back_to_stream(
    server: ServeInfo, isolated_registry: None
) -> None:
    assert backends.get_backend_factory("zigbee") is None
    node_mux(server).register_intent("iot:zigbee", backend="zigbee", description="Zigbee devices")
    with trio.fail_after(20):
        async with connect(server.url, "lamp") as lamp, connect(server.url, "hub") as hub:
            ch = await lamp.open("hub", "iot:zigbee:bulb")
            fallback = {"backend": "zigbee", "description": "Zigbee devices", "served_by": "stream", "fallback": True}
            assert ch.route == fallback
            theirs = await hub.accept()
            assert theirs.route == fallback
            await ch.send({"on": True})  # relayed live by the generic stream backend
            assert (await theirs.receive())["payload"] == {"on": True}
            with MuxClient(server.url, "lamp") as rest:
                info = await trio.to_thread.run_sync(rest.channel, ch.id)
            assert info["route"] == fallback
            await ch.close()
