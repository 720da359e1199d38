"""Stalled, slow and vanishing clients (PROTOCOL.md "Tunnels"): a frame started is
sent whole, nothing follows our Close, a Ping is out only once written, and no
tunnel outlives its client. Real TLS, real sockets, wsproto parsing every byte."""

import hashlib
import re
import signal
import socket
import ssl
import subprocess
import threading
import time

import fakes
import pytest
from conftest import wait_for
from hostile_support import TcpProxy
from wsclient import CloseConnection, Rejected, WsClient, client_context
from wsproto.events import BytesMessage
from wsproto.frame_protocol import FrameProtocol, Opcode

import flexvdi_gateway as gw

LOCAL = "127.0.0.1"
FRAME = 65000   # payload of the data frames the writer tests send


# =====================================================================================
# The writer alone, over a real TLS connection whose reader stops reading
# =====================================================================================

@pytest.fixture
def tls_pair(certs):
    """(gateway side, client side, TunnelEnd): loopback TCP with small buffers, TLS.
    The gateway side is non-blocking, as in a tunnel."""
    listener = socket.create_server((LOCAL, 0))
    client_raw = socket.socket()
    client_raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client_raw.connect(listener.getsockname())
    server_raw, _ = listener.accept()
    listener.close()
    server_raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["gateway"])
    wrapped = {}
    handshake = threading.Thread(target=lambda: wrapped.setdefault(
        "server", context.wrap_socket(server_raw, server_side=True)))
    server_raw.settimeout(10)
    handshake.start()
    client = client_context().wrap_socket(client_raw)
    handshake.join(10)
    server = wrapped["server"]
    server.setblocking(False)
    desktop, desktop_peer = socket.socketpair()
    end = gw.TunnelEnd(server, desktop)
    yield server, client, end
    for sock in (server, client, desktop, desktop_peer):
        sock.close()


def data_frames(payload):
    return b"".join(gw.encode_frame(gw.Opcode.BINARY, payload[i:i + FRAME])
                    for i in range(0, len(payload), FRAME))


def read_wire(sock, size, timeout=15):
    """Exactly `size` bytes from the client side (fewer only at EOF)."""
    sock.settimeout(timeout)
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(65536)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def parse(wire):
    """Every frame as wsproto reads it: [(opcode, payload)]; raises on garbage."""
    protocol = FrameProtocol(client=True, extensions=[])
    protocol.receive_bytes(wire)
    return [(frame.opcode, frame.payload) for frame in protocol.received_frames()]


def start_writing(writer, frames):
    """send_data() in a thread, returning once it is blocked inside the frames."""
    result = []
    thread = threading.Thread(target=lambda: result.append(writer.send_data(frames)),
                              daemon=True)
    thread.start()
    wait_for(lambda: writer.writing, 5, message="the writer to start")
    return thread, result


@pytest.mark.parametrize("control, opcode", [
    (gw.Opcode.PING, Opcode.PING),     # a KeepAlive Ping while a data frame is half out
    (gw.Opcode.PONG, Opcode.PONG),     # a Pong while the send buffer is full
])
def test_control_frame_queued_mid_frame_goes_out_whole_after_it(tls_pair, control, opcode):
    server, client, end = tls_pair
    writer = gw.ClientWriter(server, threading.Lock(), 10, end)
    payload = fakes.pattern(4 * FRAME, seed=3)
    frames = data_frames(payload)
    thread, result = start_writing(writer, frames)
    queued_at = time.monotonic()
    writer.queue(control, b"between")
    assert time.monotonic() - queued_at < 0.5, "the queuing thread waited for the writer"
    assert not result, "the data frames went out although the client reads nothing"
    wire = read_wire(client, len(frames) + 2 + 7)
    thread.join(5)
    assert result == [True]
    frames_seen = parse(wire)
    assert [op for op, _ in frames_seen] == [Opcode.BINARY] * 4 + [opcode]
    assert b"".join(p for _, p in frames_seen[:4]) == payload
    assert frames_seen[4][1] == b"between"
    assert not end.ended


def test_nothing_follows_our_close(tls_pair):
    server, client, end = tls_pair
    writer = gw.ClientWriter(server, threading.Lock(), 10, end)
    payload = fakes.pattern(3 * FRAME, seed=4)
    frames = data_frames(payload)
    thread, result = start_writing(writer, frames)
    writer.queue_close(gw.CloseReason.NORMAL_CLOSURE, "bye")
    writer.queue(gw.Opcode.PONG, b"late")          # after our Close: dropped
    wire = read_wire(client, len(frames) + 2 + 5)
    thread.join(5)
    assert result == [True]
    assert writer.send_data(gw.encode_frame(gw.Opcode.BINARY, b"after")) is False
    client.settimeout(0.5)
    with pytest.raises(socket.timeout):
        client.recv(1)                               # nothing after the Close
    frames_seen = parse(wire)
    assert [op for op, _ in frames_seen] == [Opcode.BINARY] * 3 + [Opcode.CLOSE]
    assert b"".join(p for _, p in frames_seen[:3]) == payload
    assert frames_seen[3][1] == (1000, "bye")
    assert writer.close_out_at is not None


def test_a_ping_is_out_only_once_its_last_byte_is_handed_over(tls_pair):
    server, client, end = tls_pair
    writer = gw.ClientWriter(server, threading.Lock(), 10, end)
    frames = data_frames(fakes.pattern(3 * FRAME, seed=5))
    thread, _ = start_writing(writer, frames)
    writer.queue(gw.Opcode.PING, b"p")
    assert writer.ping_out_at is None        # waiting behind the data frames
    read_started = time.monotonic()
    read_wire(client, len(frames) + 3)
    thread.join(5)
    assert writer.ping_out_at is not None and writer.ping_out_at >= read_started


def test_a_client_that_takes_no_byte_ends_the_tunnel_at_the_stall_timeout(tls_pair):
    server, _client, end = tls_pair
    writer = gw.ClientWriter(server, threading.Lock(), 1.0, end)
    started = time.monotonic()
    assert writer.send_data(data_frames(fakes.pattern(16 * FRAME, seed=6))) is False
    took = time.monotonic() - started
    assert 1.0 <= took < 3, took
    assert end.ended and end.reason.startswith("client not reading")
    writer.queue(gw.Opcode.PONG, b"x")          # the tunnel is over: returns at once


# =====================================================================================
# Through a gateway
# =====================================================================================

def open_ws(port, token, **kwargs):
    return WsClient(LOCAL, port, f"/?ver=2&token={token}", subprotocols=("binary",), **kwargs)


class PacedDesktop:
    """A fake Spice server whose one connection the test writes to (and reads from)."""

    def __init__(self, spice_factory):
        self.done = threading.Event()
        self.server = spice_factory(self._hold)

    def _hold(self, sock, record):
        self.done.wait(120)

    @property
    def sock(self):
        return wait_for(lambda: self.server.records, 5, message="desktop connection")[0]["sock"]


def ss_row(filter_words):
    """(Recv-Q, Send-Q, skmem fields) of the one established TCP socket matching."""
    out = subprocess.run(["ss", "-tmnH", "state", "established", *filter_words],
                         capture_output=True, text=True, timeout=5, check=True).stdout
    lines = out.strip().splitlines()
    if not lines:
        return None
    recv_q, send_q = (int(x) for x in lines[0].split()[:2])
    skmem = re.search(r"skmem:\(([^)]*)\)", out)
    fields = {}
    for item in (skmem.group(1).split(",") if skmem else []):
        name = item.rstrip("0123456789")
        fields[name] = int(item[len(name):])
    return recv_q, send_q, fields


def stalled_client(port, token):
    """A client whose socket holds little: a tiny receive buffer and a small MSS."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    raw.settimeout(10)
    raw.connect((LOCAL, port))
    return open_ws(port, token, sock=client_context().wrap_socket(raw))


def read_data(ws, size, timeout=20):
    """What the gateway sends until `size` data bytes arrived, answering Pings; fails
    on a Close (wsproto turns a corrupt frame into Close 1002) or a stall."""
    deadline = time.monotonic() + timeout
    out = bytearray()
    while len(out) < size:
        event = ws.event(max(0.01, deadline - time.monotonic()))
        assert not isinstance(event, CloseConnection), (
            f"the client saw Close {event.code} {event.reason!r} after {len(out)} bytes")
        assert event is not None, f"only {len(out)} of {size} bytes within {timeout} s"
        if isinstance(event, BytesMessage):
            out += event.data
    return bytes(out)


@pytest.mark.slow
def test_keepalive_ping_stuck_on_a_full_socket_never_corrupts_the_next_frame(
        gateway_factory, manager, spice_factory):
    """The corruption needs the client socket's send buffer full while the down thread
    is idle, so that a KeepAlive Ping is the write that blocks; then one more data
    frame. The client then reads: every frame valid, every byte in order."""
    gateway = gateway_factory(KeepAlive=1, PongTimeout=30)
    desktop = PacedDesktop(spice_factory)
    token = gateway.desktop_token(manager, desktop.server)["spice_port"]
    ws = stalled_client(gateway.port, token)
    client_port = ws.sock.getsockname()[1]
    desktop_port = desktop.server.port
    sock = desktop.sock
    sent = bytearray()
    full_cycles = 0
    try:
        for cycle in range(8):
            # Fill until the gateway's socket to the client holds all it may (w >= tb),
            # in steps that halve as it nears full, each read by the gateway before
            # the next (so that its last write completes: the down thread is idle).
            for step in range(400):
                row = ss_row(["(", "sport", "=", f":{gateway.port}", "and", "dport", "=",
                              f":{client_port}", ")"])
                room = row[2].get("tb", 0) - row[2].get("w", 0)
                if room <= 0:
                    full_cycles += 1
                    break
                chunk = fakes.pattern(min(32768, max(1500, room // 2)),
                                      seed=cycle * 10_000 + step)
                sock.sendall(chunk)
                sent += chunk
                wait_for(lambda: ss_row(["dport", "=", f":{desktop_port}"])[0] == 0, 5,
                         message="the gateway to read the desktop")
            # Quiet for 2.5 s: with KeepAlive 1 a Ping comes due and cannot be written.
            time.sleep(2.5)
            last = fakes.pattern(3000, seed=cycle)
            sock.sendall(last)   # one more data frame behind the stuck Ping
            sent += last
            got = read_data(ws, len(sent))
            assert got == bytes(sent), f"cycle {cycle}: bytes differ"
            sent.clear()
        assert full_cycles >= 4, full_cycles
        assert len(ws.pings) >= 8, ws.pings
    finally:
        desktop.done.set()
        ws.abort()
    assert "Traceback" not in gateway.log_text()


def streaming_desktop(rate_bytes_s, seconds, record_key="sent_sha256"):
    """A desktop that streams at about `rate_bytes_s` for `seconds`, then closes."""
    def behaviour(sock, record):
        digest = hashlib.sha256()
        record[record_key] = digest
        started = time.monotonic()
        sent = 0
        seed = 0
        while time.monotonic() - started < seconds:
            chunk = fakes.pattern(16384, seed)
            seed += 1
            sock.sendall(chunk)
            digest.update(chunk)
            sent += len(chunk)
            ahead = sent / rate_bytes_s - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)   # pacing the stream, not waiting for anybody
        record["sent"] = sent
    return behaviour


@pytest.mark.slow
def test_slow_reader_under_a_streaming_desktop_with_keepalive(gateway_factory, manager,
                                                              spice_factory):
    """A client reading a few hundred KB/s, pausing now and then, for 30 s while the
    desktop streams faster than that: every frame parses, every byte arrives."""
    gateway = gateway_factory(KeepAlive=1, PongTimeout=10)
    spice = spice_factory(streaming_desktop(2_000_000, 30))
    token = gateway.desktop_token(manager, spice)["spice_port"]
    ws = open_ws(gateway.port, token, timeout=60)
    digest = hashlib.sha256()
    received = 0
    started = time.monotonic()
    try:
        while True:
            event = ws.event(40)
            assert event is not None, f"stalled after {received} bytes"
            if isinstance(event, CloseConnection):
                assert event.code == 1000, (event.code, event.reason)
                break
            if isinstance(event, BytesMessage):
                digest.update(event.data)
                received += len(event.data)
                elapsed = time.monotonic() - started
                pause = received / 300_000 - elapsed   # about 300 KB/s
                if int(elapsed) % 7 == 3:
                    pause += 0.3                       # and now and then a pause
                if pause > 0:
                    time.sleep(min(pause, 1.0))
    finally:
        ws.abort()
    record = spice.records[0]
    assert received == record["sent"]
    assert digest.hexdigest() == record["sent_sha256"].hexdigest()
    assert len(ws.pings) >= 10, len(ws.pings)
    print(f"\nslow reader: {received} bytes in {time.monotonic() - started:.0f} s, "
          f"{len(ws.pings)} Pings between frames")


def flood_then_close(size):
    def behaviour(sock, record):
        sock.sendall(fakes.pattern(size, seed=11))
    return behaviour


def flood(sock, record):
    block = fakes.pattern(1 << 16, seed=12)
    while True:
        sock.sendall(block)


@pytest.mark.slow
def test_clients_that_never_read_are_released_by_the_stall_timeout(gateway_factory, manager,
                                                                   spice_factory):
    """A client that sends a Ping and stops reading while its desktop closes, and one
    that never reads while its desktop floods: both tunnels end 3-8 s after the
    gateway last got a byte out, with `client not reading`; their threads,
    descriptors and token go."""
    gateway = gateway_factory(ClientStallTimeout=3, TokenTimeout=1)
    echo = spice_factory(fakes.echo)
    baseline_threads, baseline_fds = gateway.threads(), gateway.fds()
    closing = spice_factory(flood_then_close(32 << 20))
    flooding = spice_factory(flood)
    tokens = [gateway.desktop_token(manager, d)["spice_port"] for d in (closing, flooding)]
    clients = [open_ws(gateway.port, t) for t in tokens]
    try:
        from wsproto.events import Ping as PingEvent
        clients[0].sock.sendall(clients[0].ws.send(PingEvent(payload=b"are you there")))
        started = time.monotonic()

        def both_ended():
            return sum("client not reading" in line for line in gateway.log_text().splitlines()
                       if "tunnel ended" in line) == 2
        wait_for(both_ended, 15, interval=0.1, message="both tunnels to end")
        took = time.monotonic() - started
        assert 3 <= took < 12, took
        for desktop in (closing, flooding):
            assert desktop.records[0]["closed"].wait(5)
        wait_for(lambda: gateway.threads() <= baseline_threads + 0, 10, message="threads")
        wait_for(lambda: gateway.fds() <= baseline_fds, 10, message="descriptors")
        time.sleep(1.2)   # TokenTimeout 1 s after the last tunnel closed
        for token in tokens:
            with pytest.raises(Rejected) as refused:
                open_ws(gateway.port, token)
            assert refused.value.status == 403
        with open_ws(gateway.port, gateway.desktop_token(manager, echo)["spice_port"]) as ws:
            ws.send(b"still serving")
            assert ws.recv(13) == b"still serving"
    finally:
        for ws in clients:
            ws.abort()
    print(f"\nboth never-reading tunnels ended {took:.1f} s after the stall began")


class Channel(threading.Thread):
    """One Spice channel of a client: reads all the time (answering Pings), and sends
    `message` every `every_s` seconds if given. One thread per socket."""

    def __init__(self, port, token, message=b"", every_s=0.0):
        super().__init__(daemon=True)
        self.ws = open_ws(port, token, timeout=30)
        self.message = message
        self.every_s = every_s
        self.received = 0
        self.closed = None
        self.stop = threading.Event()

    def run(self):
        next_send = time.monotonic()
        while not self.stop.is_set():
            if self.message and time.monotonic() >= next_send:
                try:
                    self.ws.send(self.message)
                except OSError:
                    return
                next_send += self.every_s
            event = self.ws.event(0.05)
            if isinstance(event, CloseConnection):
                self.closed = (event.code, event.reason)
                return
            if isinstance(event, BytesMessage):
                self.received += len(event.data)


@pytest.mark.slow
def test_twenty_network_stalls_of_2_5_s_every_tunnel_of_the_token_survives(
        gateway_factory, manager, spice_factory):
    """A client behind a network that stalls for 2.5 s, 20 times, KeepAlive 1 and
    PongTimeout 10: main (idle), display (streaming), inputs (keystrokes), cursor
    (idle). Every tunnel stays open, and the log has no Ping timeout."""
    gateway = gateway_factory(KeepAlive=1, PongTimeout=10)
    echo = spice_factory(fakes.echo)
    display = spice_factory(streaming_desktop(200_000, 200))
    token = gateway.desktop_token(manager, echo)["spice_port"]
    display_token = gateway.desktop_token(manager, display)["spice_port"]
    proxy = TcpProxy(gateway.port)
    channels = [Channel(proxy.port, token),                           # main: idle
                Channel(proxy.port, display_token),                   # display: streaming
                Channel(proxy.port, token, b"k", every_s=0.1),        # inputs
                Channel(proxy.port, token)]                           # cursor: idle
    for channel in channels:
        channel.start()
    try:
        for _ in range(20):
            proxy.frozen.set()
            time.sleep(2.5)          # the stall itself
            proxy.frozen.clear()
            time.sleep(1.0)          # the network works for a second
            assert all(c.is_alive() for c in channels), [c.closed for c in channels]
        assert channels[1].received > 1_000_000
    finally:
        for channel in channels:
            channel.stop.set()
        for channel in channels:
            channel.join(5)
            channel.ws.abort()
        proxy.close()
    log_text = gateway.log_text()
    assert "no answer to Ping" not in log_text
    assert "client not reading" not in log_text


@pytest.mark.slow
def test_a_client_that_really_vanishes_is_still_found_within_pong_timeout(
        gateway_factory, manager, spice_factory):
    gateway = gateway_factory(KeepAlive=1, PongTimeout=3)
    echo = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, echo)["spice_port"]
    proxy = TcpProxy(gateway.port)
    channels = [Channel(proxy.port, token), Channel(proxy.port, token, b"k", every_s=0.1)]
    for channel in channels:
        channel.start()
    try:
        wait_for(lambda: echo.connections == 2 and channels[1].received, 10)
        proxy.frozen.set()          # gone for good: no FIN, no RST
        vanished = time.monotonic()
        wait_for(lambda: sum("no answer to Ping within 3 s" in line
                             for line in gateway.log_text().splitlines()) == 2,
                 10, interval=0.1, message="both tunnels to end by PongTimeout")
        took = time.monotonic() - vanished
        assert took < 3 + 1 + 1.5, took   # PongTimeout, a KeepAlive period, slack
    finally:
        for channel in channels:
            channel.stop.set()
            channel.join(5)
            channel.ws.abort()
        proxy.close()


@pytest.mark.slow
def test_a_burst_of_200_sighups_then_sigterm(gateway, manager, spice_factory):
    echo = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, echo)["spice_port"]
    clients = [open_ws(gateway.port, token) for _ in range(3)]
    try:
        for _ in range(200):
            gateway.signal(signal.SIGHUP)
        wait_for(lambda: "reloaded certificate" in gateway.log_text(), 10,
                 message="a reload")
        for ws in clients:           # the tunnels still carry data
            ws.send(b"after the reloads")
            assert ws.recv(17) == b"after the reloads"
        stopped_at = time.monotonic()
        gateway.signal(signal.SIGTERM)
        assert gateway.proc.wait(5) == 0
        assert time.monotonic() - stopped_at < 5
        assert all(ws.wait_close(5) == 1001 for ws in clients)
    finally:
        for ws in clients:
            ws.abort()
    assert "Traceback" not in gateway.log_text()


def test_ping_only_between_frames_of_a_streaming_desktop(gateway_factory, manager,
                                                         spice_factory):
    """Quick: a desktop streaming while KeepAlive 1 Pings go out; the client reads on
    and answers; everything parses."""
    gateway = gateway_factory(KeepAlive=1)
    spice = spice_factory(streaming_desktop(5_000_000, 3))
    token = gateway.desktop_token(manager, spice)["spice_port"]
    with open_ws(gateway.port, token, timeout=30) as ws:
        digest = hashlib.sha256()
        while True:
            event = ws.event(20)
            assert event is not None
            if isinstance(event, CloseConnection):
                assert event.code == 1000
                break
            if isinstance(event, BytesMessage):
                digest.update(event.data)
        assert len(ws.pings) >= 2
    assert digest.hexdigest() == spice.records[0]["sent_sha256"].hexdigest()
