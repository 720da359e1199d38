"""Tunnels end to end: real TLS, real WebSocket clients (wsproto), fake Spice servers."""

import hashlib
import signal
import socket
import ssl
import struct
import threading
import time

import fakes
import pytest
from conftest import wait_for
from wsclient import (
    Ping,
    Rejected,
    WsClient,
    client_context,
    connect,
    pump,
    read_answer,
    status_of,
)
from wsproto.frame_protocol import FrameProtocol

import flexvdi_gateway as gw

LOCAL = "127.0.0.1"


def first_record(spice):
    """The fake desktop's record of its first connection, once it has accepted it."""
    return wait_for(lambda: spice.records, 5, message="desktop connection")[0]


def open_ws(gateway, token, ver="2", subprotocols=("binary",), **kwargs):
    query = f"/?token={token}" + (f"&ver={ver}" if ver is not None else "")
    return WsClient(LOCAL, gateway.port, query, subprotocols=subprotocols, **kwargs)


def test_six_channels_and_a_late_seventh_each_carry_their_own_data(gateway, manager,
                                                                   spice_factory):
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    clients = [open_ws(gateway, token) for _ in range(6)]
    try:
        for round_ in range(3):
            for i, ws in enumerate(clients):
                ws.send(b"channel %d round %d " % (i, round_) * 50)
            for i, ws in enumerate(clients):
                expected = b"channel %d round %d " % (i, round_) * 50
                assert ws.recv(len(expected)) == expected
        assert spice.connections == 6
        late = open_ws(gateway, token)   # e.g. usbredir, opened when a device is plugged in
        clients.append(late)
        late.send(b"late channel")
        assert late.recv(12) == b"late channel"
        assert spice.connections == 7
    finally:
        for ws in clients:
            ws.abort()


def test_64_mib_each_way_at_once_through_one_tls_tunnel(gateway, manager, spice_factory):
    size = 64 << 20
    spice = spice_factory(fakes.source_and_sink(size, seed=7))
    token = gateway.desktop_token(manager, spice)["spice_port"]
    upload = fakes.pattern(size, seed=99)
    digest, seconds, sizes = pump(LOCAL, gateway.port, f"/?ver=2&token={token}", upload, size)
    record = wait_for(lambda: spice.records and spice.records[0]["received"] == size and
                      spice.records[0], 30, message="desktop to receive everything")
    assert digest == hashlib.sha256(fakes.pattern(size, seed=7)).hexdigest()
    assert record["sha256"].hexdigest() == hashlib.sha256(upload).hexdigest()
    assert max(sizes) <= 65536
    print(f"\n64 MiB each way at once: {seconds:.2f} s, {2 * size / seconds / 1e6:.0f} MB/s "
          f"both directions together")


def test_eight_tunnels_in_parallel_each_carry_their_own_data(gateway, manager, spice_factory):
    size = 8 << 20
    results = {}
    spices = [spice_factory(fakes.source_and_sink(size, seed=i)) for i in range(8)]
    tokens = [gateway.desktop_token(manager, s)["spice_port"] for s in spices]

    def run(i):
        results[i] = pump(LOCAL, gateway.port, f"/?ver=2&token={tokens[i]}",
                          fakes.pattern(size, seed=100 + i), size)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - started
    for i, spice in enumerate(spices):
        assert results[i][0] == hashlib.sha256(fakes.pattern(size, seed=i)).hexdigest()
        record = wait_for(lambda s=spice: s.records and s.records[0]["received"] == size
                          and s.records[0], 30, message="desktop to receive everything")
        assert record["sha256"].hexdigest() == hashlib.sha256(
            fakes.pattern(size, seed=100 + i)).hexdigest()
    print(f"\n8 tunnels x 8 MiB each way: {elapsed:.2f} s, "
          f"{16 * size / elapsed / 1e6:.0f} MB/s in total")


def read_server_frames(sock, total, timeout=20):
    """Raw RFC 6455 server frames until `total` payload bytes.

    [(opcode, payload length, masked, payload, length minimally encoded)].
    """
    buf = bytearray()
    frames = []
    got = 0
    deadline = time.monotonic() + timeout
    while got < total:
        while True:
            if len(buf) >= 2:
                length = buf[1] & 0x7F
                head = 2 + {126: 2, 127: 8}.get(length, 0)
                if len(buf) >= head:
                    if length == 126:
                        length = struct.unpack("!H", buf[2:4])[0]
                    elif length == 127:
                        length = struct.unpack("!Q", buf[2:10])[0]
                    minimal = head == (2 if length < 126 else 4 if length < 65536 else 10)
                    if len(buf) >= head + length:
                        frames.append((buf[0] & 0x0F, length, bool(buf[1] & 0x80),
                                       bytes(buf[head:head + length]), minimal))
                        got += length
                        del buf[:head + length]
                        continue
            break
        if got >= total:
            break
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(262144)
        assert data, "connection closed early"
        buf += data
    return frames


def upgrade_raw(gateway, token, extra=b"", subprotocol=b"binary"):
    sock = connect(LOCAL, gateway.port)
    sock.sendall(b"GET /?ver=2&token=" + token.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                 b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n"
                 + (b"Sec-WebSocket-Protocol: " + subprotocol + b"\r\n" if subprotocol else b"")
                 + extra + b"\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    return sock, head


# Sizes around the batching of full frames (gather_frames): whole frames, then a tail
# that needs a 2-byte header (under 126 bytes), a 4-byte one, or nothing.
@pytest.mark.parametrize("size", [1 << 20, 3 * 65520, 3 * 65520 + 1, 3 * 65520 + 125,
                                  5 * 65520 + 126, 9 * 65520 + 4000])
def test_desktop_burst_arrives_whole_in_frames_of_at_most_64_kib(gateway, manager,
                                                                 spice_factory, size):
    payload = fakes.pattern(size, seed=3)
    spice = spice_factory(fakes.source(payload))
    token = gateway.desktop_token(manager, spice)["spice_port"]
    sock, head = upgrade_raw(gateway, token)
    try:
        assert status_of(head) == 101
        frames = read_server_frames(sock, len(payload))
        assert all(op == 2 for op, *_ in frames)
        assert not any(masked for _, _, masked, *_ in frames)
        assert all(minimal for *_, minimal in frames), "length not minimally encoded"
        assert max(length for _, length, *_ in frames) <= 65536 - 16
        assert b"".join(data for _, _, _, data, _ in frames) == payload
    finally:
        sock.close()


LIMIT = gw.MAX_SEND_PAYLOAD


@pytest.mark.parametrize("waiting, eof, expected_frames", [
    (0, False, [LIMIT]),                               # nothing more: the first frame alone
    (0, True, [LIMIT]),                                # EOF: left for the next read
    (100, False, [LIMIT, 100]),                        # tail with a 2-byte header
    (125, True, [LIMIT, 125]),
    (126, False, [LIMIT, 126]),                        # tail with a 4-byte header
    (LIMIT + 5, False, [LIMIT, LIMIT, 5]),
    (3 * LIMIT, False, [LIMIT] * 4),                   # exactly a batch
    (3 * LIMIT + 7, False, [LIMIT] * 4),               # a batch; the rest stays unread
])
def test_gathered_frames_are_whole_minimal_and_in_order(waiting, eof, expected_frames):
    desktop, peer = socket.socketpair()
    try:
        desktop.setblocking(False)
        first = fakes.pattern(LIMIT, seed=7)
        more = fakes.pattern(waiting, seed=8)
        peer.sendall(more)   # all of it waits in the socket before the gateway reads
        if eof:
            peer.shutdown(socket.SHUT_WR)
        buf = bytearray(10 + gw.DOWN_BATCH_FRAMES * (LIMIT + 4))
        view = memoryview(buf)
        header = gw.frame_header(gw.Opcode.BINARY, LIMIT)
        buf[10 - len(header):10] = header
        buf[10:10 + LIMIT] = first
        end, total, last, error = gw.gather_frames(desktop, buf, view, LIMIT, LIMIT)
        assert error is None
        protocol = FrameProtocol(client=True, extensions=[])
        protocol.receive_bytes(bytes(buf[10 - len(header):end]))
        frames = [frame.payload for frame in protocol.received_frames()]
        assert [len(f) for f in frames] == expected_frames
        assert total == sum(expected_frames)
        assert b"".join(frames) == (first + more)[:total]
        # The size of the last read: a short one, a full one ending the batch, or 0
        # when nothing more was ready (would block, or EOF left for the next read).
        assert last == (expected_frames[-1] if len(expected_frames) > 1 else 0)
        unread = (first + more)[total:]
        if unread:
            assert desktop.recv(1 << 20) == unread
        view.release()
    finally:
        desktop.close()
        peer.close()


@pytest.mark.parametrize("offered, chosen", [
    (["binary"], "binary"),
    (["base64", "binary"], "binary"),
    (["base64"], "base64"),
    ([], None),
    (["chat"], None),
])
def test_subprotocol_is_binary_then_base64_then_none_never_one_not_offered(
        gateway, manager, spice_factory, offered, chosen):
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    with open_ws(gateway, token, subprotocols=offered) as ws:
        assert ws.subprotocol == chosen
        if chosen == "base64":
            import base64
            ws.send_text(base64.b64encode(b"\x00\x01binary\xff").decode())
            event = ws.event()
            assert base64.b64decode(event.data) == b"\x00\x01binary\xff"
        else:
            ws.send(b"\x00\x01binary\xff")
            assert ws.recv(9) == b"\x00\x01binary\xff"


@pytest.mark.parametrize("query", ["/?ver=2&token=AAAAAAAAAAAAAAAA", "/?ver=2", "/?token=",
                                   "/?ver=2&token=../../etc"])
def test_unknown_or_missing_token_is_403_and_connects_nothing(gateway, manager,
                                                              spice_factory, query):
    spice = spice_factory(fakes.echo)
    gateway.desktop_token(manager, spice)
    with pytest.raises(Rejected) as rejected:
        WsClient(LOCAL, gateway.port, query, subprotocols=["binary"])
    assert rejected.value.status == 403
    assert spice.connections == 0


def test_token_expires_after_token_timeout(gateway_factory, manager, spice_factory):
    gateway = gateway_factory(TokenTimeout=1)
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    time.sleep(1.3)   # let the token's lifetime pass
    with pytest.raises(Rejected) as rejected:
        open_ws(gateway, token)
    assert rejected.value.status == 403
    assert spice.connections == 0


def test_open_tunnel_keeps_token_alive_and_timeout_restarts_when_it_closes(
        gateway_factory, manager, spice_factory):
    gateway = gateway_factory(TokenTimeout=1)
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    first = open_ws(gateway, token)
    time.sleep(1.5)   # past TokenTimeout while the first channel is open
    second = open_ws(gateway, token)
    second.send(b"ok")
    assert second.recv(2) == b"ok"
    first.close()
    second.close()
    assert first.wait_close() and second.wait_close()
    first.abort()
    second.abort()
    third = open_ws(gateway, token)   # within TokenTimeout of the last close
    third.abort()
    time.sleep(1.3)
    with pytest.raises(Rejected):
        open_ws(gateway, token)


def test_desktop_refusing_gives_502_and_no_upgrade(gateway, manager):
    with socket.socket() as unused:
        unused.bind((LOCAL, 0))
        dead_port = unused.getsockname()[1]
    manager.desktop = (LOCAL, dead_port)
    from wsclient import post_json
    _, answer = post_json(LOCAL, gateway.port, "/vdi/desktop", {"username": "u"})
    with pytest.raises(Rejected) as rejected:
        open_ws(gateway, answer["spice_port"])
    assert rejected.value.status == 502


def test_desktop_closing_delivers_everything_then_close_1000(gateway, manager, spice_factory):
    payload = fakes.pattern(3 << 20, seed=5)
    spice = spice_factory(fakes.source(payload))
    token = gateway.desktop_token(manager, spice)["spice_port"]
    with open_ws(gateway, token) as ws:
        assert ws.recv(len(payload), timeout=20) == payload
        assert ws.wait_close() == 1000


def test_client_close_is_answered_and_desktop_disconnected(gateway, manager, spice_factory):
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    with open_ws(gateway, token) as ws:
        ws.send(b"x")
        assert ws.recv(1) == b"x"
        ws.close(1000)
        assert ws.wait_close() == 1000
    assert first_record(spice)["closed"].wait(3)


def test_client_vanishing_without_close_disconnects_desktop_within_two_seconds(
        gateway, manager, spice_factory):
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    ws = open_ws(gateway, token)
    ws.send(b"x")
    assert ws.recv(1) == b"x"
    started = time.monotonic()
    ws.sock.close()
    assert wait_for(lambda: spice.records, 3, message="desktop connection")[0]["closed"].wait(2)
    assert time.monotonic() - started < 2
    wait_for(lambda: "tunnel ended" in gateway.log_text(), 5, message="tunnel end log line")


def test_client_reset_disconnects_desktop(gateway, manager, spice_factory):
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    ws = open_ws(gateway, token)
    raw = ws.sock
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()   # RST
    assert first_record(spice)["closed"].wait(2)


def test_keepalive_closes_tunnel_of_client_that_never_answers(gateway_factory, manager,
                                                              spice_factory):
    gateway = gateway_factory(KeepAlive=1, PongTimeout=1)
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    ws = open_ws(gateway, token, auto_pong=False)
    started = time.monotonic()
    wait_for(lambda: spice.records, 5, message="desktop connection")
    assert first_record(spice)["closed"].wait(6)
    assert 1.5 < time.monotonic() - started < 5
    ws.abort()
    wait_for(lambda: "no answer to Ping" in gateway.log_text(), 5, message="ping timeout log")


def test_keepalive_keeps_answering_client_open(gateway_factory, manager, spice_factory):
    gateway = gateway_factory(KeepAlive=1, PongTimeout=1)
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    with open_ws(gateway, token) as ws:
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            ws.event(0.2)
        assert len(ws.pings) >= 2
        assert ws.closed is None
        ws.send(b"still here")
        assert ws.recv(10) == b"still here"


def test_no_ping_ever_to_a_client_without_ver(gateway_factory, manager, spice_factory):
    gateway = gateway_factory(KeepAlive=1, PongTimeout=1)
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    with open_ws(gateway, token, ver=None) as ws:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            event = ws.event(0.2)
            assert not isinstance(event, Ping)
        assert ws.pings == []
        ws.send(b"alive")
        assert ws.recv(5) == b"alive"


def test_client_ping_is_answered(gateway, manager, spice_factory):
    from wsproto.events import Ping as PingEvent
    from wsproto.events import Pong
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    with open_ws(gateway, token) as ws:
        ws.sock.sendall(ws.ws.send(PingEvent(payload=b"are you there")))
        event = ws.event()
        assert isinstance(event, Pong) and event.payload == b"are you there"


def test_silent_and_half_hello_clients_do_not_delay_anyone(gateway, manager, spice_factory):
    spice = spice_factory(fakes.echo)
    idle = [socket.create_connection((LOCAL, gateway.port)) for _ in range(20)]
    half = []
    for _ in range(20):
        sock = socket.create_connection((LOCAL, gateway.port))
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 20)
        half.append(sock)
    try:
        started = time.monotonic()
        token = gateway.desktop_token(manager, spice)["spice_port"]
        with open_ws(gateway, token) as ws:
            ws.send(b"ping")
            assert ws.recv(4) == b"ping"
        assert time.monotonic() - started < 2
    finally:
        for sock in idle + half:
            sock.close()


def test_silent_client_is_dropped_after_the_head_deadline(gateway):
    sock = socket.create_connection((LOCAL, gateway.port))
    started = time.monotonic()
    sock.settimeout(15)
    assert sock.recv(100) == b""
    assert 9 < time.monotonic() - started < 12
    sock.close()


def test_no_leak_after_300_tunnels(gateway, manager, spice_factory):
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    for _ in range(3):   # warm up lazily created things
        with open_ws(gateway, token) as ws:
            ws.send(b"w")
            ws.recv(1)
            ws.close()
            ws.wait_close()
    # Idle: the main thread and the TLS listener; connection threads of the warm-up
    # may take a moment to finish.
    wait_for(lambda: gateway.threads() == 2, 10, message="idle thread count")
    threads, fds = gateway.threads(), gateway.fds()
    peak = [0]

    def batch(n):
        clients = [open_ws(gateway, token) for _ in range(n)]
        for i, ws in enumerate(clients):
            ws.send(b"%d" % i)
        for i, ws in enumerate(clients):
            assert ws.recv(len(b"%d" % i)) == b"%d" % i
        peak[0] = max(peak[0], gateway.threads())
        for i, ws in enumerate(clients):
            if i % 3 == 0:
                ws.close()
                ws.wait_close()
            ws.abort()
    for _ in range(30):
        batch(10)
    wait_for(lambda: gateway.threads() == threads and gateway.fds() == fds, 20,
             message=f"threads {threads} and fds {fds} again (now {gateway.threads()}, "
                     f"{gateway.fds()})")
    print(f"\nthreads idle {threads}, with 10 tunnels open {peak[0]} "
          f"({(peak[0] - threads) / 10:.1f} per tunnel)")


def test_sigterm_sends_close_1001_and_exits_zero_quickly(gateway, manager, spice_factory):
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    clients = [open_ws(gateway, token) for _ in range(3)]
    for ws in clients:
        ws.send(b"x")
        assert ws.recv(1) == b"x"
    started = time.monotonic()
    gateway.signal(signal.SIGTERM)
    for ws in clients:
        assert ws.wait_close(5) == 1001
    assert gateway.proc.wait(5) == 0
    assert time.monotonic() - started < 5


def test_tls_1_1_client_is_refused(gateway):
    context = client_context()
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        context.set_ciphers("ALL:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    with socket.create_connection((LOCAL, gateway.port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            context.wrap_socket(raw).do_handshake()


def test_websocket_version_and_key_are_checked(gateway, manager, spice_factory):
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    base = (b"GET /?token=" + token.encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n")
    sock = connect(LOCAL, gateway.port)
    sock.sendall(base + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 8\r\n\r\n")
    answer = read_answer(sock)
    sock.close()
    assert status_of(answer) == 426 and b"Sec-WebSocket-Version: 13" in answer
    for key_line in (b"", b"Sec-WebSocket-Key: short\r\n"):
        sock = connect(LOCAL, gateway.port)
        sock.sendall(base + key_line + b"Sec-WebSocket-Version: 13\r\n\r\n")
        answer = read_answer(sock)
        sock.close()
        assert status_of(answer) == 400
    assert spice.connections == 0


@pytest.mark.parametrize("frame, code", [
    (b"\x82\x05hello", 1002),                                   # unmasked
    (b"\xc2\x80abcd", 1002),                                    # RSV1 set
    (b"\x83\x80abcd", 1002),                                    # opcode 3
    (b"\x89\xfe\x00\x7eabcd" + b"\x00" * 126, 1002),            # ping of 126 bytes
    (b"\x09\x80abcd", 1002),                                    # fragmented ping
    (b"\x80\x80abcd", 1002),                                    # orphan continuation
    (b"\x81\x80abcd", 1003),                                    # text on a binary tunnel
    (b"\x82\xff\x80\x00\x00\x00\x00\x00\x00\x00abcd", 1002),    # 2^63: top bit set
    (b"\x82\xff\x7f\xff\xff\xff\xff\xff\xff\xffabcd", 1009),    # 2^63 - 1
    (b"\x82\xff\x00\x00\x00\x00\x00\x20\x00\x00abcd", 1009),    # 2 MiB frame
    (b"\x88\x82\x00\x00\x00\x00\x03\xe7", 1002),                # close code 999
    (b"\x88\x82\x00\x00\x00\x00\x03\xed", 1002),                # close code 1005
])
def test_protocol_violations_close_the_tunnel_with_the_right_code(
        gateway, manager, spice_factory, frame, code):
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    sock, head = upgrade_raw(gateway, token)
    try:
        assert status_of(head) == 101
        sock.sendall(frame)
        frames = bytearray()
        sock.settimeout(5)
        while len(frames) < 4:
            data = sock.recv(100)
            if not data:
                break
            frames += data
        assert frames[0] == 0x88, frames
        assert struct.unpack("!H", frames[2:4])[0] == code
    finally:
        sock.close()
    assert wait_for(lambda: spice.records, 3, message="desktop connection")[0]["closed"].wait(3)


def test_base64_tunnel_refuses_text_that_is_not_base64(gateway, manager, spice_factory):
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    with open_ws(gateway, token, subprotocols=["base64"]) as ws:
        ws.send_text("not base64 at all!")
        assert ws.wait_close() == 1007


def test_client_that_stops_reading_does_not_slow_another_tunnel(gateway, manager,
                                                                 spice_factory):
    flood = spice_factory(fakes.source(b"\x00" * (64 << 20)))
    echo = spice_factory(fakes.echo)
    stuck_token = gateway.desktop_token(manager, flood)["spice_port"]
    stuck = open_ws(gateway, stuck_token)   # never reads
    try:
        token = gateway.desktop_token(manager, echo)["spice_port"]
        with open_ws(gateway, token) as ws:
            started = time.monotonic()
            for i in range(100):
                ws.send(b"%04d" % i)
                assert ws.recv(4) == b"%04d" % i
            assert time.monotonic() - started < 3
        rss = gateway.rss_kib()
        assert rss < 200 * 1024, rss
    finally:
        stuck.abort()
    assert first_record(flood)["closed"].wait(5)


def test_tunnel_end_log_line_says_who_what_bytes_duration_and_why(gateway, manager,
                                                                  spice_factory):
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    with open_ws(gateway, token) as ws:
        ws.send(b"12345")
        assert ws.recv(5) == b"12345"
        ws.close()
        ws.wait_close()
    line = wait_for(lambda: [ln for ln in gateway.log_text().splitlines()
                             if "tunnel ended" in ln], 5, message="end line")[0]
    assert f"desktop 127.0.0.1:{spice.port}" in line
    assert "5 bytes up" in line and "5 bytes down" in line
    assert "client closed" in line
    assert token not in gateway.log_text()
