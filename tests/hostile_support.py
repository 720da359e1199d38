"""Shared pieces of the hostile-input, fault and load tests.

- NormalFlow: a well-behaved client doing the whole flow (authmode, desktop, a fresh
  tunnel with an echo, plus one long-lived tunnel) in a loop in its own thread, so a
  test can show that whatever it does to the gateway disturbs nobody else;
- converse(): sends raw bytes (plain or TLS) while reading whatever comes back, in
  one thread with non-blocking I/O (an SSL socket must not be used by two threads);
- raw WebSocket helpers: an upgrade by hand, masked frames built by hand (any bits,
  any opcode, any length field), reading the gateway's Close code;
- TcpProxy: a relay between a client and the gateway that can "freeze" like a client
  whose network vanished (no FIN, no RST, nothing read or written any more);
- crafted TLS ClientHellos of old versions, /proc readings (CPU time, RSS).

Nothing here sleeps to wait for a server: every wait polls with a deadline.
"""

import hashlib
import json
import os
import random
import re
import select
import socket
import ssl
import struct
import threading
import time
import traceback

import wsclient
from conftest import wait_for
from wsclient import client_context, post_json
from wsproto.utilities import LocalProtocolError

LOCAL = "127.0.0.1"
WANT_IO = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the well-behaved client -----------------------------------------------------------

class WsClient(wsclient.WsClient):
    """wsclient.WsClient, but a Ping that crosses our own Close is let go: no Pong is
    due any more (RFC 6455 5.5.2), and wsproto refuses to send one after a Close."""

    def event(self, timeout=None):
        try:
            return super().event(timeout)
        except LocalProtocolError:
            return None


class NormalFlow:
    """The whole client flow in a loop, in a thread, while a test attacks the gateway.

    Each round: POST /vdi/authmode, POST /vdi/desktop, a fresh tunnel with the new
    token carrying random data both ways (verified byte for byte), Close 1000; plus a
    round trip on one tunnel held open for the whole test. Any failure is kept and
    reported by check()/exit; a round slower than `round_limit_s` is a failure too.
    """

    def __init__(self, gateway, manager, spice, round_limit_s=8.0, pause_s=0.02):
        self.gateway = gateway
        self.manager = manager
        self.spice = spice
        self.round_limit_s = round_limit_s
        self.pause_s = pause_s
        self.rounds = []          # (started, ended) of each successful round
        self.errors = []
        self.tunnels_opened = 0
        self.bytes_verified = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._random = random.Random(1234)
        self._thread = None
        self._held = None

    # -- one round ---------------------------------------------------------------

    def _token(self):
        port = self.gateway.port
        status, answer = post_json(LOCAL, port, "/vdi/authmode",
                                   {"hwaddress": "normal-client"}, timeout=20)
        assert status == 200 and answer.get("status") == "OK", answer
        status, answer = post_json(LOCAL, port, "/vdi/desktop",
                                   {"hwaddress": "normal-client", "username": "normal",
                                    "password": "pw", "desktop": "d"}, timeout=20)
        assert status == 200 and answer.get("status") == "OK", answer
        return answer["spice_port"]

    def _echo(self, ws, sizes):
        for size in sizes:
            data = self._random.randbytes(size)
            ws.send(data)
            got = ws.recv(size, timeout=self.round_limit_s)
            assert got == data, f"echo of {size} bytes came back as {len(got)} other bytes"
            self.bytes_verified += size

    def _open(self, token):
        ws = WsClient(LOCAL, self.gateway.port, f"/?ver=2&token={token}",
                      subprotocols=["binary"], timeout=self.round_limit_s)
        self.tunnels_opened += 1
        return ws

    def round(self):
        started = time.monotonic()
        token = self._token()
        ws = self._open(token)
        try:
            self._echo(ws, [1, self._random.randint(2, 70000), 4096])
            ws.close(1000)
            code = ws.wait_close(self.round_limit_s)
            assert code == 1000, f"Close answered with {code}"
        finally:
            ws.abort()
        if self._held is not None:
            self._echo(self._held, [self._random.randint(1, 3000)])
        ended = time.monotonic()
        assert ended - started < self.round_limit_s, f"round took {ended - started:.1f} s"
        with self._lock:
            self.rounds.append((started, ended))

    def _run(self):
        while not self._stop.is_set():
            try:
                self.round()
            except Exception:   # every failure is reported by check()
                with self._lock:
                    self.errors.append((time.monotonic(), traceback.format_exc()))
                self._stop.wait(0.2)
            self._stop.wait(self.pause_s)

    # -- what tests use ----------------------------------------------------------

    def start(self):
        self.manager.desktop = self.spice.address
        self._held = self._open(self._token())
        self._echo(self._held, [100])
        self._thread = threading.Thread(target=self._run, name="normal-flow", daemon=True)
        self._thread.start()
        self.wait_round()
        return self

    def wait_round(self, timeout=20.0):
        """Waits for a whole successful round that started after this call."""
        since = time.monotonic()
        wait_for(lambda: self.errors or any(s >= since for s, _ in self.rounds), timeout,
                 message="a normal client round")
        self.check()
        return time.monotonic() - since

    def rounds_between(self, start, end):
        with self._lock:
            return sum(1 for s, e in self.rounds if e >= start and s <= end)

    def check(self):
        with self._lock:
            errors = list(self.errors)
        assert not errors, "the normal client was disturbed:\n" + errors[0][1]

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            assert not self._thread.is_alive(), "normal client thread did not stop"
        if self._held is not None:
            self._held.close(1000)
            code = self._held.wait_close(10)
            self._held.abort()
            self._held = None
            assert code == 1000, f"the long-lived tunnel was closed with {code}"
        self.check()

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.stop()
        else:
            self._stop.set()
            if self._held is not None:
                self._held.abort()


# -- raw conversations -----------------------------------------------------------------

class Conversation:
    """What came back from converse()."""

    def __init__(self, data, client_port, closed, reset, seconds, sent):
        self.data = data
        self.client_port = client_port
        self.closed = closed      # the gateway closed (EOF or reset) within the time
        self.reset = reset
        self.seconds = seconds
        self.sent = sent

    @property
    def answers(self):
        return parse_answers(self.data)

    @property
    def statuses(self):
        return [status for status, _, _ in self.answers]

    def __repr__(self):
        return (f"Conversation(statuses={self.statuses}, closed={self.closed}, "
                f"reset={self.reset}, {self.seconds:.2f} s, data={self.data[:200]!r})")


def open_socket(port, tls=True, timeout=10):
    sock = socket.create_connection((LOCAL, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client_port = sock.getsockname()[1]
    if tls:
        sock = client_context().wrap_socket(sock)
    return sock, client_port


def converse(port, data, tls=True, timeout=10.0, until_closed=True, sock=None):
    """Sends `data` while reading; returns when the gateway closed or after `timeout`.

    Writing stops quietly at the first error (the gateway may refuse mid-request and
    close). With until_closed=False it also returns as soon as one whole answer is in.
    `data` may be a list of pieces: each goes out in its own send() call, so over TLS
    a piece under 16 KiB is one record, which the gateway reads in one go.
    """
    if sock is None:
        sock, client_port = open_socket(port, tls)
    else:
        client_port = sock.getsockname()[1]
    started = time.monotonic()
    deadline = started + timeout
    pieces = [memoryview(p) for p in (data if isinstance(data, (list, tuple)) else [data])]
    pieces = [p for p in pieces if p.nbytes]
    sent = offset = 0
    received = bytearray()
    closed = reset = False
    writing = bool(pieces)
    try:
        sock.setblocking(False)
        while time.monotonic() < deadline:
            pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
            if not pending:
                poller = select.poll()
                poller.register(sock, select.POLLIN | (select.POLLOUT if writing else 0))
                events = 0
                for _, event in poller.poll(
                        int(1000 * max(0.0, min(0.5, deadline - time.monotonic())))):
                    events |= event
                readable = events & (select.POLLIN | select.POLLHUP | select.POLLERR)
                writable = events & (select.POLLOUT | select.POLLERR)
            else:
                readable, writable = True, False
            if readable:
                try:
                    chunk = sock.recv(262144)
                except WANT_IO:
                    chunk = None
                except (ConnectionError, ssl.SSLError, OSError) as exc:
                    reset = isinstance(exc, ConnectionResetError)
                    closed = True
                    break
                if chunk == b"":
                    closed = True
                    break
                if chunk:
                    received += chunk
                    if not until_closed and parse_answers(bytes(received)):
                        break
            if writing and writable:
                try:
                    count = sock.send(pieces[0][offset:offset + 262144])
                    sent += count
                    offset += count
                    if offset >= pieces[0].nbytes:
                        pieces.pop(0)
                        offset = 0
                        writing = bool(pieces)
                except WANT_IO:
                    pass
                except (OSError, ssl.SSLError):
                    writing = False
    finally:
        sock.close()
    return Conversation(bytes(received), client_port, closed, reset,
                        time.monotonic() - started, sent)


def parse_answers(data):
    """Every whole HTTP answer in `data`: [(status, headers dict lower-cased, body)]."""
    answers = []
    while data.startswith(b"HTTP/1."):
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        try:
            status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            break
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            break
        answers.append((status, headers, rest[:length]))
        data = rest[length:]
    return answers


# -- the log ---------------------------------------------------------------------------

def lines_about(gateway, client_port, levels=("INFO", "WARNING", "ERROR", "CRITICAL")):
    """Log lines (of these levels) that name the client connection 127.0.0.1:<port>."""
    pattern = re.compile(rf"127\.0\.0\.1:{client_port}(?!\d)")
    out = []
    for line in gateway.log_text().splitlines():
        parts = line.split(" ", 4)
        level = parts[3] if len(parts) > 3 else ""
        if level in levels and pattern.search(line):
            out.append(line)
    return out


def assert_clean_log(gateway):
    text = gateway.log_text()
    assert "Traceback" not in text, text[-3000:]
    assert "internal error" not in text, text[-3000:]
    assert "relay failed" not in text, text[-3000:]


def one_line_about(gateway, client_port, timeout=5.0):
    """Waits for the log line about this connection; asserts it is exactly one."""
    wait_for(lambda: lines_about(gateway, client_port), timeout,
             message=f"a log line about 127.0.0.1:{client_port}")
    lines = lines_about(gateway, client_port)
    assert len(lines) == 1, lines
    assert_clean_log(gateway)
    return lines[0]


# -- WebSocket by hand -----------------------------------------------------------------

def upgrade_head(token, subprotocol="binary", version="13", key="dGhlIHNhbXBsZSBub25jZQ==",
                 target=None, extra=b""):
    lines = [f"GET {target or f'/?ver=2&token={token}'} HTTP/1.1", "Host: gw.test",
             "Upgrade: websocket", "Connection: Upgrade"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n").encode() + extra + b"\r\n"


def raw_upgrade(port, token, subprotocol="binary", timeout=10):
    """(TLS socket after a 101, client port, bytes that came after the 101 head)."""
    sock, client_port = open_socket(port, tls=True, timeout=timeout)
    sock.sendall(upgrade_head(token, subprotocol))
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in buf:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(4096)
        assert chunk, f"closed before the 101: {buf!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock, client_port, rest


def masked_frame(opcode, payload=b"", fin=True, rsv=0, mask=None, length_field=None,
                 masked=True):
    """A client frame with any bits: rsv is the 3 reserved bits (0..7); `length_field`
    (126 or 127 with the value to write) forces the extended length encoding."""
    mask = mask if mask is not None else os.urandom(4)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    length = len(payload)
    if length_field is not None:
        code, value = length_field
        extended = struct.pack("!H", value) if code == 126 else struct.pack("!Q", value)
    elif length < 126:
        code, extended = length, b""
    elif length < 65536:
        code, extended = 126, struct.pack("!H", length)
    else:
        code, extended = 127, struct.pack("!Q", length)
    second = (0x80 if masked else 0) | code
    if not masked:
        return bytes([first, second]) + extended + payload
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([first, second]) + extended + mask + body


def read_server_frames(sock, initial=b"", timeout=10.0, stop_at_close=True):
    """Server frames [(opcode, payload)] until a Close (or EOF / timeout)."""
    buf = bytearray(initial)
    frames = []
    deadline = time.monotonic() + timeout
    eof = False
    while True:
        while len(buf) >= 2:
            code = buf[1] & 0x7F
            head = 2 + {126: 2, 127: 8}.get(code, 0)
            if len(buf) < head:
                break
            length = code
            if code == 126:
                length = struct.unpack("!H", buf[2:4])[0]
            elif code == 127:
                length = struct.unpack("!Q", buf[2:10])[0]
            if len(buf) < head + length:
                break
            frames.append((buf[0] & 0x0F, bytes(buf[head:head + length])))
            del buf[:head + length]
            if stop_at_close and frames[-1][0] == 8:
                return frames, False
        if eof or time.monotonic() >= deadline:
            return frames, eof
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(262144)
        except socket.timeout:
            continue
        except (ConnectionError, ssl.SSLError, OSError):
            chunk = b""
        if not chunk:
            eof = True
        buf += chunk


def close_code_of(frames):
    for opcode, payload in frames:
        if opcode == 8:
            return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
    return None


def wait_eof(sock, timeout=10.0):
    """True if the gateway closes the connection within `timeout` (data is dropped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            continue
        except (ConnectionError, ssl.SSLError, OSError):
            return True
    return False


# -- TLS by hand -----------------------------------------------------------------------

def client_hello(version, record_version=0x0301):
    """A ClientHello offering only `version` (0x0300 SSLv3 .. 0x0302 TLS 1.1) and old
    RSA/ECDHE-CBC suites, with no supported_versions extension: what an old client
    sends whatever the local OpenSSL would allow."""
    suites = [0x002F, 0x0035, 0xC013, 0xC014, 0xC009, 0xC00A, 0x000A]
    body = (struct.pack("!H", version) + os.urandom(32) + b"\x00"
            + struct.pack("!H", 2 * len(suites))
            + b"".join(struct.pack("!H", s) for s in suites) + b"\x01\x00")
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16" + struct.pack("!HH", record_version, len(handshake)) + handshake


def real_client_hello():
    """The first flight of a real TLS client (Python's ssl), to cut in the middle."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context().wrap_bio(incoming, outgoing, server_hostname="gw.test")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


# -- a relay that can play a vanished client -------------------------------------------

class TcpProxy:
    """client <-> proxy <-> target on loopback.

    freeze() makes every connection go silent, like a client whose network vanished:
    nothing read or written any more, no FIN, no RST. down() closes the port and every
    connection (a server that stopped: connections are refused); up(target) listens on
    the same port again (the server restarted, maybe elsewhere)."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.frozen = threading.Event()
        self.sockets = []
        self._listener = socket.create_server((LOCAL, 0))
        self.port = self._listener.getsockname()[1]
        self._start()

    def _start(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, args=(self._listener, self._stop),
                                        name="proxy", daemon=True)
        self._thread.start()

    def _accept(self, listener, stop):
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection((LOCAL, self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, stop), daemon=True).start()

    def _pump(self, source, sink, stop):
        source.settimeout(0.2)
        while not stop.is_set():
            if self.frozen.is_set():
                stop.wait(0.2)
                continue
            try:
                data = source.recv(65536)
            except socket.timeout:
                continue
            except OSError:          # reset: pass the end on
                self._shutdown(sink, socket.SHUT_RDWR)
                return
            if not data:
                self._shutdown(sink, socket.SHUT_WR)
                return
            # Both sockets carry a 0.2 s timeout (each is the other pump's source): a
            # slow reader must make us wait, not look like a reset (sendall would
            # raise and lose count of what it sent).
            view = memoryview(data)
            while view.nbytes and not stop.is_set():
                if self.frozen.is_set():
                    stop.wait(0.2)
                    continue
                try:
                    view = view[sink.send(view):]
                except socket.timeout:
                    continue
                except OSError:
                    self._shutdown(source, socket.SHUT_RDWR)
                    return

    @staticmethod
    def _shutdown(sock, how):
        try:
            sock.shutdown(how)
        except OSError:
            pass

    def freeze(self):
        self.frozen.set()

    def down(self):
        self._stop.set()
        self._listener.close()
        self._thread.join(5)
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass
        self.sockets = []

    def up(self, target_port=None):
        if target_port is not None:
            self.target_port = target_port
        self._listener = socket.create_server((LOCAL, self.port))
        self._start()

    def close(self):
        self.down()


# -- /proc -----------------------------------------------------------------------------

def quiet_counts(gateway, timeout=15.0, quiet_s=0.5):
    """(threads, fds) of the gateway once they have not changed for `quiet_s`: the
    baseline after a warm-up, with no connection still on its way out."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        now = (gateway.threads(), gateway.fds())
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"the gateway's thread and fd counts never settled: {now}")
        time.sleep(0.05)   # polling /proc with a deadline


def settle(gateway, threads, fds, timeout=15.0):
    """Waits until the gateway is back to these thread and descriptor counts."""
    wait_for(lambda: gateway.threads() <= threads and gateway.fds() <= fds, timeout,
             message=f"threads {threads} and fds {fds} again "
                     f"(now {gateway.threads()} and {gateway.fds()})")


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def json_body(answer):
    return json.loads(answer[2])
