"""Stand-ins for the parts of a flexVDI platform that are not public: a small fake
flexVDI Manager (HTTPS + JSON under /vdi/) and fake Spice servers (plain TCP).

Everything listens on 127.0.0.1 only, on a port the kernel picks, and records what
it saw so that tests can assert on it.
"""

import hashlib
import http.server
import json
import socket
import ssl
import threading
import time


def accept_loop(listener, stop, serve):
    """Accepts until `stop` is set or the listener closes; `serve(sock)` in a thread each."""
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            sock, _ = listener.accept()
        except socket.timeout:
            continue
        except OSError:
            return
        threading.Thread(target=serve, args=(sock,), daemon=True).start()


class FakeManager:
    """HTTPS JSON server imitating the flexVDI Manager's /vdi/ API.

    `desktop` is the (address, port) it hands out; `mode` switches it to the faults
    tests need: "ok", "hang" (never answers), "garbage" (not HTTP), "text" (plain
    text answer), "error500", "truncated", "close" (closes without answering).
    """

    def __init__(self, cert_file, name="manager"):
        self.name = name
        self.desktop = ("127.0.0.1", 5900)
        self.mode = "ok"
        self.requests = []           # (method, path, headers dict, body bytes)
        self.answer_override = None  # callable(path, body) -> (status, headers, bytes) or None
        self.spice_password = "spice-secret-password"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert_file)
        self._thread = threading.Thread(target=self._accept, name=f"fake-{name}", daemon=True)
        self._thread.start()

    # -- what the tests look at ------------------------------------------------------

    def desktop_answer(self, body):
        return {"status": "OK", "spice_address": self.desktop[0],
                "spice_port": str(self.desktop[1]), "spice_password": self.spice_password,
                "use_ws": False, "title": "Desktop of " + str(body.get("username", "")),
                "layout": "es", "inactivity_timeout": 600}

    def paths(self):
        with self._lock:
            return [r[1] for r in self.requests]

    # -- the server ------------------------------------------------------------------

    def _accept(self):
        accept_loop(self._listener, self._stop, self._serve)

    def _serve(self, sock):
        sock.settimeout(30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = self._context.wrap_socket(sock, server_side=True)
        except (OSError, ssl.SSLError):
            sock.close()
            return
        try:
            mode = self.mode
            if mode == "hang":
                self._stop.wait(60)
                return
            if mode == "garbage":
                tls.recv(65536)
                tls.sendall(b"\x00\x01 this is not HTTP at all\r\n\r\n")
                return
            if mode == "close":
                tls.recv(65536)
                return
            handler = _Handler(tls, ("127.0.0.1", 0), self)
            del handler
        except (OSError, ssl.SSLError):
            pass
        finally:
            tls.close()

    def stop(self):
        self._stop.set()
        self._listener.close()
        self._thread.join(5)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def __init__(self, sock, address, manager):
        self.manager = manager
        super().__init__(sock, address, None)

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self._answer(body)

    do_GET = do_PUT = do_DELETE = do_POST

    def _answer(self, raw_body):
        manager = self.manager
        with manager._lock:
            manager.requests.append((self.command, self.path, dict(self.headers.items()), raw_body))
        try:
            body = json.loads(raw_body or b"{}")
        except ValueError:
            body = {}
        override = manager.answer_override and manager.answer_override(self.path, body)
        if override:
            status, headers, data = override
        elif manager.mode == "text":
            status, headers, data = 200, [("Content-Type", "text/html")], b"<html>oops</html>"
        elif manager.mode == "error500":
            status, headers, data = 500, [("Content-Type", "text/plain")], b"internal error"
        elif self.path.startswith("/vdi/authmode"):
            status, headers = 200, [("Content-Type", "application/json")]
            data = json.dumps({"status": "OK", "auth_mode": "active_directory"}).encode()
        elif self.path.startswith("/vdi/desktop"):
            status, headers = 200, [("Content-Type", "application/json")]
            data = json.dumps(manager.desktop_answer(body)).encode()
        else:
            status, headers = 200, [("Content-Type", "application/json")]
            data = json.dumps({"status": "OK", "echo_path": self.path,
                               "manager": manager.name}).encode()
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if manager.mode == "truncated":
            self.send_header("Content-Length", str(len(data) + 100))
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeSpice:
    """A TCP server on loopback; each accepted connection runs `behaviour(conn, record)`.

    `connections` counts accepts, `records` holds one dict per connection, filled by
    the behaviour (bytes received, sha256, closed flag).
    """

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.records = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.address = ("127.0.0.1", self.port)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="fake-spice", daemon=True)
        self._thread.start()

    @property
    def connections(self):
        with self._lock:
            return len(self.records)

    def _accept(self):
        accept_loop(self._listener, self._stop, self._run)

    def _run(self, sock):
        record = {"received": 0, "sha256": hashlib.sha256(), "closed": threading.Event(),
                  "data": bytearray(), "sock": sock}
        with self._lock:
            self.records.append(record)
        try:
            self.behaviour(sock, record)
        except OSError:
            pass
        finally:
            record["closed"].set()
            sock.close()

    def stop(self):
        self._stop.set()
        self._listener.close()
        self._thread.join(5)


# -- behaviours ------------------------------------------------------------------------

def echo(sock, record):
    while True:
        data = sock.recv(262144)
        if not data:
            return
        record["received"] += len(data)
        sock.sendall(data)


def greet_then_echo(sock, record):
    """Sends the port it is on, so each tunnel proves which desktop it reached."""
    sock.sendall(b"hello from %d\n" % sock.getsockname()[1])
    echo(sock, record)


def sink(sock, record):
    """Reads to EOF, hashing; keeps the first MiB for tests that look at the data."""
    while True:
        data = sock.recv(262144)
        if not data:
            return
        record["received"] += len(data)
        record["sha256"].update(data)
        if len(record["data"]) < 1 << 20:
            record["data"] += data[: (1 << 20) - len(record["data"])]


def source(payload):
    """Sends `payload` (bytes) and closes."""
    def behaviour(sock, record):
        sock.sendall(payload)
    return behaviour


def source_and_sink(size, seed=1):
    """Sends `size` pseudo-random bytes while hashing everything it receives."""
    def behaviour(sock, record):
        record["sent_sha256"] = hashlib.sha256()
        sender = threading.Thread(target=_send_pattern, args=(sock, size, seed, record),
                                  daemon=True)
        sender.start()
        sink(sock, record)
        sender.join(60)
    return behaviour


def pattern(size, seed):
    """Deterministic bytes that are cheap to make and never repeat within a message."""
    block = hashlib.sha256(b"%d" % seed).digest() * 2048   # 64 KiB
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += counter.to_bytes(8, "big") + block[8:]
        counter += 1
    return bytes(out[:size])


def _send_pattern(sock, size, seed, record):
    data = pattern(size, seed)
    record["sent_sha256"].update(data)
    view = memoryview(data)
    try:
        while view:
            sent = sock.send(view[:1 << 20])
            view = view[sent:]
    except OSError:
        return
    record["sent_done"] = time.monotonic()


def hold(sock, record):
    """Accepts and never reads or writes until the peer goes away."""
    sock.settimeout(None)
    while True:
        data = sock.recv(1)   # returns when the gateway closes; never sends
        if not data:
            return
        record["received"] += 1
