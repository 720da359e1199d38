"""Shared pieces of the benchmark (client side and fake backends).

- the test data (a fixed pseudo-random 1 MiB pattern, repeated) and the
  16-byte request header the fake backends understand;
- a small RFC 6455 client over ``ssl`` (blocking handshake, masked frames,
  a streaming decoder that hands payload slices to a callback without
  copying them);
- ``pump``: a single-threaded non-blocking loop that sends and receives at
  the same time on one socket (plain or TLS), used by the client and by the
  fake backends alike.  One thread per socket: an ``ssl.SSLSocket`` must not
  be read and written from two threads at once.
"""

import asyncio
import base64
import collections
import hashlib
import os
import random
import selectors
import socket
import ssl
import struct
import time

PATTERN_LEN = 1 << 20
PATTERN = random.Random(20240601).randbytes(PATTERN_LEN)
PATTERN_MV = memoryview(PATTERN)

# Request header sent first on every source/sink/duplex connection:
# magic, number of bytes, flags.
HDR = struct.Struct(">4sQI")
MAGIC = b"BNC1"
FLAG_HASH = 1
# The sink answers with the byte count and the sha256 of what it received.
SINK_REPLY = struct.Struct(">Q32s")

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

WANT_IO = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class BenchError(Exception):
    """A test step failed (timeout, refused handshake, wrong data...)."""


def pattern_chunks(total, chunk):
    """Yield memoryview slices of the repeated pattern, ``total`` bytes in all."""
    off = 0
    while off < total:
        start = off % PATTERN_LEN
        k = min(chunk, total - off, PATTERN_LEN - start)
        yield PATTERN_MV[start:start + k]
        off += k


_DIGESTS = {}


def pattern_digest(total):
    """sha256 of the first ``total`` bytes of the repeated pattern (cached)."""
    if total not in _DIGESTS:
        h = hashlib.sha256()
        for mv in pattern_chunks(total, PATTERN_LEN):
            h.update(mv)
        _DIGESTS[total] = h.digest()
    return _DIGESTS[total]


# ---------------------------------------------------------------- masking

try:  # C helper shipped with the `websockets` package (optional)
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover - depends on the environment
    _c_apply_mask = None

_REP_CACHE = {}


def int_mask(data, key):
    """XOR ``data`` with the repeated 4-byte ``key`` using Python big ints."""
    n = len(data)
    if n == 0:
        return b""
    words = (n + 3) >> 2
    rep = _REP_CACHE.get(words)
    if rep is None:
        rep = int.from_bytes(b"\x01\x00\x00\x00" * words, "little")
        if len(_REP_CACHE) < 64:
            _REP_CACHE[words] = rep
    m = int.from_bytes(key, "little") * rep
    if n & 3:
        m &= (1 << (8 * n)) - 1
    return (int.from_bytes(data, "little") ^ m).to_bytes(n, "little")


MASK_IMPLS = {"int": int_mask}
if _c_apply_mask is not None:
    MASK_IMPLS["c"] = _c_apply_mask
_mask = MASK_IMPLS.get("c", int_mask)
MASK_NAME = "c" if "c" in MASK_IMPLS else "int"


def set_mask_impl(name):
    """Choose the masking function: 'c' (websockets.speedups) or 'int'."""
    global _mask, MASK_NAME
    if name == "auto":
        name = "c" if "c" in MASK_IMPLS else "int"
    _mask = MASK_IMPLS[name]
    MASK_NAME = name


def encode_frame(payload, opcode=OP_BINARY):
    """One final, masked client frame."""
    n = len(payload)
    b0 = 0x80 | opcode
    if n < 126:
        hdr = struct.pack("!BB", b0, 0x80 | n)
    elif n < 65536:
        hdr = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        hdr = struct.pack("!BBQ", b0, 0x80 | 127, n)
    key = os.urandom(4)
    return b"".join((hdr, key, _mask(payload, key)))


class Decoder:
    """Streaming decoder of server frames.

    Data payloads (binary, text, continuation) go to ``on_data`` as
    memoryview slices of the caller's buffer: use them before returning.
    Control frames go to ``on_control(opcode, payload)``.
    """

    def __init__(self, on_data, on_control):
        self.on_data = on_data
        self.on_control = on_control
        self.hdr = bytearray()
        self.remaining = 0
        self.ctrl_op = None
        self.ctrl_buf = bytearray()
        self.max_frame = 0

    def _header_len(self, b):
        if len(b) < 2:
            return 0
        if b[1] & 0x80:
            raise BenchError("server sent a masked frame")
        ln = b[1] & 0x7F
        return 2 + (2 if ln == 126 else 8 if ln == 127 else 0)

    def _start_frame(self, b, hlen):
        op = b[0] & 0x0F
        ln = b[1] & 0x7F
        if ln == 126:
            ln = struct.unpack_from("!H", b, 2)[0]
        elif ln == 127:
            ln = struct.unpack_from("!Q", b, 2)[0]
        self.max_frame = max(self.max_frame, ln)
        if op >= 0x8:
            self.ctrl_op = op
            self.ctrl_buf = bytearray()
            if ln == 0:
                self._end_control()
        elif op > 0x2:
            raise BenchError(f"server sent unknown opcode {op}")
        self.remaining = ln

    def _end_control(self):
        op, payload = self.ctrl_op, bytes(self.ctrl_buf)
        self.ctrl_op = None
        self.on_control(op, payload)

    def feed(self, mv):
        i, n = 0, len(mv)
        while i < n:
            if self.remaining:
                k = min(self.remaining, n - i)
                if self.ctrl_op is None:
                    self.on_data(mv[i:i + k])
                else:
                    self.ctrl_buf += mv[i:i + k]
                self.remaining -= k
                i += k
                if not self.remaining and self.ctrl_op is not None:
                    self._end_control()
                continue
            if not self.hdr:
                hlen = self._header_len(mv[i:i + 2])
                if hlen and n - i >= hlen:  # fast path: whole header here
                    self._start_frame(mv[i:i + hlen], hlen)
                    i += hlen
                    continue
            self.hdr += mv[i:i + 1]
            i += 1
            hlen = self._header_len(self.hdr)
            if hlen and len(self.hdr) == hlen:
                b = bytes(self.hdr)
                self.hdr = bytearray()
                self._start_frame(b, hlen)


# ------------------------------------------------------------ connections

# TLS session resumption (bench --resume): the last session per port and context,
# reused by the next connection to that port. A TLS 1.3 ticket arrives after the handshake,
# so a connection's session is kept when it closes, after it carried data.
RESUME = False
_sessions = {}


def client_context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Stream:
    """A TCP socket, optionally with TLS done through ``ssl.MemoryBIO``.

    With a memory BIO the socket is read in large chunks (one system call
    for many TLS records) instead of the two reads per record an
    ``SSLSocket`` makes; that keeps the client's own CPU cost low.
    """

    def __init__(self, sock, tls_ctx=None, server_side=False, deadline=None, port=None):
        self.sock = sock
        self.port = port
        self.obj = None
        self.eof = False
        self._out = None
        if tls_ctx is None:
            return
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._rbuf = bytearray(1 << 18)
        self._rmv = memoryview(self._rbuf)
        session = _sessions.get((port, id(tls_ctx))) if RESUME and not server_side else None
        self._ctx_id = id(tls_ctx)
        self.obj = tls_ctx.wrap_bio(self._in, self._out, server_side=server_side,
                                    server_hostname=None if server_side else "127.0.0.1",
                                    session=session)
        if deadline is None:
            deadline = time.monotonic() + 10.0
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush_blocking(deadline)
                data = self._recv_blocking(deadline)
                if not data:
                    raise BenchError("closed during the TLS handshake") from None
                self._in.write(data)
        self._flush_blocking(deadline)

    def _recv_blocking(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError("timed out")
        self.sock.settimeout(left)
        return self.sock.recv(1 << 20)

    def _flush_blocking(self, deadline):
        data = self._out.read() if self._out is not None else b""
        if data:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            self.sock.sendall(data)

    def wire(self, data):
        """Bytes to put on the socket for application data ``data``."""
        if self.obj is None:
            return data
        self.obj.write(data)
        return self._out.read()

    def pending_wire(self):
        """TLS bytes produced while reading (e.g. a key update answer)."""
        if self._out is None or not self._out.pending:
            return b""
        return self._out.read()

    def ingest(self, mv, on_plain):
        """Hand received socket bytes ``mv`` (b"" = EOF; None = nothing new,
        just decrypt what the TLS layer already holds) to on_plain as
        plaintext memoryviews (valid only during the call)."""
        if self.obj is None:
            if mv is None:
                return
            if len(mv):
                on_plain(mv)
            else:
                self.eof = True
            return
        if mv is None:
            pass
        elif len(mv):
            self._in.write(mv)
        else:
            self._in.write_eof()
        buf = self._rbuf
        while True:
            try:
                n = self.obj.read(len(buf), buf)
            except ssl.SSLWantReadError:
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.eof = True
                return
            if n == 0:
                self.eof = True
                return
            on_plain(self._rmv[:n])

    def close(self):
        if RESUME and self.obj is not None and self.port is not None:
            session = self.obj.session
            if session is not None and session.has_ticket:
                _sessions[(self.port, self._ctx_id)] = session
        try:
            self.sock.close()
        except OSError:
            pass


class Conn:
    """A byte stream to a backend: direct TCP or direct TLS."""

    is_ws = False

    def __init__(self, stream):
        self.stream = stream
        self.sock = stream.sock
        self.initial = b""
        self._buf = None

    def encode(self, payload):
        return payload

    def feed(self, mv, on_data):
        on_data(mv)

    def take_control(self):
        return None

    def send_wire(self, data, deadline):
        if data:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            self.sock.sendall(data)

    def sendall(self, payload, timeout=30.0):
        self.send_wire(self.stream.wire(self.encode(payload)), time.monotonic() + timeout)

    def recv_until(self, on_data, done, deadline):
        """Blocking: feed received data to on_data until done()."""

        def plain(mv):
            self.feed(mv, on_data)

        if self.initial:
            data, self.initial = self.initial, b""
            plain(memoryview(data))
        if self._buf is None:
            self._buf = memoryview(bytearray(1 << 18))
        self.stream.ingest(None, plain)  # data that came with the TLS handshake
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("timed out waiting for data")
            self.sock.settimeout(left)
            n = self.sock.recv_into(self._buf)
            self.stream.ingest(self._buf[:n], plain)
            out = self.stream.pending_wire()
            ctrl = self.take_control()
            if ctrl:
                out += self.stream.wire(ctrl)
            self.send_wire(out, deadline)
            if self.stream.eof and not done():
                raise BenchError("connection closed early")

    def roundtrip(self, payload, deadline):
        got = bytearray()
        self.sendall(payload)
        self.recv_until(got.extend, lambda: len(got) >= len(payload), deadline)
        if bytes(got) != bytes(payload):
            raise BenchError("echo mismatch")

    def shutdown_write(self):
        """Half-close: TLS close_notify (if TLS), then TCP shutdown."""
        try:
            if self.stream.obj is not None:
                try:
                    self.stream.obj.unwrap()
                except ssl.SSLError:
                    pass  # SSLWantReadError: the peer's close_notify is not awaited
                self.send_wire(self.stream.pending_wire(), time.monotonic() + 5.0)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self.stream.close()


class WSConn(Conn):
    """A WebSocket tunnel (client side of RFC 6455)."""

    is_ws = True

    def __init__(self, stream, initial=b""):
        super().__init__(stream)
        self.initial = initial
        self.controls = []
        self.close_code = None
        self.sent_close = False
        self._on_data = None
        self.decoder = Decoder(self._data, self._control)

    def _data(self, mv):
        self._on_data(mv)

    def _control(self, op, payload):
        if op == OP_PING:
            self.controls.append(encode_frame(payload, OP_PONG))
        elif op == OP_CLOSE:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            if not self.sent_close:
                self.sent_close = True
                self.controls.append(encode_frame(payload[:2], OP_CLOSE))

    def encode(self, payload):
        return encode_frame(payload)

    def feed(self, mv, on_data):
        self._on_data = on_data
        self.decoder.feed(mv)

    def take_control(self):
        if not self.controls:
            return None
        out = b"".join(self.controls)
        self.controls = []
        return out

    def close(self):
        try:
            self.sock.setblocking(True)
            pending = self.take_control() or b""
            if not self.sent_close:
                self.sent_close = True
                pending += encode_frame(struct.pack("!H", 1000), OP_CLOSE)
            self.send_wire(self.stream.wire(pending), time.monotonic() + 1.0)
        except (OSError, ssl.SSLError):
            pass
        super().close()


def _connect(port, tls_ctx, timeout):
    deadline = time.monotonic() + timeout
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Stream(sock, tls_ctx, deadline=deadline, port=port)
    except BaseException:
        sock.close()
        raise


def open_direct(port, tls_ctx=None, timeout=10.0):
    return Conn(_connect(port, tls_ctx, timeout))


def accept_stream(sock, tls_ctx=None, timeout=10.0):
    """Server side (fake backends): wrap an accepted socket."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Stream(sock, tls_ctx, server_side=True, deadline=time.monotonic() + timeout)


def _ws_request(port, path, key):
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: binary\r\n"
        "\r\n"
    ).encode("ascii")


def _check_ws_response(head, key):
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or parts[1] != "101":
        raise BenchError(f"upgrade refused: {lines[0][:80]}")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
    if headers.get("sec-websocket-accept") != accept:
        raise BenchError("bad Sec-WebSocket-Accept")
    if headers.get("sec-websocket-protocol") != "binary":
        raise BenchError("subprotocol 'binary' not echoed")


def open_ws(port, path, tls_ctx, timeout=10.0):
    """TLS connect + WebSocket upgrade; returns a WSConn."""
    deadline = time.monotonic() + timeout
    stream = _connect(port, tls_ctx, timeout)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        conn = Conn(stream)
        conn.sendall(_ws_request(port, path, key))
        buf = bytearray()
        conn.recv_until(buf.extend, lambda: b"\r\n\r\n" in buf or len(buf) > 65536, deadline)
        head, sep, rest = bytes(buf).partition(b"\r\n\r\n")
        if not sep:
            raise BenchError("no upgrade answer")
        _check_ws_response(head, key)
        return WSConn(stream, rest)
    except BaseException:
        stream.close()
        raise


# -------------------------------------------------------------------- pump

def pump(conn, out_chunks, on_data, done, deadline, max_reads=8):
    """Send every payload of ``out_chunks`` while feeding arriving data to
    ``on_data``; return once everything is sent and ``done()`` is true.

    Single thread, non-blocking socket, TLS through the stream's memory
    BIO.  Raises BenchError on timeout or on EOF before ``done()``.
    """
    sock = conn.sock
    stream = conn.stream
    sock.setblocking(False)
    rbuf = bytearray(1 << 20)
    rmv = memoryview(rbuf)
    out_iter = iter(out_chunks)
    out_done = False
    wire = collections.deque()
    wire_len = 0
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    events = selectors.EVENT_READ

    def plain(mv):
        conn.feed(mv, on_data)

    try:
        if conn.initial:
            data, conn.initial = conn.initial, b""
            plain(memoryview(data))
        stream.ingest(None, plain)
        while True:
            progress = False
            want_write = False
            # ---- produce wire bytes (bounded amount queued)
            while wire_len < 262144:
                ctrl = conn.take_control()
                if ctrl:
                    data = stream.wire(ctrl)
                elif not out_done:
                    nxt = next(out_iter, None)
                    if nxt is None:
                        out_done = True
                        break
                    data = stream.wire(conn.encode(nxt))
                else:
                    break
                if data:
                    wire.append(memoryview(data))
                    wire_len += len(data)
            # ---- send
            while wire:
                try:
                    k = sock.send(wire[0])
                except WANT_IO:
                    want_write = True
                    break
                progress = True
                wire_len -= k
                if k < len(wire[0]):
                    wire[0] = wire[0][k:]
                    want_write = True
                    break
                wire.popleft()
            # ---- receive
            if not stream.eof:
                for _ in range(max_reads):
                    try:
                        n = sock.recv_into(rmv)
                    except WANT_IO:
                        break
                    except ConnectionResetError:
                        n = 0
                    progress = True
                    stream.ingest(rmv[:n], plain)
                    extra = stream.pending_wire()
                    if extra and not stream.eof:
                        wire.append(memoryview(extra))
                        wire_len += len(extra)
                    if stream.eof:
                        break
            if out_done and not wire and done():
                return True
            if stream.eof:
                raise BenchError("connection closed early" if not done()
                                 else "connection closed while sending")
            if progress:
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("timed out")
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            if want != events:
                sel.modify(sock, want)
                events = want
            sel.select(min(left, 1.0))
    finally:
        sel.close()
        try:
            sock.setblocking(True)
        except OSError:
            pass


# ------------------------------------------------------- asyncio (many tunnels)

async def async_open_ws(port, path, tls_ctx, timeout):
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=tls_ctx, server_hostname="127.0.0.1"),
        timeout,
    )
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(_ws_request(port, path, key))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        _check_ws_response(head[:-4], key)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def async_read_frame(reader):
    b = await reader.readexactly(2)
    ln = b[1] & 0x7F
    if ln == 126:
        ln = struct.unpack("!H", await reader.readexactly(2))[0]
    elif ln == 127:
        ln = struct.unpack("!Q", await reader.readexactly(8))[0]
    if b[1] & 0x80:
        raise BenchError("server sent a masked frame")
    return b[0] & 0x0F, await reader.readexactly(ln)


async def async_echo(reader, writer, payload, timeout):
    writer.write(encode_frame(payload))
    got = b""

    async def collect():
        nonlocal got
        while len(got) < len(payload):
            op, data = await async_read_frame(reader)
            if op == OP_PING:
                writer.write(encode_frame(data, OP_PONG))
            elif op == OP_CLOSE:
                raise BenchError("tunnel closed by the relay")
            elif op in (OP_BINARY, OP_CONT, OP_TEXT):
                got += data

    await asyncio.wait_for(collect(), timeout)
    if got != payload:
        raise BenchError("echo mismatch")


async def async_close(writer):
    try:
        writer.write(encode_frame(struct.pack("!H", 1000), OP_CLOSE))
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 2.0)
    except (OSError, asyncio.TimeoutError, ssl.SSLError):
        pass
