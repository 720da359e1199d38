"""Table-driven tests of the gateway's pure functions (no sockets)."""

import json
import logging
import os
import threading

import pytest
from wsproto.frame_protocol import FrameProtocol

import flexvdi_gateway as gw

# -- configuration ---------------------------------------------------------------------


def test_defaults_are_the_documented_ones():
    config = gw.config_from_dict({})
    assert (config.manager_address, config.ssl_port, config.first_spice_port,
            config.last_spice_port) == ("", 443, 5900, 25900)
    assert config.cert_file == config.key_file == "/etc/ssl/certs/flexvdi-agent"
    assert (config.keepalive_s, config.debug, config.listen_ip, config.plain_port,
            config.pong_timeout_s) == (0, False, "", 0, 10)
    assert (config.ldap_server, config.ldap_port, config.ldap_one_shot, config.ldap_fallback,
            config.ldap_cache_s) == ("", 389, True, True, 3600)
    assert (config.token_timeout_s, config.public_address, config.manager_ca_file,
            config.manager_timeout_s, config.ldap_use_ssl, config.ldap_ca_file,
            config.ldap_timeout_s) == (300, "", "", 30, False, "", 5)
    assert config.client_stall_timeout_s == 60


def test_key_names_ignore_case():
    config = gw.config_from_dict({"managerip": "10.0.0.1", "SSLPORT": 8443,
                                  "LdapServer": "ldap.example", "ldapbasedn": "dc=x",
                                  "LDAPSearchRdn": "uid", "ldapattribute": "l"})
    assert (config.manager_address, config.ssl_port, config.ldap_server) == (
        "10.0.0.1", 8443, "ldap.example")


def test_password_is_not_in_the_repr():
    assert "s3cret" not in repr(gw.config_from_dict({"LDAPPassword": "s3cret"}))


@pytest.mark.parametrize("data, words", [
    ({"SslPort": 70000}, ["SslPort", "1..65535"]),
    ({"SslPort": 0}, ["SslPort"]),
    ({"sslport": "443"}, ["sslport", "number"]),
    ({"FirstSpicePort": 6000, "LastSpicePort": 5999}, ["FirstSpicePort", "LastSpicePort"]),
    ({"Debug": "yes"}, ["Debug", "true or false"]),
    ({"KeepAlive": -1}, ["KeepAlive", "0 or more"]),
    ({"PongTimeout": 0}, ["PongTimeout", "more than 0"]),
    ({"ClientStallTimeout": 0}, ["ClientStallTimeout", "more than 0"]),
    ({"clientstalltimeout": "60"}, ["clientstalltimeout", "number"]),
    ({"ManagerIP": 5}, ["ManagerIP", "string"]),
    ({"ManagerIP": "host:99999"}, ["ManagerIP", "port"]),
    ({"ManagerIP": "a b"}, ["ManagerIP"]),
    ({"PlainPort": 443}, ["PlainPort", "SslPort"]),
    ({"LDAPServer": "ldap.example"}, ["LDAPBaseDN"]),
    ({"LDAPServer": "x", "LDAPBaseDN": "dc=x", "LDAPSearchRDN": "uid)(x", "LDAPAttribute": "l"},
     ["LDAPSearchRDN"]),
    ({"ManagerCAFile": "/nonexistent/ca.pem"}, ["ManagerCAFile", "does not exist"]),
    ({"SslPort": 1, "sslport": 2}, ["given twice"]),
    ([], ["one JSON object"]),
])
def test_impossible_values_name_the_key(data, words):
    with pytest.raises(gw.ConfigError) as error:
        gw.config_from_dict(data, "/etc/flexvdi/flexvdi-gateway.conf")
    message = str(error.value)
    assert message.startswith("/etc/flexvdi/flexvdi-gateway.conf: ")
    assert "\n" not in message
    for word in words:
        assert word in message


def test_unknown_key_is_a_warning_naming_it(caplog):
    with caplog.at_level(logging.WARNING, "flexvdi_gateway"):
        gw.config_from_dict({"ManagerIp": "m", "Colour": "blue"}, "f.conf")
    assert "Colour" in caplog.text


@pytest.mark.parametrize("content, words", [
    (b"{", ["invalid JSON", "line 1"]),
    (b'{"SslPort": 443,}', ["invalid JSON"]),
    (b"\xff\xfe", ["UTF-8"]),
])
def test_load_config_reports_file_problems(tmp_path, content, words):
    path = tmp_path / "bad.conf"
    path.write_bytes(content)
    with pytest.raises(gw.ConfigError) as error:
        gw.load_config(str(path))
    assert str(path) in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(gw.ConfigError, match="cannot read"):
        gw.load_config(str(tmp_path / "missing.conf"))


def test_shipped_config_file_loads_with_the_documented_defaults():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert gw.load_config(os.path.join(root, "flexvdi-gateway.conf")) == gw.Config()


@pytest.mark.parametrize("text, expected", [
    ("10.0.0.1", ("10.0.0.1", 443)),
    ("10.0.0.1:8443", ("10.0.0.1", 8443)),
    ("manager.example", ("manager.example", 443)),
    ("[fd00::1]:444", ("fd00::1", 444)),
    ("[fd00::1]", ("fd00::1", 443)),
    ("fd00::1", ("fd00::1", 443)),
])
def test_parse_host_port(text, expected):
    assert gw.parse_host_port(text, 443) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:0", "host:x", "[::1", "a b", "h/x",
                                  "host:65536"])
def test_parse_host_port_refuses(text):
    with pytest.raises(ValueError):
        gw.parse_host_port(text, 443)


@pytest.mark.parametrize("text, port, use_ssl, expected", [
    ("ldap.example", 389, False, ("ldap.example", 389, False)),
    ("ldap.example", 636, False, ("ldap.example", 636, True)),
    ("ldap://ldap.example:1389/", 389, False, ("ldap.example", 1389, False)),
    ("ldaps://ldap.example", 389, False, ("ldap.example", 636, True)),
    ("LDAPS://ldap.example:1636", 389, False, ("ldap.example", 1636, True)),
    ("ldap.example", 389, True, ("ldap.example", 389, True)),
])
def test_parse_ldap_server(text, port, use_ssl, expected):
    assert gw.parse_ldap_server(text, port, use_ssl) == expected


# -- request parsing -------------------------------------------------------------------

def head(*lines):
    return "\r\n".join(lines).encode("latin-1")


def test_parses_a_normal_request():
    request = gw.parse_request_head(head("POST /vdi/desktop HTTP/1.1", "Host: gw:443",
                                         "Content-Type: text/json", "Content-Length: 12"))
    assert (request.method, request.target, request.version) == ("POST", "/vdi/desktop", "1.1")
    assert request.header("content-type") == "text/json"
    assert request.content_length == 12 and request.keep_alive and not request.is_upgrade


@pytest.mark.parametrize("raw, error", [
    (b"GARBAGE", gw.BadRequest),
    (b"GET / HTTP/2.0\r\nHost: x", gw.BadRequest),
    (b"GET  / HTTP/1.1\r\nHost: x", gw.BadRequest),
    (b"GET /\x00 HTTP/1.1\r\nHost: x", gw.BadRequest),
    (b"GET / HTTP/1.1\nHost: x", gw.BadRequest),
    (b"GET / HTTP/1.1\r\nHost: x\rY: z", gw.BadRequest),
    (b"GET / HTTP/1.1\r\nHost: x\r\n folded", gw.BadRequest),
    (b"GET / HTTP/1.1\r\nHost : x", gw.BadRequest),
    (b"GET / HTTP/1.1\r\nHost: x\r\nNo colon here", gw.BadRequest),
    (b"POST /vdi/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1",
     gw.BadRequest),
    (b"POST /vdi/a HTTP/1.1\r\nHost: x\r\nContent-Length: -1", gw.BadRequest),
    (b"POST /vdi/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3", gw.BadRequest),
    (b"POST /vdi/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 1", gw.BadRequest),
    (b"POST /vdi/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked",
     gw.BadRequest),
    (b"POST /vdi/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked", gw.BadRequest),
    (b"GET /vdi/a HTTP/1.1", gw.BadRequest),
    (b"GET /vdi/a HTTP/1.1\r\nHost: a\r\nHost: b", gw.BadRequest),
    (b"GET /vdi/a HTTP/1.1\r\nHost: a b", gw.BadRequest),
    (b"GET /vdi/a HTTP/1.1\r\nHost: a\x7f", gw.BadRequest),
    (b"GET /vdi/a HTTP/1.1\r\nX: \x01", gw.BadRequest),
    (b"GET /vdi/\xff HTTP/1.1\r\nHost: x", gw.BadRequest),
    (b"GET http://manager/vdi/a HTTP/1.1\r\nHost: x", gw.NotFound),
    (b"CONNECT manager:443 HTTP/1.1\r\nHost: x", gw.NotFound),
    (b"OPTIONS * HTTP/1.1\r\nHost: x", gw.NotFound),
    (b"GET / HTTP/1.1\r\nHost: x" + b"\r\nX: y" * 101, gw.HeadersTooLarge),
])
def test_refuses_what_rfc_9112_forbids(raw, error):
    with pytest.raises(error):
        gw.parse_request_head(raw)


def test_http_1_0_without_host_is_fine_and_not_keep_alive():
    request = gw.parse_request_head(b"GET /vdi/x HTTP/1.0")
    assert not request.keep_alive


def test_upgrade_detection():
    request = gw.parse_request_head(head("GET /anything?token=x HTTP/1.1", "Host: x",
                                         "Upgrade: WebSocket", "Connection: keep-alive, Upgrade"))
    assert request.is_upgrade


@pytest.mark.parametrize("target, expected", [
    ("/vdi/desktop", "/vdi/desktop"),
    ("/vdi/desktop?x=1&y=%2f", "/vdi/desktop?x=1&y=%2f"),
    ("/vdi/./desktop", "/vdi/desktop"),
    ("/vdi/a/../desktop", "/vdi/desktop"),
    ("/vdi/%64esktop", "/vdi/desktop"),
    ("/vdi/%7euser", "/vdi/~user"),
    ("/vdi/a%20b", "/vdi/a%20b"),
    ("/vdi/a%3fb", "/vdi/a%3Fb"),
    ("/vdi/", "/vdi/"),
    ("/x/../vdi/authmode", "/vdi/authmode"),
])
def test_vdi_target_forwards(target, expected):
    assert gw.vdi_target(target) == expected


@pytest.mark.parametrize("target", [
    "/", "/vdi", "/vdi/..", "/vdi/../x", "/vdi/%2e%2e/x", "/vdi/%2E%2e/x", "/vdi/.%2e/x",
    "/vdi%2fx", "/vdi/a%2F..%2F..%2Fx", "/vdi/a%5cb", "/vdi\\a", "/VDI/desktop", "/vdix",
    "//vdi/desktop", "/admin/vdi/",
])
def test_vdi_target_refuses(target):
    with pytest.raises(gw.NotFound):
        gw.vdi_target(target)


@pytest.mark.parametrize("target", ["/vdi/%zz", "/vdi/%4", "/vdi/#frag"])
def test_vdi_target_malformed(target):
    with pytest.raises(gw.BadRequest):
        gw.vdi_target(target)


@pytest.mark.parametrize("host, expected", [
    ("gw.example.com", "gw.example.com"), ("gw.example.com:8443", "gw.example.com"),
    ("[::1]:8443", "[::1]"), ("[::1]", "[::1]"), ("10.1.2.3:443", "10.1.2.3"),
    ("::1", "[::1]"),
])
def test_host_without_port(host, expected):
    assert gw.host_without_port(host) == expected


@pytest.mark.parametrize("public, plain, headers, local, expected", [
    ("vdi.example", False, [("host", "other")], "10.0.0.1", "vdi.example"),
    ("", True, [("host", "inner:8080"), ("x-forwarded-host", "outer.example:443, p2")],
     "10.0.0.1", "outer.example"),
    ("", False, [("host", "gw:8443"), ("x-forwarded-host", "evil")], "10.0.0.1", "gw"),
    ("", False, [], "10.0.0.1", "10.0.0.1"),
    ("", False, [], "::1", "[::1]"),
])
def test_public_host(public, plain, headers, local, expected):
    request = gw.Request("POST", "/vdi/desktop", "1.1", headers)
    assert gw.public_host(public, plain, request, local) == expected


@pytest.mark.parametrize("target, expected", [
    ("/?ver=2&token=abc", {"ver": "2", "token": "abc"}),
    ("/?token=a%2Db&token=second", {"token": "a-b"}),
    ("/", {"": ""}),
])
def test_query_parameters(target, expected):
    assert gw.query_parameters(target) == expected


@pytest.mark.parametrize("params, version", [
    ({"ver": "2"}, 2), ({}, 1), ({"ver": "x"}, 1), ({"ver": "-2"}, 1), ({"ver": "3"}, 3),
    ({"ver": "２"}, 1),
])
def test_client_version(params, version):
    assert gw.client_version(params) == version


@pytest.mark.parametrize("offered, chosen", [
    ([("sec-websocket-protocol", "binary")], "binary"),
    ([("sec-websocket-protocol", "base64, binary")], "binary"),
    ([("sec-websocket-protocol", "base64")], "base64"),
    ([("sec-websocket-protocol", "chat"), ("sec-websocket-protocol", "binary")], "binary"),
    ([("sec-websocket-protocol", "Binary")], None),
    ([], None),
])
def test_choose_subprotocol(offered, chosen):
    assert gw.choose_subprotocol(gw.Request("GET", "/", "1.1", offered)) == chosen


def test_accept_key_of_rfc_6455_example():
    assert gw.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


# -- manager answer rewrite ------------------------------------------------------------

@pytest.mark.parametrize("value, port", [(5901, 5901), ("5901", 5901), (" 5901 ", 5901),
                                         ("59a1", None), (True, None), (None, None),
                                         (5901.0, None), ("", None)])
def test_spice_port_of(value, port):
    assert gw.spice_port_of(value) == port


@pytest.mark.parametrize("answer, desktop", [
    ({"status": "OK", "spice_address": "10.0.0.5", "spice_port": "5901"}, ("10.0.0.5", 5901)),
    ({"status": "OK", "spice_address": "10.0.0.5", "spice_port": 5901}, ("10.0.0.5", 5901)),
    ({"status": "Pending", "spice_address": "10.0.0.5", "spice_port": 5901}, None),
    ({"status": "OK", "spice_port": 5901}, None),
    ({"status": "OK", "spice_address": "", "spice_port": 5901}, None),
    ({"status": "OK", "spice_address": "h", "spice_port": "x"}, None),
    ([{"spice_port": 1}], None),
])
def test_find_desktop(answer, desktop):
    found = gw.find_desktop(json.dumps(answer).encode())
    assert (found[1] if found else None) == desktop


def test_find_desktop_ignores_non_json():
    assert gw.find_desktop(b"<html>spice_port</html>") is None
    assert gw.find_desktop(b"\xff spice_port") is None


def test_render_keeps_every_other_field():
    answer = {"status": "OK", "spice_address": "10.0.0.5", "spice_port": "5901",
              "spice_password": "pw", "use_ws": False, "title": "Escritorio ñ",
              "layout": "es", "inactivity_timeout": 60, "extra": {"nested": [1, 2]}}
    out = json.loads(gw.render_desktop_answer(answer, "gw.example", "TOKEN1234567890"))
    assert out == dict(answer, spice_address="gw.example", spice_port="TOKEN1234567890",
                       use_ws=True)
    assert list(out) == list(answer)


@pytest.mark.parametrize("body, username", [
    (b'{"username": "alice"}', "alice"), (b'{"username": ""}', None),
    (b'{"username": 5}', None), (b"username=alice", None), (b"[1]", None), (b"", None),
    (b'{"username": "\\u00e9mile"}', "émile"),
])
def test_username_in(body, username):
    assert gw.username_in(body) == username


# -- tokens ----------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_token_shape_and_randomness():
    registry = gw.TokenRegistry(300)
    tokens = {registry.issue(("h", 1)) for _ in range(1000)}
    assert len(tokens) == 1000
    for token in tokens:
        assert 14 <= len(token) <= 17
        assert all(c.isascii() and (c.isalnum() or c in "-_") for c in token)


def test_token_lifetime():
    clock = Clock()
    registry = gw.TokenRegistry(300, clock=clock)
    token = registry.issue(("10.0.0.5", 5901))
    clock.now += 299
    assert registry.acquire(token).desktop == ("10.0.0.5", 5901)
    clock.now += 10_000                      # a tunnel open: no expiry
    assert registry.acquire(token).desktop == ("10.0.0.5", 5901)
    registry.release(token)
    registry.release(token)
    clock.now += 299
    assert registry.acquire(token) is not None
    registry.release(token)
    clock.now += 300
    assert registry.acquire(token) is None
    assert registry.acquire("unknown") is None


def test_full_registry_drops_the_token_idle_the_longest():
    clock = Clock()
    registry = gw.TokenRegistry(300, max_tokens=3, clock=clock)
    busy = registry.issue(("busy", 1))
    assert registry.acquire(busy)
    old = registry.issue(("old", 1))
    clock.now += 1
    newer = registry.issue(("newer", 1))
    registry.issue(("newest", 1))
    assert len(registry) == 3
    assert registry.acquire(old) is None
    assert registry.acquire(busy) and registry.acquire(newer)


# -- framing ---------------------------------------------------------------------------

def client_frames(*messages, fragment=None):
    """Masked client frames built by wsproto (an independent implementation)."""
    protocol = FrameProtocol(client=True, extensions=[])
    out = b""
    for opcode, payload in messages:
        if opcode == "close":
            out += protocol.close(code=payload)
        elif opcode == "ping":
            out += protocol.ping(payload)
        elif fragment:
            for i in range(0, len(payload), fragment):
                out += protocol.send_data(payload[i:i + fragment],
                                          fin=i + fragment >= len(payload))
        else:
            out += protocol.send_data(payload, fin=True)
    return out


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000, 1 << 20])
@pytest.mark.parametrize("fragment", [None, 5, 4096])
def test_decoder_reproduces_binary_payload_whatever_the_split(chunk, fragment):
    payloads = [os.urandom(n) for n in (0, 1, 125, 126, 65535, 65536, 100_000)]
    frames = client_frames(*[("data", p) for p in payloads], fragment=fragment)
    decoder = gw.FrameDecoder()
    out = bytearray()
    for i in range(0, len(frames), chunk):
        for event in decoder.feed(frames[i:i + chunk]):
            assert event.kind is gw.EventKind.DATA, event
            out += event.payload
    assert bytes(out) == b"".join(payloads)


def test_decoder_control_frames_between_fragments():
    protocol = FrameProtocol(client=True, extensions=[])
    frames = (protocol.send_data(b"abc", fin=False) + protocol.ping(b"p")
              + protocol.send_data(b"def", fin=True) + protocol.close(code=1000, reason="bye"))
    events = gw.FrameDecoder().feed(frames)
    kind = gw.EventKind
    assert events == [gw.Event(kind.DATA, b"abc"), gw.Event(kind.PING, b"p"),
                      gw.Event(kind.DATA, b"def"), gw.Event(kind.CLOSE, code=1000, reason="bye")]


def test_decoder_base64_text():
    protocol = FrameProtocol(client=True, extensions=[])
    frames = protocol.send_data("AAEC", fin=False) + protocol.send_data("/w==", fin=True)
    assert gw.FrameDecoder(base64_text=True).feed(frames) == [
        gw.Event(gw.EventKind.DATA, b"\x00\x01\x02\xff")]


@pytest.mark.parametrize("frames, base64_text, code", [
    (b"\x82\x05hello", False, 1002),
    (b"\xa2\x80abcd", False, 1002),
    (b"\x8b\x80abcd", False, 1002),
    (b"\x08\x80abcd", False, 1002),
    (b"\x89\xfe\x00\x7eabcd", False, 1002),
    (b"\x00\x80abcd", False, 1002),
    (b"\x02\x80abcd\x02\x80abcd", False, 1002),
    (b"\x81\x80abcd", False, 1003),
    (b"\x82\xff\x80\x00\x00\x00\x00\x00\x00\x00", False, 1002),
    (b"\x82\xff\x00\x00\x00\x00\x00\x10\x00\x01", False, 1009),
    (b"\x88\x81\x00\x00\x00\x00\x01", False, 1002),
    (b"\x88\x82\x00\x00\x00\x00\x03\xee", False, 1002),
    (b"\x88\x82\x00\x00\x00\x00\x0b\xb7", False, 1002),          # 2999
    (b"\x88\x84\x00\x00\x00\x00\x03\xe8\xff\xfe", False, 1007),  # reason not UTF-8
    (b"\x81\x82\x00\x00\x00\x00\xff\xfe", True, 1007),
    (b"\x81\x83\x00\x00\x00\x00abc", True, 1007),                # not base64 length
    (b"\x81\x84\x00\x00\x00\x00ab!=", True, 1007),
])
def test_decoder_protocol_errors(frames, base64_text, code):
    events = gw.FrameDecoder(base64_text).feed(frames)
    assert events[-1].kind is gw.EventKind.ERROR and events[-1].code == code
    assert events[-1].reason


@pytest.mark.parametrize("code, valid", [
    (999, False), (1000, True), (1003, True), (1004, False), (1005, False), (1006, False),
    (1007, True), (1011, True), (1014, True), (1015, False), (2999, False), (3000, True),
    (4999, True), (5000, False),
])
def test_valid_close_code(code, valid):
    assert gw.valid_close_code(code) is valid


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 1000, 65536])
@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_unmask_matches_the_rfc_definition(size, offset):
    data, mask = os.urandom(size), os.urandom(4)
    expected = bytes(b ^ mask[(i + offset) % 4] for i, b in enumerate(data))
    assert gw.unmask(data, mask, offset) == expected


@pytest.mark.parametrize("length, header_size", [(0, 2), (125, 2), (126, 4), (65535, 4),
                                                 (65536, 10)])
def test_frame_header_sizes(length, header_size):
    header = gw.frame_header(gw.Opcode.BINARY, length)
    assert len(header) == header_size and header[0] == 0x82


def test_max_sent_frame_is_within_64_kib():
    assert gw.MAX_SEND_PAYLOAD + len(gw.frame_header(gw.Opcode.BINARY, gw.MAX_SEND_PAYLOAD)) <= 65536


# -- logging ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("plain", "plain"), ("\x1b[31m", "\\x1b[31m"), ("a\r\nb", "a\\x0d\\x0ab"),
    (b"\xff", "\\xff"), ("é", "\\xe9"), ("x" * 200, "x" * 120 + "..."),
])
def test_printable(text, expected):
    assert gw.printable(text) == expected


def test_token_hint_shows_four_characters():
    assert gw.token_hint("ABCDEFGHIJKLMNOP") == "ABCD..."


def test_refusal_log_summarises_repeats(caplog):
    clock = Clock()
    refusals = gw.RefusalLog(10, clock=clock)
    with caplog.at_level(logging.WARNING, "flexvdi_gateway"):
        for i in range(1000):
            refusals.refuse("unknown token", f"attempt {i}")
        clock.now += 11
        refusals.flush()
    lines = caplog.text.strip().splitlines()
    assert len(lines) == 2
    assert "attempt 0" in lines[0] and "999 more" in lines[1]


# -- LDAP cache (directory search replaced by a small fake) ----------------------------

class CountingDirectory(gw.LdapDirectory):
    def __init__(self, config, answers, clock, gate=None):
        super().__init__(config, clock=clock)
        self.answers = answers
        self.searches = 0
        self.gate = gate

    def _search(self, username):
        self.searches += 1
        if self.gate:
            self.gate.wait(5)
        answer = self.answers.get(username.lower())
        if isinstance(answer, Exception):
            raise answer
        return (answer, "directory") if answer else (None, "no directory entry")


LDAP_CONFIG = gw.config_from_dict({"LDAPServer": "ldap.test", "LDAPBaseDN": "dc=x",
                                   "LDAPSearchRDN": "uid", "LDAPAttribute": "l",
                                   "LDAPCacheSecs": 60})


def test_cache_lives_its_seconds_from_the_search():
    clock = Clock()
    directory = CountingDirectory(LDAP_CONFIG, {"alice": "m1"}, clock)
    assert directory.manager_for("alice") == ("m1", "directory")
    clock.now += 59
    assert directory.manager_for("ALICE") == ("m1", "directory")
    assert directory.searches == 1
    clock.now += 1
    directory.manager_for("alice")
    assert directory.searches == 2


def test_no_manager_is_cached_but_a_failure_is_not():
    clock = Clock()
    answers = {"ghost": None, "bob": gw.DirectoryUnavailable("down")}
    directory = CountingDirectory(LDAP_CONFIG, answers, clock)
    directory.manager_for("ghost")
    directory.manager_for("ghost")
    assert directory.searches == 1
    for _ in range(2):
        with pytest.raises(gw.DirectoryUnavailable):
            directory.manager_for("bob")
    assert directory.searches == 3


def test_simultaneous_misses_make_one_search():
    gate = threading.Event()
    directory = CountingDirectory(LDAP_CONFIG, {"carol": "m3"}, Clock(), gate)
    results = []
    threads = [threading.Thread(target=lambda: results.append(directory.manager_for("carol")))
               for _ in range(50)]
    for thread in threads:
        thread.start()
    gate.set()
    for thread in threads:
        thread.join(10)
    assert results == [("m3", "directory")] * 50
    assert directory.searches == 1


def test_cache_off_searches_every_time():
    config = gw.config_from_dict({"LDAPServer": "l", "LDAPBaseDN": "dc=x",
                                  "LDAPSearchRDN": "uid", "LDAPAttribute": "l",
                                  "LDAPCacheSecs": 0})
    directory = CountingDirectory(config, {"alice": "m1"}, Clock())
    for _ in range(3):
        directory.manager_for("alice")
    assert directory.searches == 3
