"""Hostile input at the public port (PROTOCOL.md, "Hostile input").

Every case runs against a fresh gateway while a well-behaved client does the whole
flow in a loop (hostile_support.NormalFlow: authmode, desktop, a fresh tunnel with a
verified echo, and one tunnel held open throughout). Each case asserts three things:
the offending connection gets its 4xx (or its WebSocket Close code), the log gets one
line about it and no traceback, and the normal client is not disturbed (no failure
while it ran, and a whole round right after the attack).

The test tests/test_tunnel.py and tests/test_flow.py already make (a few Close codes,
426/400, TLS 1.1, the paths table, 413, slow clients) are not repeated here.
"""

import base64
import json
import os
import random
import socket
import struct
import threading
import time

import fakes
import pytest
from conftest import wait_for
from hostile_support import (
    LOCAL,
    NormalFlow,
    WsClient,
    assert_clean_log,
    client_hello,
    close_code_of,
    converse,
    lines_about,
    masked_frame,
    one_line_about,
    open_socket,
    raw_upgrade,
    read_server_frames,
    real_client_hello,
    upgrade_head,
    wait_eof,
)
from wsclient import Rejected

# 10,000 attempts take about 20 s here (TLS handshakes on 2 cores); set
# FLEXVDI_TOKEN_FLOOD to change the count.
TOKEN_FLOOD = int(os.environ.get("FLEXVDI_TOKEN_FLOOD", "10000"))
MARK = "HOSTILE-MARK"   # in every hostile request: the manager must never see it


class Arena:
    """A fresh gateway, a victim desktop with a valid token, and the normal client."""

    def __init__(self, gateway, manager, victim, token, flow):
        self.gateway = gateway
        self.manager = manager
        self.victim = victim
        self.token = token
        self.flow = flow
        self.victim_connections = victim.connections

    def finish(self, victim_connected=False):
        """After the attack: a whole normal round, nothing forwarded, the victim
        desktop untouched (unless the case really opened a tunnel to it)."""
        took = self.flow.wait_round(timeout=15)
        assert took < 10, f"the normal client needed {took:.1f} s for a round after the attack"
        self.flow.stop()
        for method, path, headers, body in self.manager.requests:
            assert MARK not in path and MARK.encode() not in body, (method, path, body)
            assert path in ("/vdi/authmode", "/vdi/desktop"), (method, path)
        if not victim_connected:
            assert self.victim.connections == self.victim_connections
        assert_clean_log(self.gateway)


@pytest.fixture
def arena(gateway_factory, manager, spice_factory):
    gateway = gateway_factory()
    victim = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, victim)["spice_port"]
    flow = NormalFlow(gateway, manager, spice_factory(fakes.echo))
    flow.start()
    arena = Arena(gateway, manager, victim, token, flow)
    yield arena
    flow._stop.set()


# =====================================================================================
# HTTP
# =====================================================================================

H = b"Host: gw.test\r\n"
BODY = json.dumps({"hwaddress": MARK}).encode()


def post(target=b"/vdi/authmode", headers=b"", body=BODY, version=b"HTTP/1.1"):
    return b"POST " + target + b" " + version + b"\r\n" + headers + b"\r\n" + body


def chunked(chunks, extra=b""):
    return post(headers=H + extra + b"Transfer-Encoding: chunked\r\n", body=chunks)


BIG = 1 << 20

# (case, request bytes or f(arena) -> bytes, acceptable statuses, refusal reason in the log)
HTTP_CASES = [
    # garbage request lines
    ("binary garbage", b"\x16\x03\x01garbage\x00\xff\r\n\r\n", {400}, "malformed request"),
    ("words", b"HELLO WORLD\r\n\r\n", {400}, "malformed request"),
    ("HTTP/0.9 line", b"GET /vdi/authmode\r\n\r\n", {400}, "malformed request"),
    ("extra word", b"GET /vdi/authmode HTTP/1.1 x\r\n" + H + b"\r\n", {400},
     "malformed request"),
    ("double space", b"GET  /vdi/authmode HTTP/1.1\r\n" + H + b"\r\n", {400},
     "malformed request"),
    ("tabs", b"GET\t/vdi/authmode\tHTTP/1.1\r\n" + H + b"\r\n", {400}, "malformed request"),
    ("HTTP/2.0", b"GET /vdi/authmode HTTP/2.0\r\n" + H + b"\r\n", {400}, "malformed request"),
    ("lower-case version", b"GET /vdi/authmode http/1.1\r\n" + H + b"\r\n", {400},
     "malformed request"),
    ("empty request line", b"\r\n\r\n", {400}, "malformed request"),
    ("bare CR in line", b"GET /vdi/auth\rmode HTTP/1.1\r\n" + H + b"\r\n", {400},
     "malformed request"),
    ("bare LF line ends", b"GET /vdi/authmode HTTP/1.1\nHost: gw.test\n\n", {400},
     "malformed request"),
    ("NUL in a header", b"GET /vdi/authmode HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", {400},
     "malformed request"),
    # absolute-form and CONNECT
    ("absolute https URI", (b"GET https://manager.internal/vdi/authmode HTTP/1.1\r\n"
     b"Host: manager.internal\r\n\r\n"), {400, 404}, ""),
    ("absolute http URI to the manager", lambda a: post(
        f"http://{a.manager.address}/vdi/desktop".encode(),
        b"Host: " + a.manager.address.encode() + b"\r\nContent-Length: %d\r\n" % len(BODY)),
     {400, 404}, ""),
    ("absolute-form upgrade with a valid token", lambda a: upgrade_head(
        a.token, target=f"wss://gw.test/?ver=2&token={a.token}"), {400, 404}, ""),
    ("CONNECT to the desktop", lambda a: b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n"
     b"Host: 127.0.0.1:%d\r\n\r\n" % (a.victim.port, a.victim.port), {400, 404, 405}, ""),
    ("CONNECT origin-form", b"CONNECT /vdi/authmode HTTP/1.1\r\n" + H + b"\r\n",
     {400, 404, 405}, ""),
    ("OPTIONS *", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", {400, 404}, ""),
    # sizes of the head
    ("header line of 1 MiB", b"GET /vdi/authmode HTTP/1.1\r\n" + H + b"X-Big: "
     + b"a" * BIG + b"\r\n\r\n", {400, 431}, "request head too large"),
    ("1 MiB head that never ends", b"GET /vdi/authmode HTTP/1.1\r\nX-Big: " + b"a" * BIG,
     {400, 431}, "request head too large"),
    ("10,000 headers", b"GET /vdi/authmode HTTP/1.1\r\n" + H + b"X-H: v\r\n" * 10000
     + b"\r\n", {400, 431}, "request head too large"),
    ("101 header lines", b"GET /vdi/authmode HTTP/1.1\r\n" + H + b"X-H: v\r\n" * 100
     + b"\r\n", {400, 431}, "request head too large"),
    # Content-Length
    ("negative Content-Length", post(headers=H + b"Content-Length: -1\r\n"), {400},
     "malformed request"),
    ("non-numeric Content-Length", post(headers=H + b"Content-Length: abc\r\n"), {400},
     "malformed request"),
    ("Content-Length 1e3", post(headers=H + b"Content-Length: 1e3\r\n"), {400},
     "malformed request"),
    ("Content-Length +16", post(headers=H + b"Content-Length: +16\r\n"), {400},
     "malformed request"),
    ("Content-Length 0x10", post(headers=H + b"Content-Length: 0x10\r\n"), {400},
     "malformed request"),
    ("empty Content-Length", post(headers=H + b"Content-Length:\r\n"), {400},
     "malformed request"),
    ("Content-Length list", post(headers=H + b"Content-Length: %d, %d\r\n"
                                 % (len(BODY), len(BODY))), {400}, "malformed request"),
    ("Content-Length twice", post(headers=H + b"Content-Length: %d\r\nContent-Length: %d\r\n"
                                  % (len(BODY), len(BODY))), {400}, "malformed request"),
    ("Content-Length of 30 digits", post(headers=H + b"Content-Length: " + b"9" * 30
                                         + b"\r\n"), {400, 413}, ""),
    # request smuggling
    ("CL then TE", post(headers=H + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                        body=b"0\r\n\r\nPOST /vdi/x HTTP/1.1\r\n\r\n"), {400},
     "malformed request"),
    ("TE then CL", post(headers=H + b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n",
                        body=b"0\r\n\r\n"), {400}, "malformed request"),
    ("TE chunked, identity", post(headers=H + b"Transfer-Encoding: chunked, identity\r\n",
                                  body=b"0\r\n\r\n"), {400}, "malformed request"),
    ("TE gzip, chunked", post(headers=H + b"Transfer-Encoding: gzip, chunked\r\n",
                              body=b"0\r\n\r\n"), {400}, "malformed request"),
    ("TE xchunked", post(headers=H + b"Transfer-Encoding: xchunked\r\n", body=b"0\r\n\r\n"),
     {400}, "malformed request"),
    ("TE in HTTP/1.0", post(headers=H + b"Transfer-Encoding: chunked\r\n", body=b"0\r\n\r\n",
                            version=b"HTTP/1.0"), {400}, "malformed request"),
    ("TE with space before colon", post(headers=H + b"Transfer-Encoding : chunked\r\n",
                                        body=b"0\r\n\r\n"), {400}, "malformed request"),
    ("TE folded", post(headers=H + b"Transfer-Encoding:\r\n chunked\r\n", body=b"0\r\n\r\n"),
     {400}, "malformed request"),
    # chunked bodies with bad sizes
    ("chunk size zz", chunked(b"zz\r\n" + BODY + b"\r\n0\r\n\r\n"), {400},
     "malformed request"),
    ("chunk size -1", chunked(b"-1\r\n" + BODY + b"\r\n0\r\n\r\n"), {400},
     "malformed request"),
    ("chunk size of 9 hex digits", chunked(b"fffffffff\r\n" + BODY), {400, 413}, ""),
    ("chunk size 0x10", chunked(b"0x10\r\n" + BODY + b"\r\n0\r\n\r\n"), {400},
     "malformed request"),
    ("empty chunk size", chunked(b"\r\n" + BODY + b"\r\n0\r\n\r\n"), {400},
     "malformed request"),
    ("chunk longer than its size", chunked(b"4\r\n" + BODY + b"\r\n0\r\n\r\n"), {400},
     "malformed request"),
    # cf. CVE-2024-22019 (Node.js): chunk lines of 12 KB, each in its own TLS record,
    # so that each arrives whole in one read; the gateway's limit is 4 KiB a line.
    ("chunk extensions without bound", [chunked(b"")] + [
        b"1;e=" + b"e" * 12000 + b"\r\nx\r\n" for _ in range(64)] + [b"0\r\n\r\n"],
     {400, 413}, ""),
    ("bare LF chunk lines", chunked(b"%x\n" % len(BODY) + BODY + b"\n0\n\n"), {400},
     "malformed request"),
    ("101 trailer lines", chunked(b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n"
                                  + b"X-T: t\r\n" * 101 + b"\r\n"), {400, 431}, ""),
    # bodies over the limit
    ("Content-Length 1 MiB + 1", post(headers=H + b"Content-Length: %d\r\n" % (BIG + 1),
                                      body=b"{" + b" " * BIG), {413},
     "request body too large"),
    ("1 MiB + 1 with Expect: 100-continue", post(
        headers=H + b"Expect: 100-continue\r\nContent-Length: %d\r\n" % (BIG + 1), body=b""),
     {413}, "request body too large"),
    ("chunk size over the limit", chunked(b"%x\r\n" % (BIG + 1)), {413},
     "request body too large"),
    ("chunks adding up over the limit", chunked(
        b"".join(b"10000\r\n" + b" " * 0x10000 + b"\r\n" for _ in range(17)) + b"0\r\n\r\n"),
     {413}, "request body too large"),
    # Host
    ("Host with CR", b"GET /vdi/authmode HTTP/1.1\r\nHost: gw\r.test\r\n\r\n", {400},
     "malformed request"),
    ("Host with LF", b"GET /vdi/authmode HTTP/1.1\r\nHost: gw\n.test\r\n\r\n", {400},
     "malformed request"),
    ("Host with a space", b"GET /vdi/authmode HTTP/1.1\r\nHost: gw .test\r\n\r\n", {400},
     "malformed request"),
    ("Host with a path", b"GET /vdi/authmode HTTP/1.1\r\nHost: gw.test/x\r\n\r\n", {400},
     "malformed request"),
    ("Host with userinfo", b"GET /vdi/authmode HTTP/1.1\r\nHost: u@gw.test\r\n\r\n", {400},
     "malformed request"),
    ("Host with a quote", b"GET /vdi/authmode HTTP/1.1\r\nHost: gw\".test\r\n\r\n", {400},
     "malformed request"),
    ("unclosed IPv6 Host", b"GET /vdi/authmode HTTP/1.1\r\nHost: [::1\r\n\r\n", {400},
     "malformed request"),
    ("no Host", b"GET /vdi/authmode HTTP/1.1\r\n\r\n", {400}, "malformed request"),
    ("two Hosts", b"GET /vdi/authmode HTTP/1.1\r\n" + H + H + b"\r\n", {400},
     "malformed request"),
    ("space before colon", b"GET /vdi/authmode HTTP/1.1\r\nHost : gw.test\r\n\r\n", {400},
     "malformed request"),
    ("folded first header", b"GET /vdi/authmode HTTP/1.1\r\n Host: gw.test\r\n\r\n", {400},
     "malformed request"),
    # bytes that are not UTF-8
    ("non-UTF-8 path", b"GET /vdi/\xff\xfe HTTP/1.1\r\n" + H + b"\r\n", {400},
     "malformed request"),
    ("non-UTF-8 header name", b"GET /vdi/authmode HTTP/1.1\r\n" + H + b"X-\xff: v\r\n\r\n",
     {400}, "malformed request"),
    ("non-UTF-8 Host", b"GET /vdi/authmode HTTP/1.1\r\nHost: \xc3\xa9\xff.test\r\n\r\n",
     {400}, "malformed request"),
    ("malformed percent-encoding", b"GET /vdi/%zz HTTP/1.1\r\n" + H + b"\r\n", {400},
     "malformed request"),
    ("cut percent-encoding", b"GET /vdi/%2 HTTP/1.1\r\n" + H + b"\r\n", {400},
     "malformed request"),
]

# Paths that normalize outside /vdi/ (beyond the table in test_flow.py).
OUTSIDE_PATHS = ["/vdi/./../admin", "/vdi/%2e./admin", "/vdi/.%2E/admin",
                 "/vdi/desktop/../../admin", "/vdi/..", "/vdi/%2e%2e", "/vdi/..%5cadmin",
                 "/vdi/%5c..%5cadmin", "/vdi/%2F../admin", "/vdi/%2f%2e%2e/admin",
                 "/%2e%2e/%2e%2e/etc/passwd", "/vdi/desktop/%2e%2e/%2E%2E/%2e%2e/admin",
                 "/vdi/./././../admin", "/vdi?/../vdi/authmode", "/vdi/%2e%2e%2fadmin",
                 "/%76di", "*"]
for _path in OUTSIDE_PATHS:
    HTTP_CASES.append((f"path {_path}", post(_path.encode(), H + b"Content-Length: %d\r\n"
                                              % len(BODY)), {400, 404}, ""))


@pytest.mark.parametrize("case, request_bytes, statuses, reason", HTTP_CASES,
                         ids=[c[0] for c in HTTP_CASES])
def test_bad_http_gets_4xx_one_log_line_and_disturbs_nobody(arena, case, request_bytes,
                                                            statuses, reason):
    data = request_bytes(arena) if callable(request_bytes) else request_bytes
    conversation = converse(arena.gateway.port, data, timeout=8)
    answers = conversation.answers
    assert answers, conversation
    status, headers, body = answers[0]
    assert status in statuses, conversation
    assert json.loads(body)["status"] == "Error"
    assert headers.get("connection") == "close", headers
    assert conversation.closed, f"the connection was not closed after {status}"
    assert b"100 Continue" not in conversation.data
    line = one_line_about(arena.gateway, conversation.client_port)
    assert line.split(" ", 4)[3] == "WARNING", line
    assert "refused" in line and reason in line, line
    arena.finish()


def test_post_without_content_length_sends_no_body_and_smuggles_nothing(arena):
    """RFC 9112 6.3: no Content-Length and no Transfer-Encoding means an empty body.
    What follows is a new request (here garbage, so 400); either way the manager
    never gets those bytes, neither as this request's body nor as a request."""
    data = (b"POST /vdi/authmode HTTP/1.1\r\n" + H + b"\r\n"
            b'{"hwaddress": "' + MARK.encode() + b'"}\r\n\r\n')
    before = len(arena.manager.requests)
    conversation = converse(arena.gateway.port, data, timeout=8)
    statuses = conversation.statuses
    assert statuses in ([411], [400], [200, 400]), conversation
    assert conversation.closed
    forwarded = arena.manager.requests[before:]
    assert all(MARK.encode() not in body for _, _, _, body in forwarded)
    wait_for(lambda: lines_about(arena.gateway, conversation.client_port), 5,
             message="a log line")
    assert len(lines_about(arena.gateway, conversation.client_port)) == 1
    arena.finish()


def test_pipelined_smuggling_attempt_is_two_plain_requests(arena):
    """A body that is itself a request is just a body: the manager sees it as the
    body of the first request, and the gateway answers the second one itself."""
    inner = b"POST /admin HTTP/1.1\r\nHost: manager\r\nContent-Length: 2\r\n\r\n{}"
    data = (post(headers=H + b"Content-Length: %d\r\n" % len(inner), body=inner)
            + b"GET /admin HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    before = len(arena.manager.requests)
    conversation = converse(arena.gateway.port, data, timeout=8)
    assert conversation.statuses == [200, 404], conversation
    forwarded = [r for r in arena.manager.requests[before:] if r[3] == inner]
    assert len(forwarded) == 1 and forwarded[0][1] == "/vdi/authmode"
    assert "/admin" not in arena.manager.paths()
    one_line_about(arena.gateway, conversation.client_port)
    arena.finish()


def test_pipelined_head_gets_its_own_deadline(arena):
    """The 10 s for a head count from the connection's start for the first request;
    a keep-alive request that starts later gets its own 10 s, pipelined or not."""
    sock, client_port = open_socket(arena.gateway.port)
    try:
        started = time.monotonic()
        body = b'{"hwaddress": "pipelined"}'
        first = post(headers=H + b"Content-Length: %d\r\n" % len(body), body=body)
        second = post(headers=H + b"Connection: close\r\nContent-Length: %d\r\n" % len(body),
                      body=body)
        wait_for(lambda: time.monotonic() - started > 8, 10, message="8 s to pass")
        sock.sendall(first + second[:20])          # the second head starts at 8 s
        wait_for(lambda: time.monotonic() - started > 11, 10, message="11 s to pass")
        try:
            sock.sendall(second[20:])             # ... and is complete at 11 s
        except OSError:
            pass
        conversation = converse(arena.gateway.port, b"", timeout=5, sock=sock)
    finally:
        sock.close()
    assert conversation.statuses == [200, 200], conversation
    assert not lines_about(arena.gateway, client_port, levels=("WARNING", "ERROR"))
    arena.finish()


def test_limits_are_not_over_eager(arena):
    """The boundaries themselves pass: 100 header lines, a 1 MiB body (plain and
    chunked), obs-text in a header value, a body that is not UTF-8."""
    cases = [
        # (hop-by-hop lines, so that the fake manager's own limit of 100 is not hit)
        post(headers=H + b"Keep-Alive: 5\r\n" * 98 + b"Content-Length: 2\r\n", body=b"{}"),
        post(headers=H + b"Content-Length: %d\r\n" % BIG, body=b"{" + b" " * (BIG - 2) + b"}"),
        chunked(b"".join(b"10000\r\n" + b" " * 0x10000 + b"\r\n" for _ in range(16))
                + b"0\r\n\r\n"),
        post(headers=H + b"X-Name: caf\xe9 \xff\r\nContent-Length: 2\r\n", body=b"{}"),
        post(headers=H + b"Content-Length: 4\r\n", body=b"\xff\xfe\x00\x01"),
    ]
    before = len(arena.manager.requests)
    for data in cases:
        conversation = converse(arena.gateway.port, data, timeout=8, until_closed=False)
        assert conversation.statuses == [200], conversation
    forwarded = arena.manager.requests[before:]
    bodies = [body for _, path, _, body in forwarded if path == "/vdi/authmode"
              and body != b'{"hwaddress": "normal-client"}']
    assert len(bodies) == len(cases)
    assert sorted(map(len, bodies)) == sorted([2, BIG, BIG, 2, 4])
    arena.finish()


# =====================================================================================
# TLS
# =====================================================================================

def _cut_hello():
    hello = real_client_hello()
    return hello[:len(hello) // 2]


TLS_CASES = [
    ("plain HTTP on the TLS port", lambda: b"GET /vdi/authmode HTTP/1.1\r\nHost: gw.test\r\n"
     b"\r\n", "TLS handshake failed"),
    ("random bytes", lambda: random.Random(5).randbytes(4096), "TLS handshake failed"),
    ("random bytes in a handshake record",
     lambda: b"\x16\x03\x01\x02\x00" + random.Random(6).randbytes(512), "TLS handshake failed"),
    ("record of 64 KiB announced", lambda: b"\x16\x03\x01\xff\xff" + b"\x00" * 1000,
     "TLS handshake failed"),
    ("SSLv3 hello", lambda: client_hello(0x0300, 0x0300), "TLS handshake failed"),
    ("TLS 1.0 hello", lambda: client_hello(0x0301), "TLS handshake failed"),
    ("TLS 1.1 hello", lambda: client_hello(0x0302), "TLS handshake failed"),
    ("SSLv2 hello", lambda: bytes.fromhex("801f010002000600000010") + b"\x00\x00\x04\x01\x00\x80"
     + os.urandom(16), "TLS handshake failed"),
    ("hello then garbage", lambda: real_client_hello() + b"\x17\x03\x03\x00\x10"
     + os.urandom(16), "TLS handshake failed"),
]


@pytest.mark.parametrize("case, make, reason", TLS_CASES, ids=[c[0] for c in TLS_CASES])
def test_bad_tls_is_refused_promptly_with_one_log_line(arena, case, make, reason):
    conversation = converse(arena.gateway.port, make(), tls=False, timeout=8)
    assert conversation.closed and conversation.seconds < 5, conversation
    data = conversation.data
    # Nothing, TLS records ending in a fatal alert, or (for plain HTTP) an HTTP 400.
    assert conversation.statuses in ([], [400]), conversation
    assert not data or data.startswith(b"HTTP/1.1 400") or data[:1] in (b"\x15", b"\x16"), data
    if case.startswith(("SSLv3", "TLS 1.")):
        assert data[:1] == b"\x15" and data[6] in (40, 70), data   # protocol_version
    line = one_line_about(arena.gateway, conversation.client_port)
    assert reason in line, line
    arena.finish()


@pytest.mark.parametrize("how", ["FIN", "RST"])
def test_handshake_cut_in_the_middle(arena, how):
    sock = socket.create_connection((LOCAL, arena.gateway.port), timeout=10)
    client_port = sock.getsockname()[1]
    sock.sendall(_cut_hello())
    if how == "RST":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    else:
        sock.shutdown(socket.SHUT_WR)
        assert wait_eof(sock, 5)
        sock.close()
    wait_for(lambda: lines_about(arena.gateway, client_port, levels=("DEBUG",)), 5,
             message="the debug line about the cut handshake")
    debug = " ".join(lines_about(arena.gateway, client_port, levels=("DEBUG",)))
    assert "during the TLS handshake" in debug or "connection ended" in debug, debug
    # A load balancer's health check looks the same: not worth a warning.
    assert lines_about(arena.gateway, client_port) == []
    arena.finish()


def test_slow_attackers_are_cut_at_ten_seconds_from_the_connection_start(arena):
    """Slowloris in every phase, all at once: silent, a trickled ClientHello, a cut
    and held handshake, a head trickled byte by byte, a cut head, TLS then nothing.
    Each is closed 10 s after it connected (a deadline for the whole, not per read)."""
    hello = real_client_hello()
    head = b"GET /vdi/authmode HTTP/1.1\r\nHost: gw.test\r\n" + b"X-Slow: a\r\n" * 500

    def silent():
        return socket.create_connection((LOCAL, arena.gateway.port)), None

    def trickled_hello():
        return socket.create_connection((LOCAL, arena.gateway.port)), iter(hello)

    def held_hello():
        sock = socket.create_connection((LOCAL, arena.gateway.port))
        sock.sendall(hello[:len(hello) // 2])
        return sock, None

    def trickled_head():
        return open_socket(arena.gateway.port)[0], iter(head)

    def cut_head():
        sock = open_socket(arena.gateway.port)[0]
        sock.sendall(head[:100])
        return sock, None

    def tls_only():
        return open_socket(arena.gateway.port)[0], None

    attackers = {}
    lock = threading.Lock()

    def attack(name, make):
        started = time.monotonic()
        sock, trickle = make()
        sock.settimeout(0.3)
        while time.monotonic() - started < 20:
            if trickle is not None:
                try:
                    sock.sendall(bytes([next(trickle)]))
                except StopIteration:
                    trickle = None
                except OSError:
                    break
            try:
                if not sock.recv(65536):
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        with lock:
            attackers[name] = time.monotonic() - started
        sock.close()

    kinds = [silent, trickled_hello, held_hello, trickled_head, cut_head, tls_only]
    threads = [threading.Thread(target=attack, args=(k.__name__, k)) for k in kinds]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    wait_for(lambda: time.monotonic() - started > 5, 6, message="5 s of attack")
    assert arena.flow.rounds_between(started, time.monotonic()) >= 1
    for thread in threads:
        thread.join(25)
    assert set(attackers) == {k.__name__ for k in kinds}
    for name, seconds in attackers.items():
        assert 9 < seconds < 14, f"{name} was closed after {seconds:.1f} s"
    refusals = [ln for ln in arena.gateway.log_text().splitlines()
                if "refused: client too slow" in ln]
    assert len(refusals) == 1, refusals   # the rest are counted, not listed
    arena.finish()


# =====================================================================================
# WebSocket
# =====================================================================================

UPGRADE_CASES = [
    ("no Sec-WebSocket-Version", {"version": None}, 426),
    ("Sec-WebSocket-Version 12", {"version": "12"}, 426),
    ("Sec-WebSocket-Version 13, 8", {"version": "13, 8"}, 426),
    ("Sec-WebSocket-Version 13.0", {"version": "13.0"}, 426),
    ("empty Sec-WebSocket-Key", {"key": ""}, 400),
    ("Sec-WebSocket-Key not base64", {"key": "!!!!not-base64!!!!!!!!=="}, 400),
    ("Sec-WebSocket-Key of 15 bytes", {"key": base64.b64encode(b"x" * 15).decode()}, 400),
    ("Sec-WebSocket-Key of 17 bytes", {"key": base64.b64encode(b"x" * 17).decode()}, 400),
]


@pytest.mark.parametrize("case, kwargs, status", UPGRADE_CASES,
                         ids=[c[0] for c in UPGRADE_CASES])
def test_bad_upgrade_is_refused_before_anything_is_connected(arena, case, kwargs, status):
    conversation = converse(arena.gateway.port, upgrade_head(arena.token, **kwargs), timeout=8)
    assert conversation.statuses == [status], conversation
    if status == 426:
        assert conversation.answers[0][1].get("sec-websocket-version") == "13"
    assert conversation.closed
    one_line_about(arena.gateway, conversation.client_port)
    arena.finish()


def _close(payload):
    return masked_frame(8, payload)


WS_CASES = [
    ("RSV2 set", "binary", masked_frame(2, b"x", rsv=2), 1002),
    ("RSV3 set", "binary", masked_frame(2, b"x", rsv=1), 1002),
    ("RSV1 on a ping", "binary", masked_frame(9, b"p", rsv=4), 1002),
    ("unmasked after a good frame", "binary", masked_frame(2, b"ok")
     + masked_frame(2, b"x", masked=False), 1002),
    *[(f"opcode {op}", "binary", masked_frame(op, b"x"), 1002) for op in (4, 5, 6, 7)],
    *[(f"control opcode {op}", "binary", masked_frame(op, b"x"), 1002)
      for op in (0xB, 0xC, 0xD, 0xE, 0xF)],
    ("close of 126 bytes", "binary", _close(struct.pack("!H", 1000) + b"r" * 124), 1002),
    ("pong of 126 bytes", "binary", masked_frame(10, b"p" * 126), 1002),
    ("ping with a 16-bit length of 5", "binary", masked_frame(9, b"hello",
                                                              length_field=(126, 5)), 1002),
    ("fragmented close", "binary", masked_frame(8, struct.pack("!H", 1000), fin=False), 1002),
    ("fragmented pong", "binary", masked_frame(10, b"p", fin=False), 1002),
    ("continuation after a whole message", "binary",
     masked_frame(2, b"a") + masked_frame(0, b"b"), 1002),
    ("new message inside a fragmented one", "binary",
     masked_frame(2, b"a", fin=False) + masked_frame(2, b"b"), 1002),
    *[(f"close code {code}", "binary", _close(struct.pack("!H", code)), 1002)
      for code in (0, 1004, 1006, 1015, 1016, 2999, 5000, 65535)],
    ("close with 1 byte", "binary", _close(b"\x03"), 1002),
    ("close reason not UTF-8", "binary", _close(struct.pack("!H", 1000) + b"\xff\xfe"), 1007),
    ("text not UTF-8 (base64 tunnel)", "base64", masked_frame(1, b"QUJD\xc3\x28"), 1007),
    ("UTF-8 broken across fragments", "base64",
     masked_frame(1, b"QU\xe2", fin=False) + masked_frame(0, b"\x28\xa1"), 1007),
    ("base64 with bad padding", "base64", masked_frame(1, b"QQ="), 1007),
    ("base64 with a newline", "base64", masked_frame(1, b"QUJD\nQUJD"), 1007),
    ("base64 url-safe alphabet", "base64", masked_frame(1, b"-_-_"), 1007),
    ("base64 with extra padding", "base64", masked_frame(1, b"QUJD===="), 1007),
    ("base64 with a space", "base64", masked_frame(1, b"QU JD"), 1007),
    ("length 2^64 - 1", "binary", b"\x82\xff" + b"\xff" * 8 + b"mask", 1002),
    ("length 1 MiB + 1", "binary", masked_frame(2, b"", length_field=(127, (1 << 20) + 1)),
     1009),
    ("base64 message over 1 MiB", "base64",
     masked_frame(1, b"QUJD" * 150000, fin=False) + masked_frame(0, b"QUJD" * 150000), 1009),
]


@pytest.mark.parametrize("case, subprotocol, frames, code", WS_CASES,
                         ids=[c[0] for c in WS_CASES])
def test_websocket_violation_closes_that_tunnel_only(arena, case, subprotocol, frames, code):
    connections = arena.victim.connections
    sock, client_port, rest = raw_upgrade(arena.gateway.port, arena.token, subprotocol)
    try:
        try:
            sock.sendall(frames)
        except OSError:
            pass   # the gateway may close before it has read everything
        got, eof = read_server_frames(sock, rest, timeout=8)
        assert close_code_of(got) == code, (got[-3:], eof)
        assert wait_eof(sock, 8), "the gateway kept the connection after its Close"
    finally:
        sock.close()
    record = wait_for(lambda: arena.victim.connections > connections
                      and arena.victim.records[connections], 5, message="desktop connection")
    assert record["closed"].wait(5), "the desktop connection was not closed"
    line = one_line_about(arena.gateway, client_port)
    assert "tunnel ended" in line and "client broke the protocol" in line, line
    arena.finish(victim_connected=True)


# =====================================================================================
# Tokens
# =====================================================================================

def _random_tokens(count, real):
    rng = random.Random(42)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i in range(count):
        kind = i % 8
        if kind == 0:     # one character off the real token
            j = rng.randrange(len(real))
            yield real[:j] + ("A" if real[j] != "A" else "B") + real[j + 1:]
        elif kind == 1:   # the real token cut or extended
            yield real[:rng.randrange(len(real))] if i % 16 == 1 else real + "x"
        elif kind == 2:   # percent-encoded junk, NUL, non-UTF-8
            yield "".join(f"%{rng.randrange(256):02x}" for _ in range(rng.randint(1, 17)))
        elif kind == 3:   # long
            yield "".join(rng.choice(alphabet) for _ in range(rng.randint(18, 2000)))
        elif kind == 4:   # empty
            yield ""
        else:
            yield "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 17)))


def test_token_flood_is_refused_connects_nothing_and_logs_a_few_lines(
        gateway_factory, manager, spice_factory):
    gateway = gateway_factory(Debug=False)   # production logging: no per-request detail
    victim = spice_factory(fakes.echo)
    real = gateway.desktop_token(manager, victim)["spice_port"]
    tokens = list(_random_tokens(TOKEN_FLOOD, real))
    assert real not in tokens
    results = {}
    lock = threading.Lock()

    def flood(part):
        counts = {}
        for token in part:
            try:
                WsClient(LOCAL, gateway.port, f"/?ver=2&token={token}",
                         subprotocols=["binary"]).abort()
                status = 101
            except Rejected as exc:
                status = exc.status
            counts[status] = counts.get(status, 0) + 1
        with lock:
            for status, count in counts.items():
                results[status] = results.get(status, 0) + count

    with NormalFlow(gateway, manager, spice_factory(fakes.echo)) as flow:
        started = time.monotonic()
        threads = [threading.Thread(target=flood, args=(tokens[i::4],)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        elapsed = time.monotonic() - started
        assert flow.rounds_between(started, started + elapsed) >= 1
        flow.wait_round(15)
    assert results == {403: TOKEN_FLOOD}, results
    assert victim.connections == 0
    assert flow.tunnels_opened == flow.spice.connections
    # One line per reason per 10 s, with the count of the others: the counts add up.
    pattern = "unknown or expired token"

    def summarised():
        lines = [ln for ln in gateway.log_text().splitlines() if pattern in ln]
        first = [ln for ln in lines if "refused: " in ln]
        more = [int(ln.split("refused ", 1)[1].split()[0]) for ln in lines
                if "more: " in ln]
        return lines, len(first) + sum(more)
    wait_for(lambda: summarised()[1] == TOKEN_FLOOD, 20,
             message=f"the refusal counts to add up to {TOKEN_FLOOD} "
                     f"(now {summarised()[1]})")
    lines, _ = summarised()
    assert len(lines) <= 2 * (elapsed / 10 + 2), lines
    text = gateway.log_text()
    assert real not in text and "Traceback" not in text
    print(f"\n{TOKEN_FLOOD} bad tokens refused in {elapsed:.1f} s "
          f"({TOKEN_FLOOD / elapsed:.0f}/s), {len(lines)} log lines about them, "
          f"{len(text.splitlines())} log lines in all")
