"""Settings are checked (``mux.checks``): a node refuses an unknown key, a value of the wrong
type or out of range, in code, in ``serve --config``'s TOML, in ``MUX_*`` variables and in
flags, with one line naming the setting (``bad_config``); a WebSocket flag parameter with a
value the node does not know is refused (``bad_request``) instead of leaving the feature off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from mux.client import open_ws
from mux.config import MuxConfig, configured_registry
from mux.errors import BadRequest, BadSetting
from mux.intents import BandwidthPolicy
from mux.settings import NodeSettings

from .nodes import serve_node
from .wsutil import recv, ws_url


@pytest.mark.parametrize("cls", [MuxConfig, NodeSettings, BandwidthPolicy])
def test_every_setting_has_a_check(cls: type) -> None:
    unchecked = [f.name for f in attrs.fields(cls) if f.validator is None]
    assert not unchecked, f"{cls.__name__} fields without a check: {unchecked}"


BAD = [
    (MuxConfig, "sign_every", 0, "sign_every must be at least 1, not 0"),
    (MuxConfig, "sign_every", 2.5, "sign_every must be a whole number, not float 2.5"),
    (MuxConfig, "sign_every", True, "sign_every must be a whole number, not true/false True"),
    (MuxConfig, "sign_within_ms", 0, "sign_within_ms must be above 0, not 0"),
    (MuxConfig, "sign_within_ms", float("nan"), "sign_within_ms must be above 0, not nan"),
    (MuxConfig, "channel_buffer_frames", -1, "channel_buffer_frames must be at least 1, not -1"),
    (MuxConfig, "connection_buffer_bytes", "16MiB", "must be a whole number, not str '16MiB'"),
    (MuxConfig, "realtime_bulk_rate", -5, "realtime_bulk_rate must be at least 0, not -5"),
    (MuxConfig, "realtime_bulk_gaps", "yes", "realtime_bulk_gaps must be true or false, not str 'yes'"),
    (MuxConfig, "pieces_idle_s", -0.5, "pieces_idle_s must be at least 0, not -0.5"),
    (MuxConfig, "backends", {"mail": "smtp://x"}, "backends must be a table of tables ('mail' is not a table)"),
    (BandwidthPolicy, "priority", -1, "priority must be at least 0, not -1"),
    (BandwidthPolicy, "burst", 1.5, "burst must be a whole number, not float 1.5"),
    (NodeSettings, "port", 70000, "port must be 0 to 65535, not 70000"),
    (NodeSettings, "send_timeout_s", 0, "send_timeout_s must be above 0, not 0"),
    (NodeSettings, "tcp_keepalive_s", 40000, "tcp_keepalive_s must be 0 to 32767, not 40000"),
    (NodeSettings, "tcp_keepalive_s", 2.5, "tcp_keepalive_s must be a whole number, not float 2.5"),
    (NodeSettings, "listen_backlog", 0, "listen_backlog must be 1 to 1048576, not 0"),
    (NodeSettings, "rate_messages_per_s", -1, "rate_messages_per_s must be at least 0, not -1"),
    (NodeSettings, "open_mode", 1, "open_mode must be true or false, not int 1"),
    (NodeSettings, "prefix", "api/mux", "prefix must be a path that starts with /, not str 'api/mux'"),
    (NodeSettings, "host", 127, "host must be text, not int 127"),
    (NodeSettings, "mux", {"sign_every": 2}, "mux must be a MuxConfig, not dict {'sign_every': 2}"),
]


@pytest.mark.parametrize(("cls", "name", "value", "message"), BAD, ids=[f"{c.__name__}.{n}" for c, n, _, _ in BAD])
def test_a_bad_value_is_refused_by_name(cls: type, name: str, value: Any, message: str) -> None:
    fields = {"priority": 1, "rate": 0, "burst": 0, "preemptible": True} if cls is BandwidthPolicy else {}
    with pytest.raises(BadSetting) as caught:
        cls(**{**fields, name: value})
    assert message in str(caught.value)
    assert caught.value.code == "bad_config" and caught.value.setting == name
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, BadRequest)


def test_the_documented_off_values_and_whole_numbers_for_seconds_are_accepted() -> None:
    cfg = MuxConfig(readers_buffer_bytes=0, pieces_max_bytes=0, pieces_idle_s=0, closed_retention=0)
    cfg = attrs.evolve(cfg, realtime_bulk_rate=0, realtime_bulk_window=0, sign_within_ms=50, mailbox_max_age_s=60)
    assert cfg.sign_within_ms == 50
    s = NodeSettings(port=0, rate_messages_per_s=0, writer_idle_s=0, trim_after_closes=0, send_timeout_s=1)
    assert (s.port, s.send_timeout_s, s.data_dir) == (0, 1, "mux-data")
    assert NodeSettings(data_dir=None, longpoll_max_s=float("inf")).data_dir is None


def test_a_setting_changed_later_is_checked_too() -> None:
    s = NodeSettings()
    with pytest.raises(BadSetting, match="max_channels_per_agent must be at least 1, not 0"):
        s.mux.max_channels_per_agent = 0
    assert s.mux.max_channels_per_agent == 32, "the old value stays"
    s.mux.sign_every = 16
    assert s.mux.sign_every == 16


def test_certfile_and_keyfile_go_together() -> None:
    with pytest.raises(BadSetting, match="certfile and keyfile go together"):
        NodeSettings(certfile="cert.pem")
    assert NodeSettings(certfile="c.pem", keyfile="k.pem").tls


def test_an_intent_policy_out_of_range_names_the_intent() -> None:
    with pytest.raises(BadSetting, match=r"intent_policies\['file:sync'\]: rate must be at least 0, not -1"):
        configured_registry(MuxConfig(intent_policies={"file:sync": {"rate": -1}}))
    with pytest.raises(BadSetting, match=r"intent_policies\['chat'\]: .*priority"):
        configured_registry(MuxConfig(intent_policies={"chat": {"priority": "high"}}))
    with pytest.raises(BadSetting, match="preemptible must be true or false"):
        BandwidthPolicy(1, 0, 0, preemptible="no")
    lifted = configured_registry(MuxConfig(intent_policies={"file:sync": {"rate": 0}}))
    assert lifted.resolve("file:sync").policy.rate == 0


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[mux]\nsign_every = 0\n", "node.toml: [mux] sign_every must be at least 1, not 0"),
        ('[mux]\nsign_every = "16"\n', "node.toml: [mux] sign_every must be a whole number, not str '16'"),
        ("[mux]\nsign_evry = 16\n", "node.toml: unknown settings [mux] sign_evry"),
        ("porrt = 1\nhostt = 2\n", "node.toml: unknown settings hostt, porrt"),
        ("[mux]\nmux = 1\n", "node.toml: unknown settings [mux] mux"),
        ("port = -1\n", "node.toml: port must be 0 to 65535, not -1"),
        ("mux = 3\n", "node.toml: mux must be a table ([mux]), not 3"),
        ("[mux\n", "node.toml: not valid TOML"),
        ('[backends]\nmail = "smtp"\n', "node.toml: [mux] backends must be a table of tables"),
    ],
)
def test_a_bad_toml_file_names_itself_and_the_setting(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(BadSetting) as caught:
        NodeSettings.from_toml(_toml(tmp_path, text))
    assert message in str(caught.value)


def test_toml_values_then_flags(tmp_path: Path) -> None:
    path = _toml(tmp_path, "port = 9000\nsend_timeout_s = 3\n[mux]\nsign_every = 8\nsign_within_ms = 20\n")
    s = NodeSettings.from_toml(path, port=9001, host=None)
    assert (s.port, s.host, s.send_timeout_s, s.mux.sign_every, s.mux.sign_within_ms) == (9001, "127.0.0.1", 3, 8, 20)
    with pytest.raises(BadSetting, match=r"^port must be 0 to 65535, not 99999$"):  # a flag's: no file named
        NodeSettings.from_toml(path, port=99999)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MUX_PORT": "abc"}, "MUX_PORT must be a whole number, not 'abc'"),
        ({"MUX_PORT": "70000"}, "MUX_PORT: port must be 0 to 65535, not 70000"),
        ({"MUX_SEND_TIMEOUT_S": "soon"}, "MUX_SEND_TIMEOUT_S must be a number, not 'soon'"),
        ({"MUX_OPEN_MODE": "maybe"}, "MUX_OPEN_MODE must be true or false"),
        ({"MUX_PREFIX": "mux"}, "MUX_PREFIX: prefix must be a path that starts with /"),
    ],
)
def test_a_bad_environment_variable_is_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(BadSetting) as caught:
        NodeSettings.from_env(env)
    assert message in str(caught.value)


def test_environment_values_parse_by_type() -> None:
    s = NodeSettings.from_env(
        {"MUX_OPEN_MODE": "yes", "MUX_RATE_MESSAGES_PER_S": "0.5", "MUX_MEMORY_LEDGER_BYTES": "1048576"}, agent="n1"
    )
    assert (s.open_mode, s.rate_messages_per_s, s.memory_ledger_bytes, s.agent) == (True, 0.5, 1 << 20, "n1")
    assert NodeSettings.from_env({"MUX_OPEN_MODE": "off"}).open_mode is False


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mux", "serve", "--port", "0", "--memory", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_serve_stops_at_once_with_one_line(tmp_path: Path) -> None:
    done = _serve("--config", str(_toml(tmp_path, "[mux]\nchannel_buffer_frames = -1\n")))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: bad_config: {tmp_path / 'node.toml'}: [mux] channel_buffer_frames must be at least 1, not -1"
    )
    assert "listening" not in done.stdout
    done = _serve(env={"MUX_SEND_TIMEOUT_S": "0"})
    assert done.returncode == 2
    assert done.stderr.strip() == "error: bad_config: MUX_SEND_TIMEOUT_S: send_timeout_s must be above 0, not 0.0"
    done = _serve("--max-channels", "0")
    assert done.returncode == 2 and "argument --max-channels: must be at least 1, not 0" in done.stderr


@pytest.mark.parametrize("query", ["&batch=enabled", "&batch=2", "&resumable=y", "&resumable=on", "&probes=please"])
async def test_a_flag_parameter_the_node_does_not_know_is_refused(nursery: trio.Nursery, query: str) -> None:
    info = await serve_node(nursery)
    name = query[1:].split("=")[0]
    async with open_ws(ws_url(info.url, "alice") + query) as ws:
        refusal = await recv(ws)
        assert refusal["error"] == "bad_request" and f"?{name}= must be 1, true or yes" in refusal["detail"]


@pytest.mark.parametrize(
    ("query", "resumable"), [("&resumable=yes&batch=true", True), ("&resumable=0&batch=no", False)]
)
async def test_the_flag_parameters_the_node_knows(nursery: trio.Nursery, query: str, resumable: bool) -> None:
    info = await serve_node(nursery)
    async with open_ws(ws_url(info.url, "alice") + query) as ws:
        hello = await recv(ws)
        assert hello["event"] == "connected" and ("resume_token" in hello) == resumable
