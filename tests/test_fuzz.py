"""Property-based fuzzing (hypothesis) of the request parser, the path rules, the
WebSocket decoder, the manager-answer rewrite, and whole connections in-process.

Bounded for CI: FLEXVDI_FUZZ_EXAMPLES examples per test (default 200, about 15 s for
the file). For a longer run by hand, e.g.:

    FLEXVDI_FUZZ_EXAMPLES=20000 python3 -m pytest -q tests/test_fuzz.py

No example database is written (database=None): failures print the example to
reproduce them, and CI leaves no files behind.
"""

import base64
import binascii
import json
import logging
import os
import re
import socket
import struct
import threading
import time
from datetime import timedelta
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexvdi_gateway as gw

EXAMPLES = int(os.environ.get("FLEXVDI_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=10), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])
# The in-process connection tests cost a thread and sockets per example.
FUZZ_CONN = settings(FUZZ, max_examples=max(20, EXAMPLES // 3))


# =====================================================================================
# Strategies
# =====================================================================================

METHODS = ["GET", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "get", "PRI",
           "G\x00T", "GE T", ""]
TRICKY_TARGETS = ["/vdi/authmode", "/vdi/desktop", "/vdi", "/vdi/", "/", "*",
                  "/vdi/../admin", "/vdi/%2e%2e/admin", "/vdi/%2E%2e/x", "/vdi%2fx",
                  "/vdi/..%5cx", "/vdi\\x", "//vdi/x", "/vdi/./x", "/vdi/x/../../y",
                  "https://h/vdi/x", "h:443", "/?ver=2&token=abc", "/vdi/%zz", "/vdi/%",
                  "/vdi/x#frag", "/vdi/x?a=%00", "/%76di/x", "/vdi/;/../x", "/vdi/.%2e/x"]
HEADER_NAMES = ["Host", "Content-Length", "Transfer-Encoding", "Connection", "Upgrade",
                "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Protocol",
                "Expect", "X-Forwarded-For", "X-Forwarded-Host", "Cookie", "X-A", "Host ",
                " Host", "Con\x00tent-Length", "X\xff", ""]
HEADER_VALUES = ["gw.test", "gw.test:443", "[::1]:8443", "[::1", "a b", "0", "5", "-1",
                 "1e3", "99999999999999999999", "chunked", "chunked, identity", "gzip",
                 "websocket", "Upgrade", "13", "8", "dGhlIHNhbXBsZSBub25jZQ==", "binary",
                 "100-continue", "close", "keep-alive", "a\rb", "a\nb", "\x00", "caf\xe9",
                 "\xff\xfe", ""]
SEPARATORS = ["\r\n", "\r\n", "\r\n", "\n", "\r", "\r\r\n", "\n\r"]


@st.composite
def request_heads(draw):
    """Mostly well-formed request heads with a hostile part or two."""
    method = draw(st.sampled_from(METHODS) | st.text(max_size=8))
    target = draw(st.sampled_from(TRICKY_TARGETS) | st.text(max_size=40)
                  | st.builds(lambda p: "/vdi/" + p, st.text(max_size=40)))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0",
                                    "http/1.1", ""]))
    sep = draw(st.sampled_from(SEPARATORS))
    line = draw(st.sampled_from([f"{method} {target} {version}", f"{method}  {target} {version}",
                                 f"{method} {target}"]))
    headers = draw(st.lists(st.tuples(
        st.sampled_from(HEADER_NAMES) | st.text(max_size=12),
        st.sampled_from([": ", ":", " : ", ":\t"]),
        st.sampled_from(HEADER_VALUES) | st.text(max_size=30)), max_size=12))
    lines = [line] + [name + colon + value for name, colon, value in headers]
    if draw(st.booleans()):
        lines.insert(1, "Host: gw.test")
    text = sep.join(lines)
    return text.encode("latin-1", "replace") if draw(st.booleans()) else text.encode(
        "utf-8", "surrogatepass")


any_head = request_heads() | st.binary(max_size=600)
# For whole connections: now and then a head over the 64 KiB limit.
conn_head = any_head | request_heads().map(lambda h: h + b"\r\nX-Pad: " + b"p" * 70000)


def json_values():
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
        | st.text(max_size=20),
        lambda children: st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=10), children, max_size=5),
        max_leaves=20)


@st.composite
def manager_answers(draw):
    """JSON objects shaped like (or almost like) a desktop answer."""
    answer = draw(st.dictionaries(st.text(max_size=12), json_values(), max_size=6))
    if draw(st.booleans()):
        answer["status"] = draw(st.sampled_from(["OK", "ok", "Pending", "Error", 1, None]))
    if draw(st.booleans()):
        answer["spice_address"] = draw(st.sampled_from(["10.0.0.5", "", "h", None, 5])
                                       | st.text(max_size=20))
    if draw(st.booleans()):
        answer["spice_port"] = draw(
            st.integers(-10, 70000) | st.integers().map(str)
            | st.sampled_from(["5900", " 5900 ", "59.0", "", "\u0665\u0669", True, None, 5900.0])
            | st.text(max_size=8))
    return answer


# =====================================================================================
# Request parsing and paths
# =====================================================================================

@FUZZ
@given(any_head)
def test_request_parser_raises_only_gateway_errors(head):
    try:
        request = gw.parse_request_head(head)
    except gw.GatewayError as error:
        assert 400 <= error.status < 500
        assert error.message
        return
    # Whatever is accepted is clean and self-consistent.
    assert gw._TOKEN.fullmatch(request.method.encode())
    assert request.target.startswith("/") and request.method != "CONNECT"
    assert request.version in ("1.0", "1.1")
    for name, value in request.headers:
        assert name == name.lower() and gw._TOKEN.fullmatch(name.encode())
        assert not any(c in value for c in "\r\n\x00")
    lengths = [v for k, v in request.headers if k == "content-length"]
    assert len(lengths) <= 1
    assert not (lengths and request.chunked)
    if lengths:
        assert 0 <= request.content_length < 10 ** 19
    hosts = [k for k, _ in request.headers if k == "host"]
    assert len(hosts) == 1 if request.version == "1.1" else len(hosts) <= 1
    _ = (request.keep_alive, request.is_upgrade, request.header_tokens("connection"))
    gw.public_host("", False, request, "127.0.0.1")
    gw.public_host("", True, request, "::1")


def _resolves_outside_vdi_for_a_naive_server(path):
    """How a manager that decodes the path once and then resolves dot segments (and
    maybe treats backslash as slash) would read a forwarded path."""
    decoded = unquote(path.partition("?")[0], errors="replace").replace("\\", "/")
    return not gw.remove_dot_segments(decoded).startswith("/vdi/")


path_text = (st.text(alphabet="/.%2eEfF5cC\\?#vdi;x", max_size=30)
             .map(lambda p: "/vdi/" + p) | st.text(max_size=40)
             | st.sampled_from(TRICKY_TARGETS))


@FUZZ
@given(path_text)
def test_normalized_paths_have_no_dot_segments_and_vdi_means_under_vdi(target):
    try:
        path, _ = gw.normalize_path(target)
    except gw.GatewayError as error:
        assert error.status in (400, 404)
        return
    assert path.startswith("/")
    segments = path.split("/")
    assert "." not in segments and ".." not in segments, path
    assert "/../" not in path and "/./" not in path
    assert gw.normalize_path(path)[0] == path          # idempotent
    for encoded in ("%2e", "%2E", "%41", "%7e"):
        assert encoded not in path                      # unreserved ones are decoded
    try:
        forwarded = gw.vdi_target(target)
    except gw.GatewayError as error:
        assert error.status in (400, 404)
        return
    assert forwarded.startswith("/vdi/")
    assert not _resolves_outside_vdi_for_a_naive_server(forwarded), forwarded


@FUZZ
@given(st.text(max_size=80))
def test_query_and_version_never_raise(target):
    params = gw.query_parameters(target)
    version = gw.client_version(params)
    assert isinstance(version, int) and version >= 0


# =====================================================================================
# WebSocket frames
# =====================================================================================

def mask_bytes(payload, mask):
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def client_frame(opcode, payload, fin=True, mask=b"\x00\x00\x00\x00"):
    """A masked client frame, length in the shortest form."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + mask + mask_bytes(payload, mask)


def feed_in_chunks(decoder, data, cuts):
    events = []
    points = sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]
    start = 0
    for point in points:
        events += decoder.feed(data[start:point])
        start = point
    return events


def check_event_shapes(events):
    kinds = gw.EventKind
    for i, event in enumerate(events):
        assert isinstance(event, gw.Event) and isinstance(event.kind, kinds), event
        if event.kind is kinds.DATA:
            assert isinstance(event.payload, (bytes, bytearray))
        elif event.kind in (kinds.PING, kinds.PONG):
            assert isinstance(event.payload, (bytes, bytearray)) and len(event.payload) <= 125
        elif event.kind is kinds.CLOSE:
            assert event.code is None or gw.valid_close_code(event.code)
            assert isinstance(event.reason, str)
        else:
            assert event.code in (1002, 1003, 1007, 1009), event
            assert i == len(events) - 1, "events after an error"


@FUZZ
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=8), st.booleans())
def test_frame_decoder_never_raises_on_arbitrary_bytes(data, cuts, base64_text):
    decoder = gw.FrameDecoder(base64_text=base64_text)
    events = feed_in_chunks(decoder, data, cuts)
    check_event_shapes(events)
    if decoder.failed:
        assert events and events[-1].kind is gw.EventKind.ERROR
        assert decoder.feed(b"\x82\x80abcd") == []     # nothing after an error


@FUZZ
@given(st.binary(max_size=20), st.integers(0, 19))
def test_frame_header_parser_only_returns_or_raises_a_violation(data, pos):
    try:
        parsed = gw.parse_frame_header(data, min(pos, len(data)))
    except gw.ProtocolViolation as exc:
        assert exc.code in (1002, 1009)
        return
    if parsed is not None:
        _, opcode, length, mask, size = parsed
        assert opcode in (0, 1, 2, 8, 9, 10) and 0 <= length <= gw.MAX_CLIENT_FRAME
        assert len(mask) == 4 and size in (6, 8, 14)


@FUZZ
@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4), st.integers(0, 3))
def test_unmask_is_the_xor_with_the_rotated_mask(data, mask, offset):
    expected = bytes(b ^ mask[(i + offset) % 4] for i, b in enumerate(data))
    assert gw.unmask(data, mask, offset) == expected
    assert gw.unmask(gw.unmask(data, mask, offset), mask, offset) == data
    assert gw.unmask(memoryview(data), mask, offset) == expected
    fallback = getattr(gw, "unmask_python", None)   # when the C helper is missing
    if fallback is not None:
        assert fallback(data, mask[offset:] + mask[:offset]) == expected


@FUZZ
@given(st.binary(max_size=130))
def test_close_payload_parser(payload):
    try:
        code, reason = gw.parse_close_payload(payload)
    except gw.ProtocolViolation as exc:
        assert exc.code in (1002, 1007)
        return
    assert (code is None and payload == b"") or gw.valid_close_code(code)
    assert reason == payload[2:].decode("utf-8")


@st.composite
def fragmented_stream(draw, base64_text=False):
    """Messages cut into fragments, control frames between fragments, random masks,
    and the 16/64-bit length forms; returns (wire bytes, messages, pings)."""
    messages = draw(st.lists(st.binary(max_size=3000), min_size=1, max_size=5))
    wire = bytearray()
    pings = []
    for message in messages:
        payload = base64.b64encode(message) if base64_text else message
        cuts = sorted(set(draw(st.lists(st.integers(0, len(payload)), max_size=4))))
        pieces = [payload[a:b] for a, b in zip([0] + cuts, cuts + [len(payload)])]
        for i, piece in enumerate(pieces):
            opcode = (1 if base64_text else 2) if i == 0 else 0
            mask = draw(st.binary(min_size=4, max_size=4))
            wire += client_frame(opcode, piece, fin=i == len(pieces) - 1, mask=mask)
            if draw(st.integers(0, 3)) == 0:
                ping = draw(st.binary(max_size=125))
                pings.append(ping)
                wire += client_frame(9, ping, mask=draw(st.binary(min_size=4, max_size=4)))
    return bytes(wire), messages, pings


@FUZZ
@given(fragmented_stream(), st.lists(st.integers(0, 20000), max_size=10),
       st.sampled_from([None, 1000, 1001, 3000, 4999]), st.text(max_size=30))
def test_frame_decoder_reproduces_valid_binary_streams_exactly(stream, cuts, code, reason):
    wire, messages, pings = stream
    if code is not None:   # 30 characters are at most 120 bytes: within a control frame
        wire += client_frame(8, struct.pack("!H", code) + reason.encode(),
                             mask=b"\x01\x02\x03\x04")
    decoder = gw.FrameDecoder()
    events = feed_in_chunks(decoder, wire, cuts)
    check_event_shapes(events)
    assert not decoder.failed, events[-1]
    assert b"".join(e.payload for e in events if e.kind is gw.EventKind.DATA) == b"".join(messages)
    assert [e.payload for e in events if e.kind is gw.EventKind.PING] == pings
    if code is not None:
        assert events[-1] == gw.Event(gw.EventKind.CLOSE, code=code, reason=reason)


@FUZZ
@given(fragmented_stream(base64_text=True), st.lists(st.integers(0, 20000), max_size=10))
def test_frame_decoder_reproduces_valid_base64_streams_exactly(stream, cuts):
    wire, messages, _ = stream
    decoder = gw.FrameDecoder(base64_text=True)
    events = feed_in_chunks(decoder, wire, cuts)
    assert not decoder.failed, events[-1]
    data = [e.payload for e in events if e.kind is gw.EventKind.DATA]
    assert data == messages      # one data event per text message, decoded


b64_text = (st.text(alphabet="ABCQRSxyz019+/=-_ \n", max_size=40)
            | st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode())
            | st.text(max_size=40))


@FUZZ
@given(b64_text)
def test_base64_text_check_agrees_with_a_strict_decoder(text):
    raw = text.encode("utf-8", "surrogatepass")
    try:
        strict = base64.b64decode(raw, validate=True)
        strict_ok = len(raw) % 4 == 0
    except (binascii.Error, ValueError):
        strict_ok = False
    try:
        decoded = gw.decode_base64_text(raw)
    except gw.ProtocolViolation as exc:
        assert exc.code == 1007
        assert not strict_ok, raw
        return
    assert strict_ok and decoded == strict, raw


@pytest.mark.parametrize("size", [125, 126, 65535, 65536, 300000])
def test_frame_decoder_length_forms(size):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    wire = client_frame(2, payload, mask=b"\x9a\x01\xff\x37")
    decoder = gw.FrameDecoder()
    events = feed_in_chunks(decoder, wire, [1, 2, 5, 9, 13, 14, 1000, 70000])
    assert b"".join(e.payload for e in events if e.kind is gw.EventKind.DATA) == payload


# =====================================================================================
# The manager's answer
# =====================================================================================

@FUZZ
@given(st.binary(max_size=500) | json_values().map(lambda v: json.dumps(v).encode())
       | manager_answers().map(lambda v: json.dumps(v).encode()))
def test_find_desktop_never_raises(answer):
    found = gw.find_desktop(answer)
    if found is not None:
        data, (address, port) = found
        assert data.get("status") == "OK" and isinstance(address, str) and address
        assert isinstance(port, int)


def test_find_desktop_survives_deep_nesting():
    deep = b'{"spice_port": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    assert gw.find_desktop(deep) is None


@st.composite
def desktop_answers(draw):
    """Real desktop answers: status OK, an address, a port as number or string, and
    any other fields (which must come through untouched)."""
    answer = draw(st.dictionaries(st.text(max_size=12), json_values(), max_size=6))
    answer["status"] = "OK"
    answer["spice_address"] = draw(st.text(min_size=1, max_size=20))
    port = draw(st.integers(0, 70000))
    answer["spice_port"] = draw(st.sampled_from([port, str(port), f" {port} "]))
    return answer


@FUZZ
@given(desktop_answers(), st.sampled_from(["gw.test", "[::1]", "10.0.0.1", "h\u00e9"]),
       st.text(alphabet="ABCxyz019-_", min_size=14, max_size=17))
def test_desktop_answer_rewrite_keeps_everything_else(answer, host, token):
    found = gw.find_desktop(json.dumps(answer).encode())
    assert found is not None
    data, desktop = found
    assert desktop == (answer["spice_address"], int(str(answer["spice_port"]).strip()))
    rendered = json.loads(gw.render_desktop_answer(data, host, token))
    assert rendered["spice_address"] == host
    assert rendered["spice_port"] == token
    assert rendered["use_ws"] is True
    for key, value in answer.items():
        if key not in ("spice_address", "spice_port", "use_ws"):
            assert rendered[key] == value
    assert set(rendered) == set(answer) | {"use_ws"}


# =====================================================================================
# The refusal log adds up
# =====================================================================================

class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def gateway_log():
    handler = _Collect()
    gw.log.addHandler(handler)
    level = gw.log.level
    gw.log.setLevel(logging.DEBUG)
    yield handler
    gw.log.removeHandler(handler)
    gw.log.setLevel(level)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(0, 7)), max_size=200))
def test_refusal_log_summarises_and_loses_no_count(events):
    handler = _Collect()
    gw.log.addHandler(handler)
    try:
        now = [0.0]
        refusals = gw.RefusalLog(window_s=10, clock=lambda: now[0])
        for reason, step in events:
            now[0] += step
            refusals.refuse(reason, "detail")
            if step > 5:
                refusals.flush()
        now[0] += 11
        refusals.flush()
    finally:
        gw.log.removeHandler(handler)
    messages = [rec.getMessage() for rec in handler.records]
    for reason in "abc":
        total = sum(1 for r, _ in events if r == reason)
        first = messages.count(f"refused: {reason}: detail")
        more = sum(int(m.group(1)) for m in map(
            re.compile(rf"refused (\d+) more: {reason} \(").match, messages) if m)
        assert first + more == total, (reason, messages)
        span = sum(step for _, step in events) + 11
        assert first <= span / 10 + 1


# =====================================================================================
# Whole connections, in-process: no exception escapes the connection thread
# =====================================================================================

class _Echo:
    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(sock,), daemon=True).start()

    @staticmethod
    def _echo(sock):
        with sock:
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        return
                    sock.sendall(data)
            except OSError:
                return


@pytest.fixture(scope="module")
def inprocess():
    """A Gateway object as main() builds it (no TLS), a desktop that echoes with a
    token for it, and a manager address that refuses at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    config = gw.config_from_dict({"ManagerIP": f"127.0.0.1:{dead}", "FirstSpicePort": 1,
                                  "LastSpicePort": 65535, "ManagerTimeout": 2})
    gateway = gw.Gateway(config)
    echo = _Echo()
    token = gateway.tokens.issue(echo.address)
    listener = socket.create_server(("127.0.0.1", 0))
    yield gateway, token, listener
    listener.close()
    echo.listener.close()


def run_connection(inprocess, chunks, handler):
    """Serves one real TCP connection with serve_connection() in a thread, sends the
    chunks, half-closes, reads everything; asserts the thread ends and logs no error."""
    gateway, _, listener = inprocess
    client = socket.create_connection(listener.getsockname(), timeout=10)
    server, peer = listener.accept()
    thread = threading.Thread(target=gw.serve_connection, args=(gateway, server, peer, False),
                              name="conn-fuzz", daemon=True)
    thread.start()
    received = bytearray()
    try:
        for chunk in chunks:
            try:
                client.sendall(chunk)
            except OSError:
                break
        try:
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                data = client.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            received += data
    finally:
        client.close()
    thread.join(15)
    assert not thread.is_alive(), "the connection thread did not end"
    bad = [r for r in handler.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]
    return bytes(received)


@FUZZ_CONN
@given(st.lists(conn_head, min_size=1, max_size=3),
       st.sampled_from(["\r\n\r\n", "\r\n\r\n{}", "\r\n\r\n0\r\n\r\n", "", "\n\n"]))
def test_whole_http_connections_never_leak_an_exception(inprocess, gateway_log, heads,
                                                        ending):
    gateway_log.records.clear()
    answer = run_connection(inprocess, [h + ending.encode() for h in heads], gateway_log)
    if answer:
        assert answer.startswith(b"HTTP/1.1 "), answer[:100]


@st.composite
def tunnel_bytes(draw):
    """A valid upgrade with the token, then a mix of good frames and hostile bytes."""
    token = draw(st.sampled_from(["TOKEN", "wrong", ""]))
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 5))
        if kind <= 2:
            parts.append(client_frame(draw(st.sampled_from([0, 1, 2, 8, 9, 10])),
                                      draw(st.binary(max_size=200)),
                                      fin=draw(st.booleans()),
                                      mask=draw(st.binary(min_size=4, max_size=4))))
        elif kind == 3:
            parts.append(draw(st.binary(max_size=50)))
        elif kind == 4:
            parts.append(client_frame(1, base64.b64encode(draw(st.binary(max_size=100)))))
        else:
            parts.append(client_frame(8, struct.pack("!H", draw(st.integers(0, 65535)))))
    subprotocol = draw(st.sampled_from(["binary", "base64", ""]))
    return token, subprotocol, parts


@FUZZ_CONN
@given(tunnel_bytes())
def test_whole_tunnels_never_leak_an_exception(inprocess, gateway_log, spec):
    gateway_log.records.clear()
    token, subprotocol, parts = spec
    token = inprocess[1] if token == "TOKEN" else token
    head = (f"GET /?ver=2&token={token} HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            + (f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else "")
            + "\r\n").encode()
    answer = run_connection(inprocess, [head] + parts, gateway_log)
    assert answer.startswith(b"HTTP/1.1 101 " if token == inprocess[1] else b"HTTP/1.1 403 ")
