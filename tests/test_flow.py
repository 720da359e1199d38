"""The /vdi/ side end to end: forwarding, the desktop answer rewrite, gateway-made
errors as JSON, and what reaches the log."""

import json
import socket
import time

import fakes
import pytest
from conftest import ROOT, free_port, wait_for
from wsclient import WsClient, post, post_json, raw_request, status_of

LOCAL = "127.0.0.1"
BODY = {"hwaddress": "00:11:22:33:44:55", "username": "alice", "password": "alice-secret-pw",
        "desktop": "win10"}


def test_authmode_and_desktop_are_forwarded_and_rewritten(gateway, manager, spice_factory):
    spice = spice_factory(fakes.echo)
    manager.desktop = spice.address
    status, answer = post_json(LOCAL, gateway.port, "/vdi/authmode", {"hwaddress": "hw"})
    assert (status, answer) == (200, {"status": "OK", "auth_mode": "active_directory"})
    status, headers, raw = post(LOCAL, gateway.port, "/vdi/desktop", BODY)
    answer = json.loads(raw)
    assert status == 200
    assert int(headers["content-length"]) == len(raw)
    assert answer["spice_address"] == LOCAL
    token = answer["spice_port"]
    assert 14 <= len(token) <= 17 and all(c.isalnum() or c in "-_" for c in token)
    assert answer["use_ws"] is True
    assert answer["spice_password"] == manager.spice_password
    assert (answer["title"], answer["layout"], answer["inactivity_timeout"]) == (
        "Desktop of alice", "es", 600)
    method, path, headers, body = manager.requests[-1]
    assert (method, path, json.loads(body)) == ("POST", "/vdi/desktop", BODY)
    assert headers["X-Forwarded-For"] == LOCAL
    assert headers["X-Forwarded-Proto"] == "https"
    assert "Accept-Encoding" not in headers or headers["Accept-Encoding"] == "identity"


def test_every_desktop_answer_gets_a_fresh_token(gateway, manager, spice_factory):
    spice = spice_factory(fakes.echo)
    tokens = {gateway.desktop_token(manager, spice)["spice_port"] for _ in range(5)}
    assert len(tokens) == 5


@pytest.mark.parametrize("port_value", [6000, "6000", " 6000 "])
def test_spice_port_as_number_or_string(gateway, manager, spice_factory, port_value):
    spice = spice_factory(fakes.echo)
    manager.answer_override = lambda path, body: path == "/vdi/desktop" and (
        200, [("Content-Type", "application/json")],
        json.dumps({"status": "OK", "spice_address": LOCAL,
                    "spice_port": port_value if port_value != 6000 else spice.port,
                    "spice_password": "pw", "use_ws": "true"}).encode())
    status, answer = post_json(LOCAL, gateway.port, "/vdi/desktop", BODY)
    assert status == 200 and answer["use_ws"] is True
    assert answer["spice_port"] != port_value


@pytest.mark.parametrize("port", [80, 1023, 65535 + 0])
def test_port_outside_the_range_is_an_error_and_registers_nothing(gateway_factory, manager,
                                                                  port):
    gateway = gateway_factory(FirstSpicePort=5900, LastSpicePort=5999)
    manager.desktop = (LOCAL, port)
    status, answer = post_json(LOCAL, gateway.port, "/vdi/desktop", BODY)
    assert status == 200
    assert answer["status"] == "Error" and answer["message"]
    assert "spice_password" not in answer
    wait_for(lambda: "outside 5900..5999" in gateway.log_text(), 5, message="log line")


@pytest.mark.parametrize("answer", [
    {"status": "Pending"},
    {"status": "SelectDesktop", "message": json.dumps({"a": "Desktop A", "b": "B"})},
    {"status": "Error", "message": "Wrong password"},
    {"status": "OK", "spice_address": "10.0.0.1"},
])
def test_other_answers_pass_through_byte_for_byte(gateway, manager, answer):
    raw = (json.dumps(answer, indent=1) + "\n").encode()
    manager.answer_override = lambda path, body: (200, [("Content-Type", "text/json"),
                                                        ("X-Manager", "yes")], raw)
    status, headers, body = post(LOCAL, gateway.port, "/vdi/desktop", BODY)
    assert (status, body) == (200, raw)
    assert headers["x-manager"] == "yes"


@pytest.mark.parametrize("mode, status, body", [
    ("error500", 500, b"internal error"),
    ("text", 200, b"<html>oops</html>"),   # not JSON: passes through untouched
])
def test_any_real_http_answer_of_the_manager_passes_through(gateway, manager, mode, status,
                                                            body):
    manager.mode = mode
    assert post(LOCAL, gateway.port, "/vdi/desktop", BODY)[::2] == (status, body)


@pytest.mark.parametrize("mode, why", [
    ("garbage", "did not answer HTTP"),
    ("close", "closed the connection"),
    ("truncated", "closed the connection"),
])
def test_manager_faults_give_a_json_error_and_a_log_line(gateway, manager, mode, why):
    manager.mode = mode
    status, answer = post_json(LOCAL, gateway.port, "/vdi/desktop", BODY)
    assert status == 200 and answer["status"] == "Error"
    assert manager.address not in answer["message"]
    wait_for(lambda: why in gateway.log_text() and manager.address in gateway.log_text(), 5,
             message=f"log saying {why}")


def test_manager_down_gives_a_json_error(gateway_factory, manager):
    dead = f"127.0.0.1:{free_port()}"
    gateway = gateway_factory(ManagerIP=dead)
    status, answer = post_json(LOCAL, gateway.port, "/vdi/authmode", {"hwaddress": "x"})
    assert status == 200 and answer["status"] == "Error"
    wait_for(lambda: f"manager {dead}: connection refused" in gateway.log_text(), 5,
             message="refused log line")


def test_manager_hanging_past_its_timeout(gateway_factory, manager):
    gateway = gateway_factory(ManagerTimeout=1)
    manager.mode = "hang"
    started = time.monotonic()
    status, answer = post_json(LOCAL, gateway.port, "/vdi/desktop", BODY)
    assert status == 200 and answer["status"] == "Error"
    assert time.monotonic() - started < 3
    assert "no answer within 1 s" in gateway.log_text()


@pytest.mark.parametrize("host_header, expected", [
    ("gateway.example.com:8443", "gateway.example.com"),
    ("gateway.example.com", "gateway.example.com"),
    ("[::1]:8443", "[::1]"),
    ("192.0.2.7:443", "192.0.2.7"),
])
def test_spice_address_is_the_host_the_client_used(gateway, manager, spice_factory,
                                                   host_header, expected):
    manager.desktop = spice_factory(fakes.echo).address
    _status, answer = post_json(LOCAL, gateway.port, "/vdi/desktop", BODY,
                               headers={"Host": host_header})
    assert answer["spice_address"] == expected


def test_ipv6_client_gets_bracketed_address(gateway_factory, manager, spice_factory):
    gateway = gateway_factory(ListenIP="::1")
    spice = spice_factory(fakes.echo)
    manager.desktop = spice.address
    _status, answer = post_json("::1", gateway.port, "/vdi/desktop", BODY)
    assert answer["spice_address"] == "[::1]"
    with WsClient("::1", gateway.port, f"/?ver=2&token={answer['spice_port']}",
                  subprotocols=["binary"]) as ws:
        ws.send(b"v6")
        assert ws.recv(2) == b"v6"


def test_public_address_wins(gateway_factory, manager, spice_factory):
    gateway = gateway_factory(PublicAddress="vdi.example.org")
    manager.desktop = spice_factory(fakes.echo).address
    _, answer = post_json(LOCAL, gateway.port, "/vdi/desktop", BODY,
                          headers={"Host": "other:1"})
    assert answer["spice_address"] == "vdi.example.org"


def test_plain_port_uses_the_proxys_forwarded_host(gateway_factory, manager, spice_factory):
    plain = free_port()
    gateway_factory(PlainPort=plain)
    spice = spice_factory(fakes.echo)
    manager.desktop = spice.address
    _status, answer = post_json(LOCAL, plain, "/vdi/desktop", BODY, tls=False,
                               headers={"X-Forwarded-Host": "vdi.example.org",
                                        "X-Forwarded-For": "203.0.113.9",
                                        "X-Forwarded-Proto": "https"})
    assert answer["spice_address"] == "vdi.example.org"
    headers = manager.requests[-1][2]
    assert headers["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "https"
    with WsClient(LOCAL, plain, f"/?ver=2&token={answer['spice_port']}", tls=False,
                  subprotocols=["binary"]) as ws:
        ws.send(b"plain")
        assert ws.recv(5) == b"plain"


def test_forwarded_headers_from_the_internet_are_not_trusted_on_tls(gateway, manager):
    post(LOCAL, gateway.port, "/vdi/authmode", {"hwaddress": "x"},
         headers={"X-Forwarded-For": "1.2.3.4", "X-Forwarded-Host": "evil.example"})
    headers = manager.requests[-1][2]
    assert headers["X-Forwarded-For"] == LOCAL
    assert headers["X-Forwarded-Host"] != "evil.example"


def test_hop_by_hop_headers_are_dropped(gateway, manager):
    post(LOCAL, gateway.port, "/vdi/authmode", {"hwaddress": "x"},
         headers={"Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1",
                  "Keep-Alive": "timeout=5", "TE": "trailers", "X-End-To-End": "kept",
                  "Accept-Encoding": "gzip"})
    headers = {k.lower(): v for k, v in manager.requests[-1][2].items()}
    assert "x-secret-hop" not in headers and "keep-alive" not in headers
    assert "te" not in headers
    assert headers["x-end-to-end"] == "kept"
    assert headers.get("accept-encoding", "identity") == "identity"


@pytest.mark.parametrize("path", ["/", "/admin", "/vdi", "/VDI/desktop", "/vdi/../admin",
                                  "/vdi/%2e%2e/admin", "/vdi/%2E%2E/admin", "/vdi%2fdesktop",
                                  "/vdi/..%2fadmin", "/vdi\\desktop", "/api/v1/users",
                                  "//vdi/desktop"])
def test_paths_outside_vdi_are_404_and_never_forwarded(gateway, manager, path):
    answer = raw_request(LOCAL, gateway.port,
                         f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}"
                         .encode())
    assert status_of(answer) == 404
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["status"] == "Error"
    assert manager.requests == []


def test_normalized_path_under_vdi_is_forwarded(gateway, manager):
    answer = raw_request(LOCAL, gateway.port,
                         b"POST /vdi/x/../%61uthmode?a=1 HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 2\r\n\r\n{}")
    assert status_of(answer) == 200
    assert manager.requests[-1][1] == "/vdi/authmode?a=1"


def test_keep_alive_serves_several_requests_on_one_connection(gateway, manager):
    import http.client

    from wsclient import client_context
    connection = http.client.HTTPSConnection(LOCAL, gateway.port, context=client_context(),
                                             timeout=10)
    try:
        for i in range(5):
            connection.request("POST", "/vdi/authmode", json.dumps({"hwaddress": str(i)}),
                               {"Content-Type": "application/x-www-form-urlencoded"})
            response = connection.getresponse()
            assert json.loads(response.read())["status"] == "OK"
        assert len(manager.requests) == 5
    finally:
        connection.close()


def test_body_over_one_mib_is_413(gateway, manager):
    sock_answer = raw_request(LOCAL, gateway.port,
                              b"POST /vdi/desktop HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 2000000\r\n\r\n")
    assert status_of(sock_answer) == 413
    assert manager.requests == []


def test_chunked_body_is_forwarded(gateway, manager):
    answer = raw_request(LOCAL, gateway.port,
                         b"POST /vdi/authmode HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n"
                         b"5\r\n{\"hwa\r\n12\r\nddress\": \"chunky\"}\r\n0\r\n\r\n")
    assert status_of(answer) == 200
    assert json.loads(manager.requests[-1][3]) == {"hwaddress": "chunky"}


def test_no_secret_reaches_the_log(gateway, manager, spice_factory):
    spice = spice_factory(fakes.echo)
    answer = gateway.desktop_token(manager, spice, headers={
        "Cookie": "flexvdi=cookie-secret-value", "Authorization": "Basic c2VjcmV0"})
    token = answer["spice_port"]
    with WsClient(LOCAL, gateway.port, f"/?ver=2&token={token}", subprotocols=["binary"],
                  extra_headers=[(b"Cookie", b"answer=" + json.dumps(answer).encode())]) as ws:
        ws.send(b"x")
        ws.recv(1)
        ws.close()
        ws.wait_close()
    for _ in range(3):
        try:
            WsClient(LOCAL, gateway.port, f"/?ver=2&token={token[:-1]}X",
                     subprotocols=["binary"])
        except Exception:
            pass
    wait_for(lambda: "tunnel ended" in gateway.log_text(), 5, message="tunnel end line")
    text = gateway.log_text()
    for secret in ("alice-secret-pw", manager.spice_password, "cookie-secret-value",
                   "c2VjcmV0", token, token[:-1]):
        assert secret not in text


def test_client_text_is_escaped_in_the_log(gateway, manager):
    raw_request(LOCAL, gateway.port, b"GET /\x1b[31mred HTTP/1.1\r\nHost: x\r\n\r\n")
    raw_request(LOCAL, gateway.port, b"POST /admin\x07 HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: "refused" in gateway.log_text(), 5, message="refusal line")
    assert "\x1b" not in gateway.log_text() and "\x07" not in gateway.log_text()


def test_port_in_use_at_start_is_one_clear_line(manager, tmp_path):
    import subprocess
    import sys
    blocker = socket.socket()
    blocker.bind((LOCAL, 0))
    blocker.listen()
    config = tmp_path / "busy.conf"
    config.write_text(json.dumps({"ManagerIP": manager.address, "ListenIP": LOCAL,
                                  "SslPort": blocker.getsockname()[1],
                                  "CertFile": str(tmp_path / "cert.pem"),
                                  "KeyFile": str(tmp_path / "cert.pem")}))
    try:
        done = subprocess.run([sys.executable, "-m", "flexvdi_gateway", "-c", str(config),
                               "--stderr"], capture_output=True, text=True, timeout=30,
                              cwd=ROOT)
    finally:
        blocker.close()
    assert done.returncode != 0
    assert "cannot listen" in done.stderr and "Traceback" not in done.stderr
    assert "created a self-signed certificate" in done.stderr
