"""Operating the gateway: --check-config, configuration errors at start, key names,
SIGHUP certificate reload and the self-signed certificate made at first start.

(SIGTERM with tunnels open is tested in test_tunnel.py.)"""

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import fakes
import pytest
from conftest import ROOT, free_port, make_cert, wait_for
from wsclient import WsClient, connect, post_json

try:
    import slapd
except ImportError:  # tests/ imported as a package
    from tests import slapd

LOCAL = "127.0.0.1"
BODY = {"hwaddress": "00:11:22:33:44:55", "username": "alice", "password": "alice-secret-pw",
        "desktop": "win10"}
# Python starts in well under a second; the machine may be busy with other tests.
QUICK_S = 15


def run_gateway(*args, timeout=60):
    """`python3 -m flexvdi_gateway ARGS`, to its end; (result, seconds it took)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flexvdi_gateway", *args], cwd=ROOT,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, check=False)
    return done, time.monotonic() - started


def write_config(path, settings):
    with open(path, "w") as f:
        f.write(settings if isinstance(settings, str) else json.dumps(settings, indent=1))
    return str(path)


def base_settings(manager, certs, **overrides):
    settings = {"ManagerIP": manager.address, "SslPort": free_port(), "ListenIP": LOCAL,
                "CertFile": certs["gateway"], "KeyFile": certs["gateway"],
                "FirstSpicePort": 1024, "LastSpicePort": 65535}
    settings.update(overrides)
    return settings


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


def no_traceback(done):
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr


def check_config_failing(path):
    """`--check-config` on a file that must fail: (result, its output lines, seconds)."""
    done, seconds = run_gateway("-c", path, "--check-config")
    no_traceback(done)
    assert done.returncode != 0, done.stdout
    return done, lines(done.stdout), seconds


def cert_der(pem_path):
    """The DER form of the (first) certificate in a PEM file."""
    with open(pem_path) as f:
        text = f.read()
    block = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.DOTALL)
    assert block, f"no certificate in {pem_path}"
    return ssl.PEM_cert_to_DER_cert(block.group(0))


def presented_der(port):
    """The certificate a new TLS connection to the gateway presents."""
    sock = connect(LOCAL, port, timeout=10)
    try:
        return sock.getpeercert(binary_form=True)
    finally:
        sock.close()


# =====================================================================================
# --check-config
# =====================================================================================

def test_check_config_good(tmp_path, manager, certs):
    settings = base_settings(manager, certs)
    path = write_config(tmp_path / "gw.conf", settings)
    # It only checks: it binds nothing, so it also works while the service runs.
    with socket.create_server((LOCAL, settings["SslPort"])):
        done, seconds = run_gateway("-c", path, "--check-config")
    no_traceback(done)
    assert done.returncode == 0, done.stdout + done.stderr
    out = lines(done.stdout)
    assert [line.split(":")[0:2] for line in out] == [
        ["configuration", " OK"], ["certificate", " OK"], ["manager", " OK"]], out
    assert path in out[0]
    assert certs["gateway"] in out[1]
    assert manager.address in out[2]
    # A real POST /vdi/authmode reached the manager.
    method, target, _, body = manager.requests[-1]
    assert (method, target) == ("POST", "/vdi/authmode")
    assert json.loads(body) == {"hwaddress": "flexvdi-gateway-check"}
    assert seconds < QUICK_S


def test_check_config_invalid_json_names_the_file(tmp_path):
    path = write_config(tmp_path / "gw.conf", '{"ManagerIP": "127.0.0.1",\n "SslPort": 443,}\n')
    _done, out, _ = check_config_failing(path)
    assert len(out) == 1, out
    assert out[0].startswith("configuration: FAIL") and path in out[0]
    assert "JSON" in out[0] and "line 2" in out[0]


def test_check_config_missing_file(tmp_path):
    path = str(tmp_path / "nowhere.conf")
    _done, out, _ = check_config_failing(path)
    assert len(out) == 1 and out[0].startswith("configuration: FAIL") and path in out[0]


@pytest.mark.parametrize("overrides, key", [
    ({"SslPort": "443"}, "SslPort"),
    ({"KeepAlive": "5"}, "KeepAlive"),
    ({"Debug": "yes"}, "Debug"),
    ({"ManagerIP": 10}, "ManagerIP"),
    ({"LDAPPort": 70000}, "LDAPPort"),
    ({"ClientStallTimeout": -1}, "ClientStallTimeout"),
    # LDAPServer needs its companions: the one missing is named.
    ({"LDAPServer": "127.0.0.1", "LDAPSearchRDN": "uid", "LDAPAttribute": "description"},
     "LDAPBaseDN"),
])
def test_check_config_wrong_or_missing_key_is_named(tmp_path, manager, certs, overrides, key):
    path = write_config(tmp_path / "gw.conf", base_settings(manager, certs, **overrides))
    _done, out, _ = check_config_failing(path)
    assert len(out) == 1, out
    assert out[0].startswith("configuration: FAIL")
    assert path in out[0] and f"{key}:" in out[0], out[0]


def test_check_config_manager_down(tmp_path, manager, certs):
    down = f"{LOCAL}:{free_port()}"
    path = write_config(tmp_path / "gw.conf", base_settings(manager, certs, ManagerIP=down))
    _done, out, seconds = check_config_failing(path)
    assert [line.split(":")[0:2] for line in out] == [
        ["configuration", " OK"], ["certificate", " OK"], ["manager", " FAIL"]], out
    assert down in out[2]
    assert seconds < QUICK_S


@pytest.mark.parametrize("mode", ["hang", "text", "garbage"])
def test_check_config_manager_not_answering_json_fails(tmp_path, manager, certs, mode):
    manager.mode = mode
    path = write_config(tmp_path / "gw.conf", base_settings(manager, certs, ManagerTimeout=2))
    _done, out, seconds = check_config_failing(path)
    assert out[-1].startswith("manager: FAIL") and manager.address in out[-1], out
    assert seconds < 2 + QUICK_S


def test_check_config_certificate_and_key_that_do_not_match(tmp_path, manager, certs):
    other = make_cert(str(tmp_path / "other.pem"), "other.test")
    path = write_config(tmp_path / "gw.conf", base_settings(
        manager, certs, CertFile=certs["gateway"] + ".crt", KeyFile=other))
    _done, out, _ = check_config_failing(path)
    assert [line.split(":")[0:2] for line in out] == [
        ["configuration", " OK"], ["certificate", " FAIL"], ["manager", " OK"]], out
    assert certs["gateway"] + ".crt" in out[1] and other in out[1]


def test_check_config_certificate_that_is_not_one(tmp_path, manager, certs):
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    path = write_config(tmp_path / "gw.conf", base_settings(
        manager, certs, CertFile=str(junk), KeyFile=str(junk)))
    done, _ = run_gateway("-c", path, "--check-config")
    no_traceback(done)
    assert done.returncode != 0
    assert any(line.startswith("certificate: FAIL") and str(junk) in line
               for line in lines(done.stdout)), done.stdout


def test_check_config_missing_certificate_will_be_created(tmp_path, manager, certs):
    missing = str(tmp_path / "certs" / "gateway.pem")
    path = write_config(tmp_path / "gw.conf", base_settings(
        manager, certs, CertFile=missing, KeyFile=missing))
    done, _ = run_gateway("-c", path, "--check-config")
    no_traceback(done)
    assert done.returncode == 0, done.stdout
    cert_line = [line for line in lines(done.stdout) if line.startswith("certificate:")]
    assert cert_line[0].startswith("certificate: OK") and missing in cert_line[0]
    assert "self-signed" in cert_line[0]
    assert not os.path.exists(missing), "--check-config must not create anything"


def test_check_config_missing_certificate_that_cannot_be_created_fails(tmp_path, manager,
                                                                       certs):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cert = str(blocker / "flexvdi-agent")
    path = write_config(tmp_path / "gw.conf", base_settings(manager, certs, CertFile=cert,
                                                            KeyFile=cert))
    # The start fails (test_certificate_that_cannot_be_created_stops_the_start)...
    done, _ = run_gateway("-c", path, "--check-config")
    no_traceback(done)
    # ...so the check must not say OK.
    cert_line = [line for line in lines(done.stdout) if line.startswith("certificate:")]
    assert cert_line and cert_line[0].startswith("certificate: FAIL"), done.stdout
    assert cert in cert_line[0]
    assert done.returncode != 0


def test_check_config_without_any_manager_fails(tmp_path, manager, certs):
    # The shipped configuration file has "ManagerIP": "": every /vdi/ request would get
    # an Error answer, so the check an admin runs after installing must say so.
    path = write_config(tmp_path / "gw.conf", base_settings(manager, certs, ManagerIP=""))
    done, _ = run_gateway("-c", path, "--check-config")
    no_traceback(done)
    out = lines(done.stdout)
    manager_line = [line for line in out if line.startswith("manager:")]
    assert manager_line and manager_line[0].startswith("manager: FAIL"), out
    assert "ManagerIP" in manager_line[0]
    assert done.returncode != 0


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    if not slapd.available():
        pytest.skip(f"OpenLDAP server not installed ({slapd.SLAPD}: "
                    "apt-get install slapd ldap-utils)")
    with slapd.Slapd(tmp_path_factory.mktemp("slapd"),
               {"MANAGER_A": "127.0.0.1:1111", "MANAGER_B": "127.0.0.1:2222"}) as d:
        yield d


def ldap_settings(directory, **overrides):
    settings = {"LDAPServer": directory.host, "LDAPPort": directory.port,
                "LDAPUsername": directory.bind_dn, "LDAPPassword": directory.bind_password,
                "LDAPBaseDN": directory.people_dn, "LDAPSearchRDN": "uid",
                "LDAPAttribute": "description", "LDAPTimeout": 3}
    settings.update(overrides)
    return settings


def test_check_config_directory_bind(tmp_path, manager, certs, directory):
    path = write_config(tmp_path / "gw.conf",
                        base_settings(manager, certs, **ldap_settings(directory)))
    done, _ = run_gateway("-c", path, "--check-config")
    no_traceback(done)
    assert done.returncode == 0, done.stdout + done.stderr
    out = lines(done.stdout)
    assert [line.split(":")[0:2] for line in out] == [
        ["configuration", " OK"], ["certificate", " OK"], ["manager", " OK"],
        ["directory", " OK"]], out
    assert directory.bind_dn in out[3]
    assert directory.bind_password not in done.stdout + done.stderr


@pytest.mark.parametrize("fault", ["bind refused", "directory down"])
def test_check_config_directory_failures(tmp_path, manager, certs, directory, fault):
    wrong = "wrong-secret-pw"
    fault_settings = ({"LDAPPassword": wrong} if fault == "bind refused"
                      else {"LDAPPort": free_port()})
    path = write_config(tmp_path / "gw.conf", base_settings(
        manager, certs, **ldap_settings(directory, **fault_settings)))
    done, out, seconds = check_config_failing(path)
    assert out[-1].startswith("directory: FAIL"), out
    assert wrong not in done.stdout + done.stderr
    assert seconds < 3 + QUICK_S


# =====================================================================================
# Configuration errors at start
# =====================================================================================

@pytest.mark.parametrize("overrides, key, words", [
    ({"SslPort": 70000}, "SslPort", "70000"),
    ({"SslPort": 0}, "SslPort", "0"),
    ({"PlainPort": -1}, "PlainPort", "-1"),
    ({"FirstSpicePort": 6000, "LastSpicePort": 5000}, "FirstSpicePort", "5000"),
    ({"KeepAlive": "5"}, "KeepAlive", '"5"'),
    ({"LDAPOneShot": "true"}, "LDAPOneShot", "true or false"),
    ({"TokenTimeout": 0}, "TokenTimeout", "0"),
    ({"ManagerIP": "manager:99999"}, "ManagerIP", "99999"),
    ({"SslPort": 443, "sslport": 8443}, "sslport", "twice"),
])
def test_bad_value_stops_the_start_with_one_clear_line(tmp_path, manager, certs, overrides,
                                                       key, words):
    path = write_config(tmp_path / "gw.conf", base_settings(manager, certs, **overrides))
    done, seconds = run_gateway("-c", path, "--stderr", timeout=60)
    no_traceback(done)
    assert done.returncode != 0
    assert seconds < QUICK_S
    err = lines(done.stderr)
    assert len(err) == 1, err
    assert path in err[0] and f"{key}:" in err[0] and words in err[0], err[0]
    assert done.stdout == ""


@pytest.mark.parametrize("content, words", [
    ('{"ManagerIP": "127.0.0.1", "SslPort": 8443\n', "invalid JSON"),
    ('["ManagerIP", "127.0.0.1"]', "one JSON object"),
    ("", "invalid JSON"),
    (b"\xff\xfe{}", "UTF-8"),
])
def test_unreadable_config_stops_the_start_with_one_clear_line(tmp_path, content, words):
    path = tmp_path / "gw.conf"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    done, seconds = run_gateway("-c", str(path), "--stderr", timeout=60)
    no_traceback(done)
    assert done.returncode != 0
    assert seconds < QUICK_S
    err = lines(done.stderr)
    assert len(err) == 1, err
    assert str(path) in err[0] and words in err[0], err[0]


@pytest.mark.skipif(os.path.exists("/dev/log"),
                    reason="without --stderr the log would go to this machine's syslog")
def test_config_error_without_syslog_is_one_line_too(tmp_path, manager, certs):
    path = write_config(tmp_path / "gw.conf", base_settings(manager, certs, SslPort=70000))
    done, _ = run_gateway("-c", path, timeout=60)
    no_traceback(done)
    assert done.returncode != 0
    err = lines(done.stderr)
    assert len(err) == 1, err
    assert path in err[0] and "SslPort:" in err[0]


def test_missing_config_file_stops_the_start_with_one_clear_line(tmp_path):
    path = str(tmp_path / "no-such.conf")
    done, seconds = run_gateway("-c", path, "--stderr", timeout=60)
    no_traceback(done)
    assert done.returncode != 0
    assert seconds < QUICK_S
    err = lines(done.stderr)
    assert len(err) == 1, err
    assert path in err[0] and "No such file" in err[0], err[0]


def test_unknown_key_is_a_warning_naming_it(gateway_factory, manager, spice_factory):
    gateway = gateway_factory(SpicePortz=6000)
    wait_for(lambda: '"SpicePortz"' in gateway.log_text(), 10, message="the warning")
    line = next(ln for ln in gateway.log_text().splitlines() if "SpicePortz" in ln)
    assert "WARNING" in line and "unknown key" in line and gateway.config_path in line
    token = gateway.desktop_token(manager, spice_factory(fakes.echo))["spice_port"]
    with WsClient(LOCAL, gateway.port, f"/?ver=2&token={token}") as ws:
        ws.send(b"still works")
        assert ws.recv(11) == b"still works"


@pytest.fixture
def spawn(tmp_path):
    """Starts `python3 -m flexvdi_gateway -c CONF --stderr` from a settings dict written
    as given (any key spelling); stops it at teardown."""
    started = []

    def start(settings, port):
        path = write_config(tmp_path / f"gw{len(started)}.conf", settings)
        log = open(tmp_path / f"gw{len(started)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "flexvdi_gateway", "-c", path,
                                 "--stderr"], cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
        started.append((proc, log))

        def accepts():
            try:
                socket.create_connection((LOCAL, port), timeout=0.5).close()
                return True
            except OSError:
                return proc.poll() is not None
        wait_for(accepts, 15, message="gateway to listen")
        assert proc.poll() is None, (tmp_path / f"gw{len(started) - 1}.log").read_text()
        return proc
    yield start
    for proc, log in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()


def test_key_names_ignore_case(spawn, manager, certs, spice_factory, tmp_path):
    port = free_port()
    spawn({"managerip": manager.address, "sslport": port, "LISTENIP": LOCAL,
           "certFile": certs["gateway"], "keyfile": certs["gateway"],
           "firstspiceport": 1024, "LastSpiceport": 65535, "debug": True}, port)
    spice = spice_factory(fakes.echo)
    manager.desktop = spice.address
    status, answer = post_json(LOCAL, port, "/vdi/desktop", BODY)
    assert status == 200 and answer["status"] == "OK", answer
    with WsClient(LOCAL, port, f"/?ver=2&token={answer['spice_port']}") as ws:
        ws.send(b"case")
        assert ws.recv(4) == b"case"
    # The spelling the published documentation also uses: LdapServer. It is taken
    # for LDAPServer (so the directory is checked), not ignored as unknown.
    down = free_port()
    path = write_config(tmp_path / "ldap.conf", {
        "ManagerIP": manager.address, "CertFile": certs["gateway"],
        "KeyFile": certs["gateway"], "LdapServer": LOCAL, "LdapPort": down,
        "LdapBaseDN": "dc=example,dc=test", "ldapsearchrdn": "uid",
        "LdapAttribute": "description", "LDAPTimeout": 2})
    done, _ = run_gateway("-c", path, "--check-config")
    no_traceback(done)
    assert "unknown key" not in done.stderr
    assert any(line.startswith("directory: FAIL") for line in lines(done.stdout)), done.stdout


# =====================================================================================
# Certificates: SIGHUP reload, self-signed at first start
# =====================================================================================

def replace_file(path, source):
    """Replaces `path` atomically with a copy of `source` (as deployment tools do)."""
    tmp = str(path) + ".new"
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)


def test_sighup_reloads_the_certificate_and_keeps_tunnels(tmp_path, gateway_factory, manager,
                                                          spice_factory):
    one = make_cert(str(tmp_path / "one.pem"), "one.test")
    two = make_cert(str(tmp_path / "two.pem"), "two.test")
    live = tmp_path / "live.pem"
    shutil.copyfile(one, live)
    gateway = gateway_factory(CertFile=str(live), KeyFile=str(live))
    assert presented_der(gateway.port) == cert_der(one)

    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    old = WsClient(LOCAL, gateway.port, f"/?ver=2&token={token}", subprotocols=["binary"])
    try:
        old.send(b"before reload")
        assert old.recv(13) == b"before reload"

        replace_file(live, two)
        gateway.signal(signal.SIGHUP)
        wait_for(lambda: presented_der(gateway.port) == cert_der(two), 15,
                 message="new connections to present the new certificate")
        wait_for(lambda: "reloaded certificate" in gateway.log_text(), 5, message="log line")

        # The tunnel opened before carries data both ways as before...
        payload = fakes.pattern(1 << 20, seed=5)
        for offset in range(0, len(payload), 65536):
            old.send(payload[offset:offset + 65536])
            assert old.recv(65536) == payload[offset:offset + 65536]
        # ...and new connections work with the new certificate, the token included.
        with WsClient(LOCAL, gateway.port, f"/?ver=2&token={token}") as new:
            new.send(b"after reload")
            assert new.recv(12) == b"after reload"
        token2 = gateway.desktop_token(manager, spice)["spice_port"]
        with WsClient(LOCAL, gateway.port, f"/?ver=2&token={token2}") as new:
            new.send(b"new token")
            assert new.recv(9) == b"new token"

        # A broken file at the next reload: the gateway keeps the certificate it has.
        live.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        gateway.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed, keeping the old certificate" in gateway.log_text(),
                 15, message="the reload failure in the log")
        assert gateway.proc.poll() is None
        assert presented_der(gateway.port) == cert_der(two)
        old.send(b"still here")
        assert old.recv(10) == b"still here"
        old.close(1000)
        assert old.wait_close(10) == 1000
    finally:
        old.abort()
    assert spice.connections == 3
    assert "Traceback" not in gateway.log_text()


def test_sighup_with_the_certificate_gone_keeps_the_loaded_one(tmp_path, gateway_factory):
    one = make_cert(str(tmp_path / "one.pem"), "one.test")
    live = tmp_path / "live.pem"
    shutil.copyfile(one, live)
    gateway = gateway_factory(CertFile=str(live), KeyFile=str(live))
    # e.g. a deployment tool that removes the old file before it copies the new one
    live.unlink()
    gateway.signal(signal.SIGHUP)
    wait_for(lambda: "reload" in gateway.log_text() or "created" in gateway.log_text(), 15,
             message="the reload in the log")
    assert "reload failed, keeping the old certificate" in gateway.log_text()
    assert presented_der(gateway.port) == cert_der(one)
    assert not live.exists()


def test_missing_certificate_is_created_self_signed(tmp_path, gateway_factory, manager,
                                                    spice_factory):
    cert = tmp_path / "new" / "flexvdi-agent"   # not even the directory exists yet
    gateway = gateway_factory(CertFile=str(cert), KeyFile=str(cert))
    assert f"created a self-signed certificate in {cert}" in gateway.log_text()
    assert cert.is_file()
    assert cert.stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" in cert.read_text()
    assert presented_der(gateway.port) == cert_der(cert)
    token = gateway.desktop_token(manager, spice_factory(fakes.echo))["spice_port"]
    with WsClient(LOCAL, gateway.port, f"/?ver=2&token={token}") as ws:
        ws.send(b"self-signed")
        assert ws.recv(11) == b"self-signed"


def test_missing_certificate_and_separate_key_are_both_created(tmp_path, gateway_factory):
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    gateway = gateway_factory(CertFile=str(cert), KeyFile=str(key))
    assert "PRIVATE KEY" not in cert.read_text()
    assert "PRIVATE KEY" in key.read_text()
    assert key.stat().st_mode & 0o777 == 0o600
    assert presented_der(gateway.port) == cert_der(cert)


def test_certificate_that_cannot_be_created_stops_the_start(tmp_path, manager, certs):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cert = str(blocker / "flexvdi-agent")
    path = write_config(tmp_path / "gw.conf", base_settings(manager, certs, CertFile=cert,
                                                            KeyFile=cert))
    done, seconds = run_gateway("-c", path, "--stderr", timeout=60)
    no_traceback(done)
    assert done.returncode != 0
    assert seconds < QUICK_S + 10
    err = lines(done.stderr)
    assert len(err) == 1, err
    assert cert in err[0] and "cannot" in err[0], err[0]


def test_certificate_key_mismatch_stops_the_start(tmp_path, manager, certs):
    other = make_cert(str(tmp_path / "other.pem"), "other.test")
    path = write_config(tmp_path / "gw.conf", base_settings(
        manager, certs, CertFile=certs["gateway"] + ".crt", KeyFile=other))
    done, seconds = run_gateway("-c", path, "--stderr", timeout=60)
    no_traceback(done)
    assert done.returncode != 0
    assert seconds < QUICK_S
    err = lines(done.stderr)
    assert len(err) == 1, err
    assert certs["gateway"] + ".crt" in err[0], err[0]
