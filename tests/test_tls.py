"""TLS 1.3 end to end: the dev certificate, the handshake, HTTP/2, wss, and a real subprocess node.

Every connection goes to 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio_websocket
from cryptography import x509
from cryptography.hazmat.primitives import hashes

import mux
from mux.server import ServeInfo
from mux.tls import client_ssl_context, write_self_signed

from .nodes import serve_node

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cert(tmp_path: Path) -> tuple[str, str]:
    """A fresh self-signed certificate and key for 127.0.0.1 and localhost."""
    certfile, keyfile = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    write_self_signed(certfile, keyfile, hosts=["127.0.0.1", "localhost"], days=2)
    return str(certfile), str(keyfile)


@pytest.fixture
async def tls_server(nursery: trio.Nursery, cert: tuple[str, str]) -> AsyncIterator[ServeInfo]:
    """A real in-process Hypercorn node speaking TLS 1.3 on a free loopback port."""
    certfile, keyfile = cert
    yield await serve_node(nursery, certfile=certfile, keyfile=keyfile)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


async def _handshake(port: int, ctx: ssl.SSLContext) -> tuple[str | None, str | None]:
    """TLS handshake with the node: the negotiated (version, ALPN protocol). Always closes the socket."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1")
    try:
        await stream.do_handshake()
        return stream.version(), stream.selected_alpn_protocol()
    finally:
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def _open_wss(port: int, agent: str, ctx: ssl.SSLContext) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A wss client to the node as ``agent``, over a TLS stream this helper owns and always closes.

    (trio-websocket's own client does not close its stream when the server ends the connection,
    which leaves an unclosed socket behind after a node shutdown.)
    """
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1", https_compatible=True)
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(nursery, stream, "127.0.0.1", f"/api/mux/ws?agent={agent}")
            try:
                yield ws
            finally:
                with trio.move_on_after(2, shield=True):
                    await ws.aclose()
                await trio.aclose_forcefully(stream)  # ends the reader task in any case
    finally:
        await trio.aclose_forcefully(stream)


async def _get_json(ws: trio_websocket.WebSocketConnection, timeout: float = 5.0) -> dict[str, Any]:
    with trio.fail_after(timeout):
        message = await ws.get_message()
    assert isinstance(message, str), message
    data = orjson.loads(message)
    assert isinstance(data, dict)
    return data


async def _wait_event(ws: trio_websocket.WebSocketConnection, event: str, timeout: float = 5.0) -> dict[str, Any]:
    """Skip other events until ``event`` arrives (an error event fails the test)."""
    with trio.fail_after(timeout):
        while True:
            data = await _get_json(ws, timeout)
            assert "error" not in data, data
            if data.get("event") == event:
                return data


async def _channel_pair(
    alice: trio_websocket.WebSocketConnection, bob: trio_websocket.WebSocketConnection
) -> tuple[str, dict[str, Any]]:
    """Alice opens a chat channel to bob; both ends see ``channel_opened``."""
    await alice.send_message(orjson.dumps({"action": "open", "target": "bob", "intent": "chat", "ref": 1}).decode())
    opened = await _wait_event(alice, "channel_opened")
    assert opened["role"] == "opener" and opened["ref"] == 1 and opened["target"] == "bob"
    told = await _wait_event(bob, "channel_opened")
    assert told["role"] == "target" and told["channel_id"] == opened["channel_id"]
    return opened["channel_id"], opened


# ---- the certificate -------------------------------------------------------------------------


def test_write_self_signed(tmp_path: Path) -> None:
    certfile, keyfile = tmp_path / "a" / "b" / "cert.pem", tmp_path / "k" / "key.pem"
    keyfile.parent.mkdir()
    keyfile.write_text("old")
    keyfile.chmod(0o644)
    info = write_self_signed(certfile, keyfile, hosts=["localhost", "127.0.0.1", "::1"], days=3)
    assert stat.S_IMODE(os.stat(keyfile).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(certfile.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert cert.subject.rfc4514_string() == "CN=localhost"
    assert info["sha256_fingerprint"] == cert.fingerprint(hashes.SHA256()).hex()
    assert info["not_after"] == cert.not_valid_after_utc.isoformat()
    assert info["hosts"] == ["localhost", "127.0.0.1", "::1"]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert abs(lifetime.total_seconds() - (3 * 86400 + 60)) < 5
    assert keyfile.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_cli_cert(tmp_path: Path) -> None:
    certfile, keyfile = tmp_path / "out" / "c.pem", tmp_path / "out" / "k.pem"
    done = subprocess.run(
        [sys.executable, "-m", "mux", "cert", "--json", "--certfile", str(certfile), "--keyfile", str(keyfile)]
        + ["--host", "localhost", "--host", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    info = orjson.loads(done.stdout)
    assert info["hosts"] == ["localhost", "127.0.0.1"]
    assert certfile.is_file() and keyfile.is_file()
    assert stat.S_IMODE(os.stat(keyfile).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(certfile.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert info["sha256_fingerprint"] == cert.fingerprint(hashes.SHA256()).hex()


# ---- in-process TLS node ---------------------------------------------------------------------


async def test_tls13_handshake_and_alpn(tls_server: ServeInfo, cert: tuple[str, str]) -> None:
    assert tls_server.url.startswith("https://127.0.0.1:")
    port = _port(tls_server.url)
    ctx = client_ssl_context(cert[0])
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with trio.fail_after(5):
        assert await _handshake(port, ctx) == ("TLSv1.3", "h2")
    # http/1.1 alone is offered: the node takes it.
    ctx11 = client_ssl_context(cert[0])
    ctx11.set_alpn_protocols(["http/1.1"])
    with trio.fail_after(5):
        assert await _handshake(port, ctx11) == ("TLSv1.3", "http/1.1")


async def test_tls12_client_refused(tls_server: ServeInfo, cert: tuple[str, str]) -> None:
    ctx = client_ssl_context(cert[0])
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as excinfo:
        await _handshake(_port(tls_server.url), ctx)
    assert isinstance(excinfo.value.__cause__, ssl.SSLError), excinfo.value.__cause__


async def test_untrusted_certificate_rejected_by_client(tls_server: ServeInfo, tmp_path: Path) -> None:
    """A client that trusts another certificate refuses the node (verification really happens)."""
    other = tmp_path / "other.pem"
    write_self_signed(other, tmp_path / "other-key.pem", hosts=["127.0.0.1"])
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as excinfo:
        await _handshake(_port(tls_server.url), client_ssl_context(other))
    assert isinstance(excinfo.value.__cause__, ssl.SSLCertVerificationError)


async def test_http2_status_over_tls(tls_server: ServeInfo, cert: tuple[str, str]) -> None:
    async with httpx.AsyncClient(http2=True, verify=client_ssl_context(cert[0]), timeout=5) as client:
        with trio.fail_after(10):
            r = await client.get(f"{tls_server.url}/api/mux/status")
            keys = await client.get(f"{tls_server.url}/api/mux/keys")
    assert r.status_code == 200
    assert r.http_version == "HTTP/2"
    status = r.json()
    assert status["tls"] == "TLSv1.3"
    assert status["protocols"] == ["h2", "http/1.1"]
    assert status["public_key"] == tls_server.node.require().public_key
    assert keys.http_version == "HTTP/2"
    assert keys.json()["keys"][0]["public_key"] == status["public_key"]


async def test_http11_over_tls(tls_server: ServeInfo, cert: tuple[str, str]) -> None:
    async with httpx.AsyncClient(http2=False, verify=client_ssl_context(cert[0]), timeout=5) as client:
        with trio.fail_after(10):
            r = await client.get(f"{tls_server.url}/api/mux/status")
    assert r.status_code == 200
    assert r.http_version == "HTTP/1.1"
    assert r.json()["tls"] == "TLSv1.3"


async def test_wss_channel_frame_verifies(tls_server: ServeInfo, cert: tuple[str, str]) -> None:
    port = _port(tls_server.url)
    async with httpx.AsyncClient(http2=True, verify=client_ssl_context(cert[0]), timeout=5) as client:
        with trio.fail_after(10):
            public_key = (await client.get(f"{tls_server.url}/api/mux/keys")).json()["keys"][0]["public_key"]
    ctx = client_ssl_context(cert[0])  # no ALPN: WebSocket upgrade over HTTP/1.1
    url = f"wss://127.0.0.1:{port}/api/mux/ws?agent=alice"
    with trio.fail_after(15):
        # The plain client API works over TLS ...
        async with trio_websocket.open_websocket_url(url, ssl_context=ctx) as probe:
            assert (await _get_json(probe))["agent"] == "alice"
        async with _open_wss(port, "alice", ctx) as alice, _open_wss(port, "bob", ctx) as bob:
            hello = await _get_json(alice)
            assert hello["event"] == "connected" and hello["agent"] == "alice"
            assert hello["public_key"] == public_key
            assert (await _get_json(bob))["event"] == "connected"

            channel_id, _ = await _channel_pair(alice, bob)
            payload = {"text": "hello over TLS 1.3", "n": 1}
            send = {"action": "send", "channel_id": channel_id, "payload": payload, "ref": "s1"}
            await alice.send_message(orjson.dumps(send).decode())
            ack = await _wait_event(alice, "frame_ack")
            assert ack["ref"] == "s1" and ack["channel_id"] == channel_id

            event = await _wait_event(bob, "frame")
            frame_dict = {k: v for k, v in event.items() if k != "event"}
            frame = mux.verify_frame(frame_dict, public_key)
            assert frame.payload == payload
            assert frame.sender == "alice" and frame.target == "bob"
            assert frame.seq == ack["seq"] and frame.tbz_hash == ack["tbz_hash"] and frame.sig == ack["sig"]
            # Tampering is detected.
            with pytest.raises(mux.VerificationError):
                mux.verify_frame({**frame_dict, "payload": {"text": "forged", "n": 1}}, public_key)


# ---- a subprocess node -----------------------------------------------------------------------


class LineReader:
    """Lines from a subprocess pipe, each read bounded by a timeout."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.lines: list[str] = []

    async def readline(self, timeout: float = 10.0) -> str:
        with trio.fail_after(timeout):
            while b"\n" not in self.buffer:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise EOFError(f"stream ended; so far: {self.lines!r} {self.buffer!r}")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        text = line.decode()
        self.lines.append(text)
        return text

    async def rest(self, timeout: float = 10.0) -> list[str]:
        """Every remaining line until EOF."""
        with trio.fail_after(timeout):
            while chunk := await self.stream.receive_some(65536):
                self.buffer += chunk
        tail = self.buffer.decode().splitlines()
        self.buffer = b""
        self.lines.extend(tail)
        return tail


@pytest.fixture
async def node_process(cert: tuple[str, str], tmp_path: Path) -> AsyncIterator[tuple[trio.Process, LineReader, str]]:
    """``python -m mux serve`` with TLS on a free port: the process, its stdout and its URL."""
    certfile, keyfile = cert
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env = {k: v for k, v in env.items() if not k.startswith("MUX_")}
    argv = [sys.executable, "-m", "mux", "serve", "--host", "127.0.0.1", "--port", "0", "--memory", "--open"]
    argv += ["--certfile", certfile, "--keyfile", keyfile]
    async with await trio.open_file(tmp_path / "node.stderr", "wb") as errlog:
        proc = await trio.lowlevel.open_process(
            argv, stdout=subprocess.PIPE, stderr=errlog.wrapped, stdin=subprocess.DEVNULL, cwd=tmp_path, env=env
        )
    try:
        assert proc.stdout is not None
        out = LineReader(proc.stdout)
        try:
            line = await out.readline(20)
        except (EOFError, trio.TooSlowError):
            raise AssertionError((tmp_path / "node.stderr").read_text()) from None
        assert line.startswith("mux node mux-node listening on https://127.0.0.1:"), line
        assert line.endswith("[TLS 1.3]"), line
        url = line.split(" listening on ", 1)[1].split(" ", 1)[0].rstrip(",")
        key_line = await out.readline(5)
        assert key_line.startswith("public key ") and len(key_line.split()[-1]) == 64, key_line
        yield proc, out, url
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(5):
                await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()


async def _wait_stopped(proc: trio.Process, out: LineReader, tmp_path: Path) -> None:
    """The node exits 0 within 10 s, says it stopped, and logged no traceback on the way."""
    with trio.fail_after(10):
        code = await proc.wait()
    tail = await out.rest(5)
    stderr = (tmp_path / "node.stderr").read_text()
    assert code == 0, (code, tail, stderr)
    assert "mux node stopped" in tail, (tail, stderr)
    assert "received SIGTERM" in stderr, stderr
    assert "Traceback" not in stderr, stderr


async def test_subprocess_node_https_and_sigterm(
    node_process: tuple[trio.Process, LineReader, str], cert: tuple[str, str], tmp_path: Path
) -> None:
    proc, out, url = node_process
    public_key = out.lines[1].split()[-1]
    async with httpx.AsyncClient(http2=True, verify=client_ssl_context(cert[0]), timeout=5) as client:
        with trio.fail_after(10):
            r = await client.get(f"{url}/api/mux/status")
    assert r.status_code == 200 and r.http_version == "HTTP/2"
    assert r.json()["tls"] == "TLSv1.3"
    assert r.json()["public_key"] == public_key
    memory = r.json()["memory"]
    assert memory["gc_frozen"] > 10_000  # start-up objects are out of full collections
    assert len(memory["gc_collections"]) == 3 and memory["gc_collections"][2] >= 1  # freezing collected
    assert isinstance(memory["gc_collected"], int)
    status = await trio.Path(f"/proc/{proc.pid}/status").read_text()
    vm_rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    assert abs(memory["rss_bytes"] / 1024 - vm_rss) < vm_rss / 10, (memory, vm_rss)  # as the system counts it
    assert 0 < memory["rss_bytes"] <= memory["rss_peak_bytes"]
    proc.send_signal(signal.SIGTERM)
    await _wait_stopped(proc, out, tmp_path)


async def test_subprocess_sigterm_closes_channels_over_wss(
    node_process: tuple[trio.Process, LineReader, str], cert: tuple[str, str], tmp_path: Path
) -> None:
    """SIGTERM: both ends of an open channel hear ``channel_closed`` (node_shutdown), then 1001."""
    proc, out, url = node_process
    ctx = client_ssl_context(cert[0])
    port = _port(url)
    with trio.fail_after(20):
        async with _open_wss(port, "alice", ctx) as alice, _open_wss(port, "bob", ctx) as bob:
            assert (await _get_json(alice))["event"] == "connected"
            assert (await _get_json(bob))["event"] == "connected"
            channel_id, _ = await _channel_pair(alice, bob)

            proc.send_signal(signal.SIGTERM)
            for ws in (alice, bob):
                closed = await _wait_event(ws, "channel_closed", timeout=8)
                assert closed["channel_id"] == channel_id
                assert closed["reason"] == "node_shutdown"
                assert closed["by"] == "mux-node"
                assert closed["seq"] == 1 and len(closed["tbz_hash"]) == 64
                # Then the node closes the socket: "going away".
                with trio.fail_after(8), pytest.raises(trio_websocket.ConnectionClosed) as excinfo:
                    while True:
                        await ws.get_message()
                assert excinfo.value.reason is not None and excinfo.value.reason.code == 1001
    await _wait_stopped(proc, out, tmp_path)
