"""Faults of the other parties (PROTOCOL.md, "Tunnels" and "Hostile input"): desktops
that reset or stop reading, clients that stop reading or vanish, a manager that
restarts, is slow, trickles, fails or truncates, and a gateway out of descriptors.

Each test also checks that what it breaks stays broken alone: another tunnel keeps
its data and speed, memory stays bounded, and threads and descriptors come back.
"""

import hashlib
import json
import resource
import select
import socket
import ssl
import struct
import threading
import time

import fakes
import pytest
from conftest import wait_for
from hostile_support import (
    LOCAL,
    WANT_IO,
    NormalFlow,
    TcpProxy,
    WsClient,
    assert_clean_log,
    cpu_seconds,
    quiet_counts,
    raw_upgrade,
    settle,
)
from wsclient import Rejected, post, post_json, pump

BODY = {"hwaddress": "hw", "username": "alice", "password": "pw", "desktop": "d"}


def open_ws(port, token, **kwargs):
    return WsClient(LOCAL, port, f"/?ver=2&token={token}", subprotocols=["binary"], **kwargs)


def echo_once(ws, size=4096, tag=b""):
    data = (tag + b"x" * size)[:size]
    ws.send(data)
    assert ws.recv(size, timeout=10) == data


def baseline(gateway, manager, spice):
    """Warms the gateway up (one whole flow) and returns its idle thread/fd counts."""
    token = gateway.desktop_token(manager, spice)["spice_port"]
    with open_ws(gateway.port, token) as ws:
        echo_once(ws)
        ws.close()
        ws.wait_close()
    threads, fds = quiet_counts(gateway)
    return threads, fds, gateway.rss_kib()


def speed(gateway, manager, spice, size=4 << 20):
    """MB/s of `size` bytes each way at once through a fresh tunnel to an echo desktop."""
    token = gateway.desktop_token(manager, spice)["spice_port"]
    data = fakes.pattern(size, seed=11)
    digest, seconds, _ = pump(LOCAL, gateway.port, f"/?ver=2&token={token}", data, size,
                              timeout=60)
    assert digest == hashlib.sha256(data).hexdigest()
    return 2 * size / seconds / 1e6


def best_speed(gateway, manager, spice, tries=2):
    return max(speed(gateway, manager, spice) for _ in range(tries))


def others_unaffected(gateway, manager, echo, rss, before, slack_mib):
    """A stuck tunnel costs bounded memory, and another tunnel keeps at least a quarter
    of its speed while a normal client does the whole flow; (peak RSS, that speed)."""
    peak_rss = gateway.rss_kib()
    assert peak_rss - rss < slack_mib * 1024, (rss, peak_rss)
    with NormalFlow(gateway, manager, echo) as flow:
        during = best_speed(gateway, manager, echo)
        flow.wait_round()
    assert during > before * 0.25, (before, during)
    return peak_rss, during


# -- desktop behaviours ----------------------------------------------------------------

def reset_after(read_bytes, send_bytes):
    """Reads some, sends some, then resets the connection (RST, not FIN)."""
    def behaviour(sock, record):
        got = 0
        while got < read_bytes:
            data = sock.recv(65536)
            if not data:
                return
            got += len(data)
        record["received"] = got
        sock.sendall(fakes.pattern(send_bytes, seed=3))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        record["reset_at"] = time.monotonic()
    return behaviour


def flood_until_reset(sock, record):
    """Sends as fast as the gateway takes it; resets when the test sets record["reset"]."""
    record["reset"] = threading.Event()
    record["sent"] = 0
    sock.settimeout(0.2)
    chunk = b"\x5a" * 65536
    while not record["reset"].is_set():
        try:
            record["sent"] += sock.send(chunk)
        except socket.timeout:
            continue
        except OSError:
            return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def deaf(sock, record):
    """Never reads (fakes.hold reads a byte at a time): the gateway's writes must block.
    Holds the connection until the test sets record["release"]."""
    record["release"] = threading.Event()
    record["release"].wait(120)


def flood(sock, record):
    """Sends until the gateway goes away."""
    chunk = b"\xa5" * 65536
    while True:
        sock.sendall(chunk)
        record["received"] += len(chunk)


# -- a client that sends without reading -----------------------------------------------

class Uploader(threading.Thread):
    """Sends 64 KiB binary frames (zero mask) as fast as the socket takes them, without
    reading; `sent` and `last_progress` show when the writes block."""

    def __init__(self, port, token):
        super().__init__(daemon=True)
        self.sock, self.client_port, _ = raw_upgrade(port, token)
        self.sent = 0
        self.last_progress = time.monotonic()
        self.stop = threading.Event()
        self.error = None

    def run(self):
        frame = struct.pack("!BBQ", 0x82, 0x80 | 127, 65536) + b"\x00" * 4 + b"\x33" * 65536
        self.sock.setblocking(False)
        view = memoryview(frame)
        offset = 0
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT)
        while not self.stop.is_set():
            poller.poll(200)
            try:
                sent = self.sock.send(view[offset:])
            except WANT_IO:
                continue
            except (OSError, ssl.SSLError) as exc:
                self.error = exc
                return
            if sent:
                self.sent += sent
                self.last_progress = time.monotonic()
                offset = (offset + sent) % len(frame)

    def blocked_for(self):
        return time.monotonic() - self.last_progress

    def close(self, reset=False):
        self.stop.set()
        self.join(5)
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# =====================================================================================
# Desktops
# =====================================================================================

def test_desktop_reset_mid_stream_closes_with_1011_and_frees_everything(
        gateway, manager, spice_factory):
    echo = spice_factory(fakes.echo)
    threads, fds, _ = baseline(gateway, manager, echo)
    resetting = spice_factory(reset_after(100000, 300000))
    token = gateway.desktop_token(manager, resetting)["spice_port"]
    with NormalFlow(gateway, manager, echo) as flow:
        with open_ws(gateway.port, token) as ws:
            ws.send(fakes.pattern(100000, seed=1))
            got = ws.recv(300000, timeout=10)     # some or all of it: a reset may drop data
            assert got == fakes.pattern(300000, seed=3)[:len(got)]
            assert ws.wait_close(10) == 1011
        flow.wait_round()
    settle(gateway, threads, fds)
    line = [ln for ln in gateway.log_text().splitlines()
            if "tunnel ended" in ln and f":{resetting.port}," in ln]
    assert len(line) == 1 and "desktop connection lost" in line[0], line
    assert_clean_log(gateway)


def test_desktop_reset_during_an_upload_ends_the_tunnel_without_blocking_the_client(
        gateway, manager, spice_factory):
    echo = spice_factory(fakes.echo)
    threads, fds, _ = baseline(gateway, manager, echo)
    resetting = spice_factory(reset_after(1 << 20, 0))
    token = gateway.desktop_token(manager, resetting)["spice_port"]
    uploader = Uploader(gateway.port, token)
    uploader.start()
    try:
        wait_for(lambda: uploader.error is not None or uploader.blocked_for() > 3, 20,
                 message="the upload to end or block")
        assert resetting.records[0]["closed"].wait(5)
        # The gateway ended the tunnel: the client's writes fail instead of hanging.
        wait_for(lambda: uploader.error is not None, 10, message="the client to see the end")
    finally:
        uploader.close()
    settle(gateway, threads, fds)
    assert_clean_log(gateway)


def test_desktop_that_stops_reading_blocks_only_its_own_tunnel(gateway, manager,
                                                               spice_factory):
    """Back-pressure: the client's writes block, the gateway buffers nothing of its
    own, other tunnels keep their speed; closing the client frees everything."""
    echo = spice_factory(fakes.echo)
    threads, fds, rss = baseline(gateway, manager, echo)
    before = best_speed(gateway, manager, echo)
    deafs = spice_factory(deaf)
    token = gateway.desktop_token(manager, deafs)["spice_port"]
    uploaders = [Uploader(gateway.port, token) for _ in range(2)]
    for uploader in uploaders:
        uploader.start()
    try:
        wait_for(lambda: all(u.blocked_for() > 2 for u in uploaders), 40,
                 message="the uploads to block")
        assert all(u.error is None for u in uploaders)
        accepted = [u.sent for u in uploaders]
        # Kernel buffers only (client send buffer, gateway receive and send buffers,
        # the desktop's receive buffer): tens of MiB at most, never the whole upload.
        assert all(a < 100 << 20 for a in accepted), accepted
        peak_rss, during = others_unaffected(gateway, manager, echo, rss, before, 32)
        assert all(u.blocked_for() > 2 for u in uploaders)
    finally:
        # Gone with a reset: a FIN would wait behind the upload that the gateway no
        # longer reads (and so would the answer to a Ping), so only the client's
        # kernel giving up could tell; see the report.
        for uploader in uploaders:
            uploader.close(reset=True)
    try:
        # The clients are gone: the gateway ends both tunnels within seconds although
        # the desktop never reads what is still queued for it.
        settle(gateway, threads, fds, timeout=10)
    finally:
        for record in deafs.records:
            record["release"].set()
    assert_clean_log(gateway)
    print(f"\nuploads blocked after {[a >> 20 for a in accepted]} MiB, gateway RSS "
          f"{rss} -> {peak_rss} KiB, echo speed {before:.0f} -> {during:.0f} MB/s")


def test_client_gone_while_its_desktop_does_not_read_is_released(gateway_factory, manager,
                                                                   spice_factory):
    """The client closes normally while its upload waits on a desktop that does not
    read. Its FIN waits behind the upload the gateway no longer reads (and so would a
    Pong), so only writing to the client tells that it is gone (its kernel answers
    with a reset): with KeepAlive on, the tunnel must still end within seconds."""
    gateway = gateway_factory(KeepAlive=1, PongTimeout=2)
    echo = spice_factory(fakes.echo)
    threads, fds, _ = baseline(gateway, manager, echo)
    deafs = spice_factory(deaf)
    token = gateway.desktop_token(manager, deafs)["spice_port"]
    uploader = Uploader(gateway.port, token)
    uploader.start()
    try:
        wait_for(lambda: uploader.blocked_for() > 2, 40, message="the upload to block")
        uploader.close()                   # FIN, no reset
        closed_at = time.monotonic()
        settle(gateway, threads, fds, timeout=10)
        took = time.monotonic() - closed_at
        line = [ln for ln in gateway.log_text().splitlines()
                if "tunnel ended" in ln and f":{deafs.port}," in ln]
        assert len(line) == 1, line
    finally:
        uploader.close()
        for record in deafs.records:
            record["release"].set()
    assert_clean_log(gateway)
    print(f"\nreleased {took:.1f} s after the client left")


# =====================================================================================
# Clients
# =====================================================================================

def test_clients_that_stop_reading_while_desktops_flood(gateway, manager, spice_factory):
    """Four frozen readers with flooding desktops: bounded memory, other tunnels keep
    their speed; when those desktops then reset, their tunnels end within seconds
    although the clients are still frozen (no write blocked forever)."""
    echo = spice_factory(fakes.echo)
    threads, fds, rss = baseline(gateway, manager, echo)
    before = best_speed(gateway, manager, echo)
    floods = [spice_factory(flood_until_reset) for _ in range(4)]
    frozen = [open_ws(gateway.port, gateway.desktop_token(manager, f)["spice_port"])
              for f in floods]
    try:
        wait_for(lambda: all(f.records and "sent" in f.records[0] for f in floods), 10,
                 message="desktops flooding")
        stalled = {}

        def all_stalled():
            now = [f.records[0]["sent"] for f in floods]
            same = now == stalled.get("last")
            stalled["last"] = now
            return same and all(now)
        wait_for(all_stalled, 40, interval=1.0, message="the floods to stall")
        peak_rss, during = others_unaffected(gateway, manager, echo, rss, before, 48)
        reset_at = time.monotonic()
        for f in floods:
            f.records[0]["reset"].set()

        def ended():
            text = gateway.log_text()
            return all(f"desktop {LOCAL}:{f.port}," in text for f in floods)
        wait_for(ended, 15, message="the flooded tunnels to end")
        took = time.monotonic() - reset_at
        assert took < 10, took
    finally:
        for ws in frozen:
            ws.abort()
    settle(gateway, threads, fds)
    assert_clean_log(gateway)
    print(f"\nflooded desktops stalled at {[s >> 20 for s in stalled['last']]} MiB, gateway "
          f"RSS {rss} -> {peak_rss} KiB, echo speed {before:.0f} -> {during:.0f} MB/s, "
          f"tunnels ended {took:.1f} s after the desktops reset")


@pytest.mark.parametrize("desktop, why", [
    ("idle", ("no answer to Ping",)),
    # A Ping stuck behind data frames is not out yet (PROTOCOL.md): whichever comes
    # first, a Ping that got out unanswered or the stalled writes, ends the tunnel.
    ("flooding", ("no answer to Ping", "client not reading")),
])
def test_client_vanishing_without_fin_or_rst_ends_by_keepalive(gateway_factory, manager,
                                                               spice_factory, desktop, why):
    """The client's network vanishes (a proxy that goes silent): no FIN, no RST. With
    KeepAlive on, the tunnel ends by PongTimeout and releases its threads and sockets;
    when the desktop keeps sending and the gateway's writes are blocked, by
    ClientStallTimeout."""
    gateway = gateway_factory(KeepAlive=1, PongTimeout=2, ClientStallTimeout=3)
    echo = spice_factory(fakes.echo)
    threads, fds, _ = baseline(gateway, manager, echo)
    target = spice_factory(fakes.echo if desktop == "idle" else flood)
    token = gateway.desktop_token(manager, target)["spice_port"]
    proxy = TcpProxy(gateway.port)
    try:
        with NormalFlow(gateway, manager, echo) as flow:
            # (the client answers Pings only while it reads: freeze right after)
            ws = open_ws(proxy.port, token)
            if desktop == "idle":
                echo_once(ws)
            else:
                assert len(ws.recv(1 << 20)) >= 1 << 20
            frozen_at = time.monotonic()
            proxy.freeze()
            assert wait_for(lambda: target.records, 5)[0]["closed"].wait(15)
            took = time.monotonic() - frozen_at
            flow.wait_round()
        assert took < 8, took
        wait_for(lambda: any(w in gateway.log_text() for w in why), 5,
                 message=f"{why!r} in the log; tunnel end lines: "
                 + repr([x for x in gateway.log_text().splitlines() if "tunnel ended" in x]))
        settle(gateway, threads, fds)
    finally:
        proxy.close()
    assert_clean_log(gateway)


# =====================================================================================
# The manager
# =====================================================================================

class ScriptedManager:
    """A TLS server that reads one request and then runs `script(tls_socket)`."""

    def __init__(self, cert_file, script):
        self.script = script
        self.requests = 0
        self._stop = threading.Event()
        self._listener = socket.create_server((LOCAL, 0))
        self.address = f"{LOCAL}:{self._listener.getsockname()[1]}"
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert_file)
        fakes_accept = getattr(fakes, "accept_loop", None)
        target = (lambda: fakes_accept(self._listener, self._stop, self._serve)) \
            if fakes_accept else self._accept
        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()

    def _accept(self):
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock):
        sock.settimeout(30)
        try:
            tls = self._context.wrap_socket(sock, server_side=True)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = tls.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            while len(body) < length:
                body += tls.recv(65536)
            self.requests += 1
            self.script(tls, self._stop)
            tls.close()
        except (OSError, ssl.SSLError):
            pass
        finally:
            sock.close()

    def stop(self):
        self._stop.set()
        self._listener.close()


def trickle_body(interval):
    def script(tls, stop):
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n")
        for _ in range(1000):
            if stop.wait(interval):
                return
            tls.sendall(b" ")
    return script


def trickle_head(interval):
    def script(tls, stop):
        for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"s" * 5000:
            if stop.wait(interval):
                return
            tls.sendall(bytes([byte]))
    return script


def oversized(tls, stop):
    size = 17 << 20
    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % size)
    chunk = b" " * (1 << 20)
    for _ in range(17):
        tls.sendall(chunk)


def truncated_chunked(tls, stop):
    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n10\r\n{\"status\": \"OK\",")


def bad_chunk_size(tls, stop):
    tls.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")


def head_cut_mid_line(tls, stop):
    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/js")


def head_cut_after_a_line(tls, stop):
    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")


def headers_then_hang(tls, stop):
    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    stop.wait(60)


def test_manager_restart_between_desktop_and_tunnels(gateway_factory, manager, certs,
                                                     spice_factory):
    """Tokens live in the gateway: tunnels open while the manager is down, and the
    gateway talks to the restarted manager as soon as it is back."""
    proxy = TcpProxy(manager.port)
    gateway = gateway_factory(ManagerIP=f"{LOCAL}:{proxy.port}")
    spice = spice_factory(fakes.echo)
    try:
        token = gateway.desktop_token(manager, spice)["spice_port"]
        first = open_ws(gateway.port, token)
        echo_once(first, tag=b"first")
        proxy.down()                               # the manager goes away
        status, answer = post_json(LOCAL, gateway.port, "/vdi/authmode", {"hwaddress": "x"})
        assert status == 200 and answer["status"] == "Error"
        wait_for(lambda: f"manager {LOCAL}:{proxy.port}: connection refused"
                 in gateway.log_text(), 5, message="the refused manager in the log")
        channels = [open_ws(gateway.port, token) for _ in range(3)]   # while it is down
        for i, ws in enumerate([first, *channels]):
            echo_once(ws, 70000, tag=b"channel %d" % i)
        restarted = fakes.FakeManager(certs["manager"], "restarted")
        try:
            restarted.desktop = spice.address
            proxy.up(restarted.port)               # back, same address, new process
            status, answer = post_json(LOCAL, gateway.port, "/vdi/desktop", BODY)
            assert status == 200 and answer["status"] == "OK"
            assert restarted.paths() == ["/vdi/desktop"]
            late = open_ws(gateway.port, token)     # the old token still works
            echo_once(late, tag=b"late")
            with open_ws(gateway.port, answer["spice_port"]) as fresh:
                echo_once(fresh, tag=b"fresh")
            for ws in [first, late, *channels]:
                echo_once(ws, tag=b"after")
                ws.abort()
        finally:
            restarted.stop()
    finally:
        proxy.close()
    assert_clean_log(gateway)


def test_slow_manager_delays_nobody_else(gateway, manager, spice_factory):
    echo = spice_factory(fakes.echo)
    threads, fds, _ = baseline(gateway, manager, echo)

    def slow(path, body):
        if body.get("slow"):
            time.sleep(3)       # this request's own handler thread in the fake manager
    manager.answer_override = slow
    results = []

    def slow_client():
        started = time.monotonic()
        status, answer = post_json(LOCAL, gateway.port, "/vdi/authmode",
                                   {"hwaddress": "slow", "slow": True})
        results.append((status, answer["status"], time.monotonic() - started))
    slow_clients = [threading.Thread(target=slow_client) for _ in range(8)]
    with NormalFlow(gateway, manager, echo) as flow:
        started = time.monotonic()
        for thread in slow_clients:
            thread.start()
        took = flow.wait_round()
        assert took < 2.5, f"a normal round took {took:.1f} s behind slow requests"
        for thread in slow_clients:
            thread.join(20)
        assert flow.rounds_between(started, started + 3) >= 2
    assert [r[:2] for r in results] == [(200, "OK")] * 8
    assert all(2.5 < r[2] < 10 for r in results), results
    settle(gateway, threads, fds)


@pytest.mark.parametrize("script, why", [
    (trickle_body(0.3), "no answer within 2 s"),
    (trickle_head(0.3), "no answer within 2 s"),
    (headers_then_hang, "no answer within 2 s"),
], ids=["body byte by byte", "head byte by byte", "headers then silence"])
def test_manager_trickling_is_cut_at_manager_timeout(gateway_factory, certs, script, why):
    """ManagerTimeout is the time the manager has for its whole answer, not per read:
    one byte every 0.3 s must not hold the client (and a gateway thread) for minutes."""
    slow = ScriptedManager(certs["manager"], script)
    try:
        gateway = gateway_factory(ManagerIP=slow.address, ManagerTimeout=2)
        started = time.monotonic()
        try:
            status, answer = post_json(LOCAL, gateway.port, "/vdi/desktop", BODY, timeout=15)
        except socket.timeout:
            status = answer = None
        took = time.monotonic() - started
        assert took < 5, f"the client waited {took:.1f} s for an answer"
        assert status == 200 and answer["status"] == "Error", answer
        wait_for(lambda: why in gateway.log_text(), 5, message=why)
        assert_clean_log(gateway)
    finally:
        slow.stop()


@pytest.mark.parametrize("fault", ["error500", "truncated", "garbage", "close", "hang",
                                   oversized, truncated_chunked, bad_chunk_size,
                                   head_cut_mid_line, head_cut_after_a_line],
                         ids=["500", "truncated", "garbage", "close", "hang", "over 16 MiB",
                              "truncated chunked", "bad chunk size", "head cut mid-line",
                              "head cut after a line"])
def test_manager_faults_leave_open_tunnels_alone(gateway_factory, manager, certs,
                                                 spice_factory, fault):
    spice = spice_factory(fakes.echo)
    scripted = ScriptedManager(certs["manager"], fault) if callable(fault) else None
    proxy = TcpProxy(manager.port)
    gateway = gateway_factory(ManagerIP=f"{LOCAL}:{proxy.port}", ManagerTimeout=2)
    try:
        token = gateway.desktop_token(manager, spice)["spice_port"]
        tunnels = [open_ws(gateway.port, token) for _ in range(3)]
        if scripted:
            proxy.down()
            proxy.up(int(scripted.address.rsplit(":", 1)[1]))
        else:
            manager.mode = fault
        started = time.monotonic()
        status, _, raw = post(LOCAL, gateway.port, "/vdi/desktop", BODY, timeout=30)
        took = time.monotonic() - started
        if fault == "error500":
            assert (status, raw) == (500, b"internal error")   # passes through
        else:
            answer = json.loads(raw)
            assert status == 200 and answer["status"] == "Error", answer
            assert "127.0.0.1" not in answer["message"]
            wait_for(lambda: f"manager {LOCAL}:{proxy.port}:" in gateway.log_text(), 5,
                     message="the manager and the cause in the log")
        assert took < 5, took
        for i, ws in enumerate(tunnels):
            echo_once(ws, 70000, tag=b"tunnel %d" % i)
        late = open_ws(gateway.port, token)
        echo_once(late, tag=b"late")
        for ws in [*tunnels, late]:
            ws.close()
            assert ws.wait_close() == 1000
            ws.abort()
        assert_clean_log(gateway)
    finally:
        proxy.close()
        if scripted:
            scripted.stop()


# =====================================================================================
# File descriptors
# =====================================================================================

def test_out_of_file_descriptors(gateway_factory, manager, spice_factory):
    """RLIMIT_NOFILE of the running gateway lowered to what it holds plus a few: at
    the last descriptor the desktop connect (502) and the manager connect (Error
    answer) fail cleanly; with none left, accept() fails, and the accept loop backs
    off (low CPU) and logs it every few seconds; freed descriptors serve again."""
    gateway = gateway_factory()
    echo = spice_factory(fakes.echo)
    threads, fds, _ = baseline(gateway, manager, echo)
    token = gateway.desktop_token(manager, echo)["spice_port"]
    threads, fds = quiet_counts(gateway)
    held = 6                                    # tunnels of 2 descriptors each
    limit = fds + 2 * held + 1                  # ... leaving exactly one free
    resource.prlimit(gateway.pid, resource.RLIMIT_NOFILE, (limit, limit))
    tunnels, idle = [], []
    try:
        tunnels = [open_ws(gateway.port, token) for _ in range(held)]
        wait_for(lambda: gateway.fds() == limit - 1, 10,
                 message=f"{limit - 1} descriptors (now {gateway.fds()})")
        # One descriptor left: the client's connection takes it, the desktop gets none.
        with pytest.raises(Rejected) as rejected:
            open_ws(gateway.port, token)
        assert rejected.value.status == 502
        status, answer = post_json(LOCAL, gateway.port, "/vdi/authmode", {"hwaddress": "x"})
        assert status == 200 and answer["status"] == "Error"
        wait_for(lambda: "Too many open files" in gateway.log_text(), 5,
                 message="the cause in the log")
        # None left: accept() fails; the connections wait in the listen backlog.
        idle = [socket.create_connection((LOCAL, gateway.port)) for _ in range(6)]
        wait_for(lambda: "cannot accept connections" in gateway.log_text(), 5,
                 message="the accept failure in the log")
        cpu_before, wall_before = cpu_seconds(gateway.pid), time.monotonic()
        wait_for(lambda: time.monotonic() - wall_before > 3, 5, message="3 s")
        cpu = cpu_seconds(gateway.pid) - cpu_before
        wall = time.monotonic() - wall_before
        assert cpu < 0.3 * wall, f"{cpu:.2f} s of CPU in {wall:.1f} s: a busy loop"
        assert gateway.proc.poll() is None
        for ws in tunnels:
            echo_once(ws, tag=b"still there")   # the open tunnels are unaffected
        lines = [ln for ln in gateway.log_text().splitlines() if "cannot accept" in ln]
        assert len(lines) <= 2, lines           # once every few seconds, not a flood
    finally:
        for sock in idle:
            sock.close()
        for ws in tunnels:
            ws.abort()
    settle(gateway, threads, fds, timeout=20)
    # Descriptors are free again: the whole flow works at once.
    started = time.monotonic()
    answer = gateway.desktop_token(manager, echo)
    with open_ws(gateway.port, answer["spice_port"]) as ws:
        echo_once(ws, 70000)
    assert time.monotonic() - started < 5
    assert gateway.proc.poll() is None
    assert_clean_log(gateway)
    print(f"\nout of descriptors at {limit}: {cpu:.2f} s CPU in {wall:.1f} s, "
          f"{len(lines)} log line(s)")
