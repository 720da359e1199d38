"""Servers as fixtures: the gateway (a real subprocess), fake managers, fake Spice
servers, and certificates. Everything on loopback; every wait has a deadline."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import fakes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(condition, timeout=10.0, interval=0.02, message="condition"):
    """Polls `condition` until it is truthy; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def make_cert(path, cn="localhost"):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    f"/CN={cn}", "-keyout", path, "-out", path + ".crt"],
                   check=True, capture_output=True, timeout=30)
    with open(path, "ab") as out, open(path + ".crt", "rb") as cert:
        out.write(cert.read())
    return path


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    base = tmp_path_factory.mktemp("certs")
    return {"gateway": make_cert(str(base / "gateway.pem"), "gateway.test"),
            "manager": make_cert(str(base / "manager.pem"), "manager.test")}


@pytest.fixture
def manager(certs):
    server = fakes.FakeManager(certs["manager"], "A")
    yield server
    server.stop()


@pytest.fixture
def manager_b(certs):
    server = fakes.FakeManager(certs["manager"], "B")
    yield server
    server.stop()


@pytest.fixture
def spice_factory():
    servers = []

    def start(behaviour=fakes.echo):
        server = fakes.FakeSpice(behaviour)
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()


def free_port(host="127.0.0.1"):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class GatewayProcess:
    """`python3 -m flexvdi_gateway -c CONF --stderr` with its log in a file."""

    def __init__(self, tmp_path, settings):
        self.host = settings.get("ListenIP") or "127.0.0.1"
        self.config_path = str(tmp_path / "gateway.conf")
        self.log_path = str(tmp_path / "gateway.log")
        self.settings = settings
        with open(self.config_path, "w") as f:
            json.dump(settings, f)
        self.port = settings["SslPort"]
        self.plain_port = settings.get("PlainPort") or None
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flexvdi_gateway", "-c", self.config_path, "--stderr"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        connect_host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host.strip("[]")
        wait_for(lambda: self._accepts(connect_host, self.port) or self.proc.poll() is not None,
                 15, message="gateway to listen")
        if self.proc.poll() is not None:
            raise RuntimeError("gateway exited at start:\n" + self.log_text())

    @staticmethod
    def _accepts(host, port):
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def log_text(self):
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def threads(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
        raise AssertionError("no Threads line")

    def fds(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def desktop_token(self, manager, spice, body=None, **kwargs):
        """Runs authmode + desktop like a client and returns the desktop answer."""
        from wsclient import post_json
        manager.desktop = spice.address
        status, answer = post_json(self.host, self.port, "/vdi/authmode",
                                   {"hwaddress": "00:11:22:33:44:55"}, **kwargs)
        assert status == 200 and answer["status"] == "OK", answer
        status, answer = post_json(self.host, self.port, "/vdi/desktop", body or {
            "hwaddress": "00:11:22:33:44:55", "username": "alice",
            "password": "alice-secret-pw", "desktop": "win10"}, **kwargs)
        assert status == 200 and answer["status"] == "OK", answer
        return answer

    def signal(self, signum):
        self.proc.send_signal(signum)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture
def gateway_factory(tmp_path, certs, manager):
    started = []

    def start(**overrides):
        settings = {"ManagerIP": manager.address, "SslPort": free_port(),
                    "ListenIP": "127.0.0.1", "CertFile": certs["gateway"],
                    "KeyFile": certs["gateway"], "FirstSpicePort": 1024,
                    "LastSpicePort": 65535, "Debug": True}
        settings.update(overrides)
        directory = tmp_path / f"gw{len(started)}"
        directory.mkdir()
        process = GatewayProcess(directory, settings)
        started.append(process)
        return process
    yield start
    for process in started:
        process.stop()


@pytest.fixture
def gateway(gateway_factory):
    return gateway_factory()
