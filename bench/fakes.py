"""Fake flexVDI manager and fake Spice backends for bench.py.

Run as ``python3 bench/fakes.py --cert PEM --key PEM``.  Everything listens
on 127.0.0.1 (ephemeral ports).  Once ready, one JSON line goes to stdout:

    {"manager": PORT, "plain": {"source": P, "sink": P, "duplex": P, "echo": P},
     "tls": {...same kinds, TLS...}}

Backends (plain TCP; the "tls" ones are the same behind TLS, used for the
direct-TLS baseline):

- source: reads the 16-byte header (magic, N, flags), sends N bytes of the
  pattern, then half-closes and waits for the peer to go away;
- sink: reads the header and N bytes (sha256 when flag 1), answers
  count + digest (40 bytes);
- duplex: reads the header, then sends N bytes of the pattern while reading
  and hashing N bytes, then sends the 32-byte digest of what it received;
- echo: sends back whatever arrives (asyncio, scales to thousands).

Manager: HTTPS, ``POST /vdi/desktop`` answers status OK with spice_port =
the plain backend named by the request's "desktop" field; ``/vdi/authmode``
answers OK.  The process exits when stdin closes or after --max-seconds.
"""

import argparse
import asyncio
import hashlib
import json
import os
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import benchlib as bl

IO_TIMEOUT = 600.0
KINDS = ("source", "sink", "duplex", "echo")


def server_context(cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def make_listener(backlog=4096):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(backlog)
    return s


def read_header(conn, deadline):
    buf = bytearray()
    conn.recv_until(buf.extend, lambda: len(buf) >= bl.HDR.size, deadline)
    magic, size, flags = bl.HDR.unpack(bytes(buf[:bl.HDR.size]))
    if magic != bl.MAGIC:
        raise bl.BenchError("bad magic")
    conn.initial = bytes(buf[bl.HDR.size:])
    return size, flags


def wait_eof(sock, seconds=30.0):
    """Wait (bounded) for the peer to close; what arrives is discarded."""
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            sock.settimeout(max(0.1, end - time.monotonic()))
            if not sock.recv(65536):
                return
    except OSError:
        return


def handle_stream(kind, sock, tls_ctx):
    try:
        conn = bl.Conn(bl.accept_stream(sock, tls_ctx))
        deadline = time.monotonic() + IO_TIMEOUT
        size, flags = read_header(conn, deadline)
        if kind == "source":
            bl.pump(conn, bl.pattern_chunks(size, 262144), lambda mv: None, lambda: True,
                    deadline)
            conn.shutdown_write()
            wait_eof(sock)
            return
        h = hashlib.sha256()
        got = [0]
        hashing = kind == "duplex" or flags & bl.FLAG_HASH

        def on_data(mv):
            got[0] += len(mv)
            if hashing:
                h.update(mv)

        out = bl.pattern_chunks(size, 262144) if kind == "duplex" else ()
        bl.pump(conn, out, on_data, lambda: got[0] >= size, deadline)
        if kind == "sink":
            conn.sendall(bl.SINK_REPLY.pack(got[0], h.digest()))
        else:
            conn.sendall(h.digest())
        wait_eof(sock)
    except (OSError, bl.BenchError) as e:
        print(f"fakes: {kind}: {e}", file=sys.stderr)
    finally:
        try:
            sock.close()
        except OSError:
            pass


def accept_loop(kind, lsock, tls_ctx, end):
    lsock.settimeout(1.0)
    while time.monotonic() < end:
        try:
            sock, _ = lsock.accept()
        except socket.timeout:
            continue
        except OSError as e:
            print(f"fakes: accept {kind}: {e}", file=sys.stderr)
            time.sleep(0.1)
            continue
        sock.settimeout(None)
        threading.Thread(target=handle_stream, args=(kind, sock, tls_ctx), daemon=True).start()


async def echo_handler(reader, writer):
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def run_echo(socks, tls_ctx, ready, end):
    async def main():
        servers = []
        for s, use_tls in socks:
            servers.append(await asyncio.start_server(
                echo_handler, sock=s, ssl=tls_ctx if use_tls else None, backlog=4096))
        ready.set()
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        for srv in servers:
            srv.close()

    asyncio.run(main())


def make_manager(tls_ctx, ports):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30

        def _answer(self, obj, code=200):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            try:
                req = json.loads(body or b"{}")
            except ValueError:
                req = {}
            if self.path == "/vdi/authmode":
                self._answer({"status": "OK", "auth_mode": "active_directory"})
            elif self.path == "/vdi/desktop":
                port = ports.get(req.get("desktop") if isinstance(req, dict) else None)
                if port is None:
                    self._answer({"status": "Error", "message": "no such desktop"})
                else:
                    self._answer({"status": "OK", "spice_address": "127.0.0.1",
                                  "spice_port": str(port), "spice_password": "x",
                                  "use_ws": False})
            else:
                self._answer({"status": "Error", "message": "not found"}, 404)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def get_request(self):
            sock, addr = self.socket.accept()
            sock.settimeout(30)
            return tls_ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    return Server(("127.0.0.1", 0), Handler)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--max-seconds", type=float, default=3600.0)
    args = ap.parse_args()
    end = time.monotonic() + args.max_seconds
    tls_ctx = server_context(args.cert, args.key)

    ports = {"plain": {}, "tls": {}}
    echo_socks = []
    for variant, ctx in (("plain", None), ("tls", tls_ctx)):
        for kind in KINDS:
            s = make_listener()
            ports[variant][kind] = s.getsockname()[1]
            if kind == "echo":
                echo_socks.append((s, ctx is not None))
            else:
                threading.Thread(target=accept_loop, args=(kind, s, ctx, end), daemon=True).start()
    ready = threading.Event()
    threading.Thread(target=run_echo, args=(echo_socks, tls_ctx, ready, end), daemon=True).start()
    manager = make_manager(tls_ctx, ports["plain"])
    ports["manager"] = manager.server_address[1]
    threading.Thread(target=manager.serve_forever, kwargs={"poll_interval": 0.5},
                     daemon=True).start()
    if not ready.wait(10):
        sys.exit("fakes: echo server did not start")
    print(json.dumps(ports), flush=True)

    def watch_stdin():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            os._exit(0)

    threading.Thread(target=watch_stdin, daemon=True).start()
    while time.monotonic() < end:
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
    os._exit(0)


if __name__ == "__main__":
    main()
