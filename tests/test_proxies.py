"""The gateway behind real proxies: nginx ending TLS in front of the gateway's
PlainPort, and HAProxy (`balance source`, TCP pass-through) in front of two gateways.

The proxies run from the very files the README shows (tests/proxies/*.template),
as children of the test, on loopback ports, each in its own temporary directory.
"""

import csv
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading

import fakes
import pytest
import wsclient
from conftest import free_port, make_cert, wait_for
from wsclient import Rejected, WsClient, client_context, post, post_json, pump

LOCAL = "127.0.0.1"
PUBLIC_NAME = "vdi.example.test"
PROXIES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "proxies")
BODY = {"hwaddress": "00:11:22:33:44:55", "username": "alice", "password": "alice-secret-pw",
        "desktop": "win10"}


def find_program(name):
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    return None


NGINX = find_program("nginx")
HAPROXY = find_program("haproxy")
needs_nginx = pytest.mark.skipif(NGINX is None,
                                 reason="nginx not installed (apt-get install nginx)")
needs_haproxy = pytest.mark.skipif(HAPROXY is None,
                                   reason="haproxy not installed (apt-get install haproxy)")

_PLACEHOLDER = re.compile(r"@([A-Z0-9_]+)@")


def render(template_name, values, destination):
    """The template with every @NAME@ replaced; fails on a name it was not given."""
    with open(os.path.join(PROXIES, template_name)) as f:
        text = f.read()

    def substitute(match):
        if match.group(1) not in values:
            raise KeyError(f"{template_name}: no value for @{match.group(1)}@")
        return str(values[match.group(1)])
    with open(destination, "w") as f:
        f.write(_PLACEHOLDER.sub(substitute, text))
    return destination


class ProxyProcess:
    """A proxy in the foreground as our child, in its own process group (so that the
    kill fallback also reaches its workers), with its output in a file."""

    def __init__(self, name, command, port, log_path):
        self.name = name
        self.port = port
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: self._accepts() or self.proc.poll() is not None, 20,
                     message=f"{name} to listen on port {port}")
        except AssertionError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"{name} exited at start ({self.proc.returncode}):\n"
                               + self.log_text())

    def _accepts(self):
        try:
            socket.create_connection((LOCAL, self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def log_text(self):
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)   # our own child's group only
                self.proc.wait(5)
        self._log.close()


# =====================================================================================
# nginx: TLS ends at nginx, the gateway serves its PlainPort
# =====================================================================================

@pytest.fixture
def nginx_front(tmp_path, gateway_factory):
    """(nginx, gateway): nginx on its own TLS port forwarding `location = /` and
    `/vdi/` to the gateway's PlainPort."""
    gateway = gateway_factory(PlainPort=free_port())
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    cert = make_cert(str(prefix / "nginx.pem"), PUBLIC_NAME)
    port = free_port()
    conf = render("nginx.conf.template", {
        "PREFIX": str(prefix),
        # The master runs as root here; its workers must reach the temp dirs in
        # pytest's 0700 directories. As an ordinary user the directive is not needed.
        "USER_DIRECTIVE": "user root;" if os.geteuid() == 0 else "",
        "LISTEN": f"{LOCAL}:{port}",
        "CERT": cert, "KEY": cert,
        "GATEWAY": f"{LOCAL}:{gateway.plain_port}",
    }, str(prefix / "nginx.conf"))
    nginx = ProxyProcess("nginx", [NGINX, "-e", "stderr", "-p", str(prefix) + "/", "-c", conf,
                                   "-g", "daemon off;"],
                         port, str(prefix / "nginx.out"))
    yield nginx, gateway
    nginx.stop()


@needs_nginx
def test_whole_client_flow_through_nginx(nginx_front, manager, spice_factory):
    nginx, gateway = nginx_front
    host_header = f"{PUBLIC_NAME}:{nginx.port}"   # what a client of https://vdi.example.test:N sends
    spice = spice_factory(fakes.echo)
    manager.desktop = spice.address

    status, answer = post_json(LOCAL, nginx.port, "/vdi/authmode", {"hwaddress": "hw-1"},
                               headers={"Host": host_header})
    assert (status, answer) == (200, {"status": "OK", "auth_mode": "active_directory"})
    status, _, raw = post(LOCAL, nginx.port, "/vdi/desktop", BODY,
                          headers={"Host": host_header})
    answer = json.loads(raw)
    assert status == 200 and answer["status"] == "OK", answer
    # The name the client used at nginx, without nginx's port (clients add the port
    # they used themselves: wss://<spice_address>:<that port>/).
    assert answer["spice_address"] == PUBLIC_NAME
    assert answer["use_ws"] is True
    assert answer["spice_password"] == manager.spice_password
    assert answer["title"] == "Desktop of alice"
    token = answer["spice_port"]
    assert token != str(spice.port)
    method, path, seen, body = manager.requests[-1]
    assert (method, path, json.loads(body)) == ("POST", "/vdi/desktop", BODY)
    assert seen["X-Forwarded-Proto"] == "https"         # nginx's $scheme, not the plain hop
    assert seen["X-Forwarded-Host"] == host_header
    assert seen["X-Forwarded-For"] == f"{LOCAL}, {LOCAL}"   # client (per nginx), then nginx

    # One channel carrying 4 MiB each way at once through nginx, in frames of at most
    # 64 KiB (nginx relays the gateway's frames as they are).
    size = 4 << 20
    upload = fakes.pattern(size, seed=42)
    digest, _, sizes = pump(LOCAL, nginx.port, f"/?ver=2&token={token}", upload, size,
                            timeout=120)
    assert digest == hashlib.sha256(upload).hexdigest()
    assert max(sizes) <= 65536
    wait_for(lambda: spice.records and spice.records[0]["received"] == size, 30,
             message="desktop to receive all 4 MiB")

    # More channels with the same token: the HTML5 client (subprotocol binary) and the
    # native one (none offered, none answered), each closing with a Close.
    for offered, expected in ((["binary"], "binary"), ([], None)):
        with WsClient(LOCAL, nginx.port, f"/?ver=2&token={token}", subprotocols=offered,
                      host_header=host_header) as ws:
            assert ws.subprotocol == expected
            ws.send(b"through nginx " * 1000)
            assert ws.recv(14000) == b"through nginx " * 1000
            ws.close(1000)
            assert ws.wait_close(10) == 1000
    assert spice.connections == 3
    for record in spice.records:
        assert record["closed"].wait(10), "desktop connection left open"
    wait_for(lambda: gateway.log_text().count("tunnel ended") >= 3, 10,
             message="three tunnel end lines")
    assert gateway.log_text().count("client closed") >= 2
    assert token not in gateway.log_text()


@needs_nginx
def test_nginx_forwards_only_the_websocket_root_and_vdi(nginx_front, manager, spice_factory):
    nginx, _ = nginx_front
    # Anything else is nginx's own 404: the gateway (and the manager) never see it.
    for path in ("/admin", "/api/v1/users", "/vdi", "/index.html"):
        status, headers, _ = post(LOCAL, nginx.port, path, {"x": 1})
        assert status == 404, path
        assert headers.get("server", "").startswith("nginx"), (path, headers)
    # Ways out of /vdi/: whoever refuses them (nginx or the gateway), none is forwarded.
    for path in ("/vdi/../admin", "/vdi/%2e%2e/admin", "/vdi/..%2fadmin", "/vdi/%2E%2E%2Fadmin",
                 "/vdi/..%5cadmin"):
        status, _, _ = post(LOCAL, nginx.port, path, {"x": 1})
        assert status in (400, 404), path
    assert manager.requests == []
    # A WebSocket upgrade elsewhere than "/" does not reach the gateway either.
    spice = spice_factory(fakes.echo)
    manager.desktop = spice.address
    token = post_json(LOCAL, nginx.port, "/vdi/desktop", BODY)[1]["spice_port"]
    with pytest.raises(Rejected) as refused:
        WsClient(LOCAL, nginx.port, f"/ws?ver=2&token={token}", subprotocols=["binary"])
    assert refused.value.status == 404
    assert spice.connections == 0
    # ...and a token nobody issued is refused by the gateway behind nginx, not connected.
    with pytest.raises(Rejected) as refused:
        WsClient(LOCAL, nginx.port, "/?ver=2&token=AAAAAAAAAAAAAAAA", subprotocols=["binary"])
    assert refused.value.status == 403
    assert spice.connections == 0
    # Other /vdi/ paths are the gateway's business: forwarded to the manager.
    status, answer = post_json(LOCAL, nginx.port, "/vdi/other?x=1", {})
    assert status == 200 and answer["echo_path"] == "/vdi/other?x=1"


# =====================================================================================
# HAProxy: two gateways, TCP pass-through (TLS ends at the gateways), balance source
# =====================================================================================

class Balanced:
    def __init__(self, haproxy, gateways, stats_socket):
        self.haproxy = haproxy
        self.port = haproxy.port
        self.gateways = gateways           # {"gateway1": GatewayProcess, "gateway2": ...}
        self.stats_socket = stats_socket

    def server_states(self):
        """{"gateway1": "UP", ...} from HAProxy's own `show stat`."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(self.stats_socket)
            sock.sendall(b"show stat\n")
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {row["svname"]: row["status"] for row in rows
                if row["pxname"] == "flexvdi_gateways" and row["svname"] in self.gateways}

    def serving(self, marker):
        """The names of the gateways whose log holds `marker`."""
        return [name for name, gw in self.gateways.items() if marker in gw.log_text()]


@pytest.fixture
def balanced(gateway_factory):
    """Two gateways (the same fake manager) behind HAProxy `balance source`."""
    gateways = {"gateway1": gateway_factory(), "gateway2": gateway_factory()}
    # A short path: a Unix socket path must fit in 108 bytes.
    workdir = tempfile.mkdtemp(prefix="haproxy-")
    port = free_port()
    stats_socket = os.path.join(workdir, "stats.sock")
    cfg = render("haproxy.cfg.template", {
        "STATS_SOCKET": stats_socket,
        "LISTEN": f"{LOCAL}:{port}",
        "GATEWAY_1": f"{LOCAL}:{gateways['gateway1'].port}",
        "GATEWAY_2": f"{LOCAL}:{gateways['gateway2'].port}",
    }, os.path.join(workdir, "haproxy.cfg"))
    haproxy = None
    try:
        check = subprocess.run([HAPROXY, "-c", "-f", cfg], capture_output=True, text=True,
                               timeout=30, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        haproxy = ProxyProcess("haproxy", [HAPROXY, "-f", cfg, "-db"], port,
                               os.path.join(workdir, "haproxy.out"))
        setup = Balanced(haproxy, gateways, stats_socket)
        wait_for(lambda: set(setup.server_states().values()) == {"UP"}, 20,
                 message="HAProxy to see both gateways UP")
        yield setup
    finally:
        if haproxy is not None:
            haproxy.stop()
        shutil.rmtree(workdir, ignore_errors=True)


_source = threading.local()


@pytest.fixture
def per_thread_source(monkeypatch):
    """Lets each client thread come from its own loopback address (127.0.0.0/8 is all
    local on Linux), the way real clients come from different addresses. WsClient and
    pump open their sockets through wsclient.connect, replaced here."""
    def connect(host, port, tls=True, timeout=10):
        source = getattr(_source, "address", None)
        sock = socket.create_connection((host, port), timeout=timeout,
                                        source_address=(source, 0) if source else None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client_context().wrap_socket(sock) if tls else sock
    monkeypatch.setattr(wsclient, "connect", connect)
    return _source


def post_from(source, port, path, body, host_header):
    connection = http.client.HTTPSConnection(LOCAL, port, timeout=40, context=client_context(),
                                             source_address=(source, 0))
    try:
        connection.request("POST", path, json.dumps(body).encode(),
                           {"Content-Type": "text/json", "Host": host_header})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def desktops_by_user(manager, desktops):
    """The fake manager hands each user their own desktop."""
    def answer(path, body):
        if path != "/vdi/desktop":
            return None
        return 200, [("Content-Type", "application/json")], json.dumps(
            manager.desktop_answer(body) | {"spice_port": str(desktops[body["username"]].port)}
        ).encode()
    manager.answer_override = answer


@needs_haproxy
def test_several_clients_at_once_through_haproxy_balance_source(balanced, manager,
                                                                 spice_factory,
                                                                 per_thread_source):
    clients = 6
    channels = 3
    chunk = 64 << 10
    rounds = 4
    sources = [f"127.0.0.{20 + i}" for i in range(clients)]
    spices = [spice_factory(fakes.echo) for _ in range(clients)]
    desktops_by_user(manager, {f"user{i}": spices[i] for i in range(clients)})
    host_header = f"{PUBLIC_NAME}:{balanced.port}"
    errors = []

    def client(i):
        per_thread_source.address = sources[i]
        try:
            status, answer = post_from(sources[i], balanced.port, "/vdi/authmode",
                                       {"hwaddress": f"hw-{i}"}, host_header)
            assert status == 200 and answer["status"] == "OK", answer
            status, answer = post_from(sources[i], balanced.port, "/vdi/desktop",
                                       dict(BODY, username=f"user{i}"), host_header)
            assert status == 200 and answer["status"] == "OK", answer
            assert answer["spice_address"] == PUBLIC_NAME
            token = answer["spice_port"]
            # The channels open one after the other (as clients do), then all carry
            # data at the same time, each its own.
            sockets = [WsClient(LOCAL, balanced.port, f"/?ver=2&token={token}",
                                subprotocols=["binary"], host_header=host_header, timeout=30)
                       for _ in range(channels)]
            try:
                for round_ in range(rounds):
                    for c, ws in enumerate(sockets):
                        ws.send(fakes.pattern(chunk, seed=i * 1000 + c * 10 + round_))
                    for c, ws in enumerate(sockets):
                        expected = fakes.pattern(chunk, seed=i * 1000 + c * 10 + round_)
                        assert ws.recv(chunk, timeout=60) == expected, (i, c, round_)
                for ws in sockets:
                    ws.close(1000)
                for ws in sockets:
                    assert ws.wait_close(15) == 1000
            finally:
                for ws in sockets:
                    ws.abort()
        except BaseException as exc:
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert errors == []

    # Every client's desktop request and all its tunnels went to one and the same
    # gateway (a token only exists on the gateway that issued it; any tunnel landing
    # on the other one would have been a 403 above), and the clients were spread
    # over both gateways.
    used = set()
    for i, spice in enumerate(spices):
        issued = balanced.serving(f"desktop 127.0.0.1:{spice.port} via token")
        assert len(issued) == 1, (i, issued)
        name = issued[0]
        used.add(name)
        log = balanced.gateways[name].log_text()
        assert log.count(f"tunnel to 127.0.0.1:{spice.port} open") == channels
        for other, gateway in balanced.gateways.items():
            if other != name:
                assert f"127.0.0.1:{spice.port}" not in gateway.log_text()
        assert spice.connections == channels
        assert all(r["received"] == chunk * rounds for r in spice.records)
    assert used == set(balanced.gateways), f"all clients went to {used}"
    assert set(balanced.server_states().values()) == {"UP"}


@needs_haproxy
def test_when_a_gateway_stops_the_balancer_sends_clients_to_the_other(balanced, manager,
                                                                      spice_factory):
    spice = spice_factory(fakes.echo)
    manager.desktop = spice.address
    host_header = f"{PUBLIC_NAME}:{balanced.port}"
    status, answer = post_json(LOCAL, balanced.port, "/vdi/desktop", BODY,
                               headers={"Host": host_header})
    assert status == 200 and answer["spice_address"] == PUBLIC_NAME
    old_token = answer["spice_port"]
    serving = balanced.serving(f"desktop 127.0.0.1:{spice.port} via token")
    assert len(serving) == 1
    first = serving[0]
    other = next(name for name in balanced.gateways if name != first)

    ws = WsClient(LOCAL, balanced.port, f"/?ver=2&token={old_token}",
                  subprotocols=["binary"], host_header=host_header)
    try:
        ws.send(b"before")
        assert ws.recv(6) == b"before"
        # `systemctl restart` of that gateway: its tunnels get Close 1001...
        balanced.gateways[first].stop()
        assert ws.wait_close(10) == 1001
    finally:
        ws.abort()
    assert balanced.gateways[first].proc.returncode == 0

    # ...HAProxy's health check marks it down, the other stays up...
    wait_for(lambda: balanced.server_states() == {first: "DOWN", other: "UP"}, 20,
             message=f"HAProxy to mark {first} DOWN")

    # ...the old token means nothing to the other gateway (tokens live in the memory
    # of the gateway that issued them), so the client asks /vdi/desktop again, and
    # everything now goes to the other gateway.
    with pytest.raises(Rejected) as refused:
        WsClient(LOCAL, balanced.port, f"/?ver=2&token={old_token}", subprotocols=["binary"])
    assert refused.value.status == 403
    status, answer = post_json(LOCAL, balanced.port, "/vdi/desktop", BODY,
                               headers={"Host": host_header})
    assert status == 200 and answer["status"] == "OK", answer
    new_token = answer["spice_port"]
    with WsClient(LOCAL, balanced.port, f"/?ver=2&token={new_token}", subprotocols=["binary"],
                  host_header=host_header) as ws:
        ws.send(b"after")
        assert ws.recv(5) == b"after"
        ws.close(1000)
        assert ws.wait_close(10) == 1000
    wait_for(lambda: "tunnel ended" in balanced.gateways[other].log_text(), 10,
             message=f"{other} to log the tunnel")
    assert f"127.0.0.1:{spice.port}" in balanced.gateways[other].log_text()
