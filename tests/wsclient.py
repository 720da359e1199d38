"""Test clients: HTTPS JSON posts and a WebSocket client built on wsproto.

wsproto is an implementation independent of the gateway's own framing, so the tests
check the gateway against somebody else's reading of RFC 6455.
"""

import http.client
import json
import socket
import ssl
import time
from collections import deque

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)


def client_context():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def connect(host, port, tls=True, timeout=10):
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        sock = client_context().wrap_socket(sock)
    return sock


def post(host, port, path, body, tls=True, headers=None, timeout=40, raw_body=None):
    """POST JSON; returns (status, headers dict lower-cased, body bytes)."""
    cls = http.client.HTTPSConnection if tls else http.client.HTTPConnection
    kwargs = {"context": client_context()} if tls else {}
    connection = cls(host, port, timeout=timeout, **kwargs)
    try:
        data = raw_body if raw_body is not None else json.dumps(body).encode()
        all_headers = {"Content-Type": "text/json"}
        all_headers.update(headers or {})
        connection.request("POST", path, data, all_headers)
        response = connection.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        connection.close()


def post_json(host, port, path, body, **kwargs):
    status, _headers, data = post(host, port, path, body, **kwargs)
    return status, json.loads(data)


def raw_request(host, port, data, tls=True, timeout=15):
    """Sends raw bytes, returns everything the gateway answered until it closed or paused."""
    sock = connect(host, port, tls=tls, timeout=timeout)
    try:
        sock.sendall(data)
        return read_answer(sock, timeout)
    finally:
        sock.close()


def read_answer(sock, timeout=15):
    """Reads one HTTP answer (head plus Content-Length body)."""
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\r\n\r\n" not in buf:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, ssl.SSLError, ConnectionError):
            return buf
        if not chunk:
            return buf
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def status_of(answer):
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else None


class Rejected(Exception):
    def __init__(self, status, body):
        super().__init__(f"upgrade rejected with {status}")
        self.status = status
        self.body = body


class WsClient:
    """A blocking WebSocket client over a real (TLS) socket, driven by wsproto."""

    def __init__(self, host, port, target, subprotocols=(), tls=True, timeout=10,
                 auto_pong=True, host_header=None, extra_headers=(), sock=None):
        """`sock`: an already connected (TLS) socket to use instead of a new one."""
        self.sock = sock or connect(host, port, tls=tls, timeout=timeout)
        self.timeout = timeout
        self.auto_pong = auto_pong
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events = deque()
        self.pings = []
        self.message_sizes = []
        self.closed = None
        self._partial = bytearray()
        self.sock.sendall(self.ws.send(Request(
            host=host_header or (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"),
            target=target,
            subprotocols=list(subprotocols), extra_headers=list(extra_headers))))
        status, body = None, b""
        while True:
            event = self._next_event(timeout)
            if isinstance(event, AcceptConnection):
                self.subprotocol = event.subprotocol
                break
            if isinstance(event, RejectConnection):
                status = event.status_code
                if not event.has_body:
                    break
            elif isinstance(event, RejectData):
                body += event.data
                if event.body_finished:
                    break
            elif event is None:
                raise Rejected(None, b"")
        if status is not None:
            self.sock.close()
            raise Rejected(status, body)

    def _fill(self, timeout):
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(262144)
        except socket.timeout:
            return False
        except (ConnectionError, ssl.SSLError):
            data = b""
        self.ws.receive_data(data or None)
        for event in self.ws.events():
            self.events.append(event)
        return True

    def _next_event(self, timeout):
        deadline = time.monotonic() + timeout
        while not self.events:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._fill(remaining):
                return None
        return self.events.popleft()

    def send(self, data):
        self.sock.sendall(self.ws.send(BytesMessage(data=data)))

    def send_text(self, text):
        self.sock.sendall(self.ws.send(TextMessage(data=text)))

    def event(self, timeout=None):
        """The next non-data event handled like a client would (pong, close answer)."""
        event = self._next_event(self.timeout if timeout is None else timeout)
        if isinstance(event, Ping):
            self.pings.append(time.monotonic())
            if self.auto_pong:
                self.sock.sendall(self.ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            self.closed = event.code
            try:
                self.sock.sendall(self.ws.send(event.response()))
            except Exception:
                pass
        elif isinstance(event, (BytesMessage, TextMessage)):
            self._partial += event.data if isinstance(event.data, bytes) else event.data.encode()
            if event.message_finished:
                self.message_sizes.append(len(self._partial))
                self._partial = bytearray()
        return event

    def recv(self, size, timeout=None):
        """Exactly `size` bytes of data (across messages); fewer if the tunnel closed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        out = bytearray()
        while len(out) < size:
            event = self.event(max(0.0, deadline - time.monotonic()))
            if event is None or isinstance(event, CloseConnection):
                break
            if isinstance(event, BytesMessage):
                out += event.data
            elif isinstance(event, TextMessage):
                out += event.data.encode()
        return bytes(out)

    def wait_close(self, timeout=10):
        """The Close code the gateway sent, or None if it closed without one."""
        deadline = time.monotonic() + timeout
        while self.closed is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            event = self.event(remaining)
            if event is None and (time.monotonic() >= deadline or self._eof()):
                return self.closed
        return self.closed

    def _eof(self):
        from wsproto.connection import ConnectionState
        return self.ws.state in (ConnectionState.CLOSED, ConnectionState.REMOTE_CLOSING)

    def close(self, code=1000):
        try:
            self.sock.sendall(self.ws.send(CloseConnection(code=code)))
        except Exception:
            pass

    def abort(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()


__all__ = [
    "CloseConnection",
    "Ping",
    "Pong",
    "Rejected",
    "WsClient",
    "connect",
    "post",
    "post_json",
    "raw_request",
    "read_answer",
    "status_of",
]


def pump(host, port, target, send_data, expect_size, subprotocols=("binary",), timeout=120):
    """Sends `send_data` and receives `expect_size` bytes at the same time over one
    tunnel, single-threaded with non-blocking I/O (an SSL socket must not be used by
    two threads at once). Returns (sha256 of what arrived, seconds, message sizes)."""
    import hashlib
    import select
    sock = connect(host, port, timeout=10)
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host=f"{host}:{port}", target=target,
                                 subprotocols=list(subprotocols))))
    received = hashlib.sha256()
    got = 0
    sizes = []
    partial = 0
    out = bytearray()
    offset = 0
    accepted = False
    started = time.monotonic()
    deadline = started + timeout
    sock.setblocking(False)
    view = memoryview(send_data)
    try:
        while got < expect_size or offset < len(view) or out:
            if time.monotonic() > deadline:
                raise AssertionError(f"pump timed out: sent {offset}, received {got}")
            if accepted and not out and offset < len(view):
                out += ws.send(BytesMessage(data=bytes(view[offset:offset + 65536])))
                offset += min(65536, len(view) - offset)
            want_write = bool(out)
            readable, writable, _ = select.select([sock], [sock] if want_write else [], [], 1)
            if sock.pending() or readable:
                try:
                    data = sock.recv(262144)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    data = None
                if data == b"":
                    raise AssertionError(f"gateway closed early: received {got}")
                if data:
                    ws.receive_data(data)
                    for event in ws.events():
                        if isinstance(event, AcceptConnection):
                            accepted = True
                        elif isinstance(event, BytesMessage):
                            received.update(event.data)
                            got += len(event.data)
                            partial += len(event.data)
                            if event.message_finished:
                                sizes.append(partial)
                                partial = 0
                        elif isinstance(event, (CloseConnection, RejectConnection)):
                            raise AssertionError(f"unexpected {event!r}")
            if writable and out:
                try:
                    sent = sock.send(out[:262144])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    sent = 0
                del out[:sent]
        return received.hexdigest(), time.monotonic() - started, sizes
    finally:
        sock.close()
