"""LDAP: one gateway for several platforms, each user sent to the manager the
directory names for them.  End to end against a real OpenLDAP (tests/slapd.py),
two fake managers A and B plus a fallback manager F (ManagerIP).

The directory (tests/data/directory.ldif): alice -> A, bob -> B, carol (no
manager attribute), emile with an accent -> B, Zoe -> A, deep (one level further
down, found by a subtree search only) -> B.

Searches are counted from slapd's own log (Slapd.search_count()), never from
the gateway's word; the count is cumulative, so every test compares before/after.
Run with -s to see the measured counts and latencies.
"""

import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time

import fakes
import pytest
from conftest import wait_for
from wsclient import WsClient, client_context, post_json

try:
    from slapd import MANAGER_ATTRIBUTE, SLAPD, Slapd, available
except ImportError:  # tests/ imported as a package
    from tests.slapd import MANAGER_ATTRIBUTE, SLAPD, Slapd, available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("ldap3")
pytestmark = pytest.mark.skipif(
    not available(),
    reason=f"OpenLDAP server not installed ({SLAPD}, slapadd, ldapsearch, openssl: "
    "apt-get install slapd ldap-utils)",
)

LOCAL = "127.0.0.1"
HW = "00:11:22:33:44:55"
USER_PASSWORD = "User-Pa55word-never-logged"
BIND_PASSWORD_IN_LOG = "gw-secret"   # the slapd fixture's fixed service password
WRONG_BIND_PASSWORD = "Wrong-Bind-Pa55word-xyzzy"
# "A few seconds": LDAPTimeout 1 plus generous slack for a loaded 2-core machine.
HANG_BOUND_S = 12

# slapd's stats line for each search it received, e.g.
#   conn=1003 op=1 SRCH base="ou=people,dc=example,dc=test" scope=1 deref=3 filter="(uid=x)"
_SRCH = re.compile(r' SRCH base="([^"]*)" scope=(\d) deref=\d filter="(.*)"$', re.MULTILINE)


# -------------------------------------------------------------------------------------
# Fixtures and helpers
# -------------------------------------------------------------------------------------

@pytest.fixture
def fallback(certs):
    """Manager F: the ManagerIP the gateway falls back to."""
    server = fakes.FakeManager(certs["manager"], "F")
    yield server
    server.stop()


@pytest.fixture
def directory(tmp_path, manager, manager_b):
    d = Slapd(tmp_path / "slapd",
              {"MANAGER_A": manager.address, "MANAGER_B": manager_b.address})
    d.start()
    yield d
    d.stop()


@pytest.fixture
def platform(manager, manager_b, fallback):
    return Platform(manager, manager_b, fallback)


def ldap_settings(directory, fallback, **overrides):
    settings = {"ManagerIP": fallback.address, "LDAPServer": LOCAL, "LDAPPort": directory.port,
                "LDAPBaseDN": directory.people_dn, "LDAPSearchRDN": "uid",
                "LDAPAttribute": MANAGER_ATTRIBUTE, "LDAPUsername": directory.bind_dn,
                "LDAPPassword": directory.bind_password}
    settings.update(overrides)
    return {k: v for k, v in settings.items() if v is not None}


@pytest.fixture
def ldap_gateway(gateway_factory, directory, fallback):
    """gateway_factory with the LDAP keys pointing at `directory`; a key set to None
    is left out of the configuration."""
    def start(**overrides):
        return gateway_factory(**ldap_settings(directory, fallback, **overrides))
    return start


class Platform:
    """The three fake managers; tells which of them received a request."""

    def __init__(self, a, b, f):
        self.a, self.b, self.f = a, b, f
        self.all = (a, b, f)

    def counts(self):
        return {m.name: len(m.requests) for m in self.all}

    def receivers_since(self, before):
        return sorted(m.name for m in self.all if len(m.requests) > before[m.name])

    def ask(self, gateway, username=None, path="/vdi/desktop", body=None, headers=None):
        """POSTs like a client; returns (answer, names of the managers that received it)."""
        if body is None:
            body = {"hwaddress": HW, "password": USER_PASSWORD, "desktop": "win10"}
            if username is not None:
                body["username"] = username
        before = self.counts()
        status, answer = post_json(LOCAL, gateway.port, path, body, headers=headers)
        assert status == 200, (username, status, answer)
        return answer, self.receivers_since(before)


def searches(directory):
    """(scope, filter) of every search slapd logged on the test tree, in order."""
    return [(int(scope), flt) for base, scope, flt in _SRCH.findall(directory.log_text())
            if base.lower().endswith(directory.base_dn)]


def directory_accepts(directory):
    """Connections slapd has accepted (both ports; the readiness probe included)."""
    return directory.log_text().count(" ACCEPT from ")


def tls_sessions(directory):
    return directory.log_text().count(" TLS established ")


def established_to(port):
    """TCP connections in state ESTABLISHED whose remote end is 127.0.0.1:port."""
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and remote == f"0100007F:{port:04X}":
                count += 1
    return count


def idle_threads(gateway):
    """The gateway's thread count once the start-up probe's connection thread is gone."""
    wait_for(lambda: "connection closed after" in gateway.log_text(), 10,
             message="the start-up probe's connection to end")
    samples = []
    for _ in range(5):
        samples.append(gateway.threads())
        time.sleep(0.02)   # sampling interval
    return min(samples)


def run_threads(targets, timeout):
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "client threads still running"


class TcpForwarder:
    """Forwards 127.0.0.1:<listen_port> to 127.0.0.1:<target_port>.

    With `answers` set, only that many chunks from the server reach the client, the
    rest is swallowed: a directory that answers the bind and then never the search.
    """

    def __init__(self, target_port, listen_port=0, answers=None):
        self.target_port = target_port
        self.answers = answers
        self._stop = threading.Event()
        self._sockets = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOCAL, listen_port))
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection((LOCAL, self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, None),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.answers),
                             daemon=True).start()

    def _pump(self, source, sink, limit):
        forwarded = 0
        try:
            source.settimeout(None)
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if limit is None or forwarded < limit:
                    sink.sendall(data)
                    forwarded += 1
        except OSError:
            pass
        finally:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def stop(self):
        self._stop.set()
        self._listener.close()
        for sock in self._sockets:
            sock.close()
        self._thread.join(5)


# -------------------------------------------------------------------------------------
# Routing
# -------------------------------------------------------------------------------------

def test_each_user_reaches_their_own_manager(ldap_gateway, directory, platform):
    gateway = ldap_gateway()
    expected = [("alice", "A"), ("bob", "B"), ("émile", "B"), ("Zoe", "A"), ("ZOE", "A"),
                ("carol", "F"), ("nobody", "F"), ("deep", "F")]
    for username, manager in expected:
        answer, receivers = platform.ask(gateway, username)
        assert receivers == [manager], username
        assert answer["status"] == "OK" and answer["title"] == "Desktop of " + username
        target = {"A": platform.a, "B": platform.b, "F": platform.f}[manager]
        method, path, _, body = target.requests[-1]
        assert (method, path) == ("POST", "/vdi/desktop")
        assert json.loads(body) == {"hwaddress": HW, "password": USER_PASSWORD,
                                    "desktop": "win10", "username": username}
    log = gateway.log_text()
    assert "user carol: no description attribute; using ManagerIP" in log
    assert "user nobody: no directory entry; using ManagerIP" in log
    assert "user deep: no directory entry; using ManagerIP" in log


def test_desktop_tunnel_works_for_users_of_each_manager(ldap_gateway, platform,
                                                        spice_factory):
    gateway = ldap_gateway()
    for username, manager in (("alice", platform.a), ("bob", platform.b)):
        spice = spice_factory(fakes.greet_then_echo)
        before = platform.counts()
        answer = gateway.desktop_token(manager, spice, body={
            "hwaddress": HW, "username": username, "password": USER_PASSWORD,
            "desktop": "win10"})
        # authmode carries no username: ManagerIP; desktop: the user's manager.
        assert platform.receivers_since(before) == sorted(["F", manager.name])
        assert [r[1] for r in manager.requests[-1:]] == ["/vdi/desktop"]
        assert answer["spice_address"] == LOCAL and answer["use_ws"] is True
        assert answer["spice_password"] == manager.spice_password
        token = answer["spice_port"]
        assert 14 <= len(token) <= 17
        with WsClient(LOCAL, gateway.port, f"/?ver=2&token={token}",
                      subprotocols=["binary"]) as ws:
            greeting = b"hello from %d\n" % spice.port
            assert ws.recv(len(greeting)) == greeting
            ws.send(b"spice bytes of " + username.encode())
            assert ws.recv(15 + len(username)) == b"spice bytes of " + username.encode()
            ws.close()
            ws.wait_close()
        assert spice.connections == 1


@pytest.mark.parametrize("content_type", [
    "text/json", "application/json", "application/x-www-form-urlencoded; charset=UTF-8",
    "text/plain", "multipart/form-data; boundary=x"])
def test_body_is_read_as_json_whatever_the_content_type(ldap_gateway, platform, content_type):
    gateway = ldap_gateway()
    answer, receivers = platform.ask(gateway, "bob", headers={"Content-Type": content_type})
    assert receivers == ["B"] and answer["status"] == "OK"


def test_any_vdi_request_with_a_username_goes_to_that_users_manager(ldap_gateway, platform):
    gateway = ldap_gateway()
    for path in ("/vdi/authmode", "/vdi/desktop", "/vdi/other/call?x=1"):
        _, receivers = platform.ask(gateway, body={"hwaddress": HW, "username": "bob"},
                                    path=path)
        assert receivers == ["B"], path
        assert platform.b.requests[-1][1] == path
    # Another method, and several users on one keep-alive connection: each request
    # is routed on its own.
    connection = http.client.HTTPSConnection(LOCAL, gateway.port, timeout=30,
                                             context=client_context())
    try:
        for method, username, want in (("PUT", "alice", "A"), ("POST", "bob", "B"),
                                       ("POST", None, "F"), ("DELETE", "Zoe", "A")):
            before = platform.counts()
            body = {"hwaddress": HW} if username is None else {"username": username}
            connection.request(method, "/vdi/session", json.dumps(body).encode(),
                               {"Content-Type": "text/json"})
            response = connection.getresponse()
            assert response.status == 200
            assert json.loads(response.read())["manager"] == want
            assert platform.receivers_since(before) == [want], (method, username)
    finally:
        connection.close()


@pytest.mark.parametrize("raw", [
    json.dumps({"hwaddress": HW}),
    json.dumps({"hwaddress": HW, "username": ""}),
    json.dumps({"hwaddress": HW, "username": 42}),
    json.dumps({"hwaddress": HW, "username": None}),
    json.dumps({"hwaddress": HW, "username": ["alice"]}),
    json.dumps({"hwaddress": HW, "user": "alice"}),
    json.dumps({"data": {"username": "alice"}}),
    json.dumps(["alice"]),
    json.dumps("alice"),
    "username=alice&password=x",
    "{not json",
    "",
], ids=["no-username", "empty", "number", "null", "list", "other-key", "nested",
        "array", "string", "form", "broken", "no-body"])
def test_requests_without_a_username_go_to_manager_ip_without_a_search(
        ldap_gateway, directory, platform, raw):
    gateway = ldap_gateway()
    before = directory.search_count()
    accepts = directory_accepts(directory)
    counts = platform.counts()
    connection = http.client.HTTPSConnection(LOCAL, gateway.port, timeout=30,
                                             context=client_context())
    try:
        connection.request("POST", "/vdi/authmode", raw.encode(), {"Content-Type": "text/json"})
        response = connection.getresponse()
        assert response.status == 200
        response.read()
    finally:
        connection.close()
    assert platform.receivers_since(counts) == ["F"]
    assert platform.f.requests[-1][3] == raw.encode()
    assert directory.search_count() == before
    assert directory_accepts(directory) == accepts


@pytest.mark.parametrize("one_shot", [True, False, None], ids=["oneshot", "subtree", "default"])
def test_search_scope_one_level_with_oneshot_subtree_without(ldap_gateway, directory,
                                                             platform, one_shot):
    gateway = ldap_gateway(LDAPOneShot=one_shot)
    deep_manager = "B" if one_shot is False else "F"   # LDAPOneShot defaults to true
    scope = 2 if one_shot is False else 1              # 1 = one level, 2 = subtree
    for username, want in (("alice", "A"), ("deep", deep_manager), ("bob", "B")):
        seen = len(searches(directory))
        _, receivers = platform.ask(gateway, username)
        assert receivers == [want], username
        new = searches(directory)[seen:]
        assert new == [(scope, f"(uid={username})")], new


# -------------------------------------------------------------------------------------
# RFC 4515: the username is searched for, escaped; never another user's entry
# -------------------------------------------------------------------------------------

HOSTILE_NAMES = [
    "*", "al*", "*ice", "a*e", "alice*", "alice)(uid=*", "*)(uid=*", "alice)(|(uid=bob",
    "bob)(!(uid=bob", "*)(description=*", "(uid=alice)", "alice)", "(alice",
    "\\", "\\2a", "\\61lice", "alice\\", "\\29", "alice\x00", "\x00", "alice\x00bob",
    "emile", "Emile", "alicé", "ålice", "bób", "Zoë", "de*p",
]
OWN_NAMES = [("émile", "B"), ("ÉMILE", "B"), ("zoe", "A"), ("ZoE", "A")]
# The directory's own matching rule decides what equals a uid: slapd prepares
# strings as RFC 4518 says (NFKC), so full-width letters are the same uid there.
# The gateway passes the name through unchanged: Zoe's entry or none, never bob's.
DIRECTORY_DECIDES = [("ｚｏｅ", ("A", "F"))]


@pytest.mark.parametrize("variant", [
    {}, {"LDAPOneShot": False}, {"LDAPFallback": False}, {"LDAPCacheSecs": 0}],
    ids=["oneshot", "subtree", "no-fallback", "no-cache"])
def test_filter_injection_never_reaches_another_users_manager(ldap_gateway, directory,
                                                              platform, variant):
    gateway = ldap_gateway(**variant)
    cached = set()
    for username in HOSTILE_NAMES:
        count = directory.search_count()
        seen = len(searches(directory))
        answer, receivers = platform.ask(gateway, username)
        if variant.get("LDAPFallback") is False:
            assert receivers == [], repr(username)
            assert answer["status"] == "Error" and answer["message"], repr(username)
        else:
            assert receivers == ["F"], repr(username)
            assert answer["status"] == "OK"
        if username.lower() in cached and variant.get("LDAPCacheSecs") != 0:
            assert directory.search_count() == count, repr(username)
            continue
        cached.add(username.lower())
        # Searched for (never refused), once, as one escaped equality assertion.
        assert directory.search_count() == count + 1, repr(username)
        new = searches(directory)[seen:]
        assert len(new) == 1, (username, new)
        assert re.fullmatch(r"\(uid=[^()*]*\)", new[0][1]), (username, new)
        if any(c in username for c in "*()\\\x00"):
            assert "\\" in new[0][1], (username, new)
    for username, want in OWN_NAMES:
        _, receivers = platform.ask(gateway, username)
        assert receivers == [want], username
    for username, allowed in DIRECTORY_DECIDES:
        _, receivers = platform.ask(gateway, username)
        assert len(receivers) <= 1 and set(receivers) <= set(allowed), username


@pytest.mark.parametrize("username", ["\ud800", "alice\udcff"])
def test_username_with_a_lone_surrogate_gets_a_json_answer(ldap_gateway, directory, platform,
                                                           username):
    # Valid JSON ("\ud800") that is no valid UTF-8 string: it cannot be in the
    # directory; the client must still get an answer, and it is never another user's.
    gateway = ldap_gateway()
    answer, receivers = platform.ask(gateway, username)
    assert receivers == ["F"]
    assert answer["status"] == "OK"
    # And the gateway still works for everybody afterwards.
    assert platform.ask(gateway, "alice")[1] == ["A"]


# -------------------------------------------------------------------------------------
# No manager for the user, no fallback
# -------------------------------------------------------------------------------------

def test_without_fallback_the_client_gets_a_json_error(ldap_gateway, directory, platform):
    gateway = ldap_gateway(LDAPFallback=False)
    for username, why in (("carol", "no description attribute"),
                          ("nobody", "no directory entry"), ("deep", "no directory entry")):
        answer, receivers = platform.ask(gateway, username)
        assert receivers == []
        assert answer["status"] == "Error"
        assert isinstance(answer["message"], str) and len(answer["message"]) > 10
        assert "Traceback" not in answer["message"] and "{" not in answer["message"]
        line = f"user {username}: {why}; LDAPFallback is off"
        wait_for(lambda line=line: line in gateway.log_text(), 5, message=line)
    # Users with a manager and requests without a username are served as ever.
    assert platform.ask(gateway, "alice")[1] == ["A"]
    assert platform.ask(gateway, "bob")[1] == ["B"]
    assert platform.ask(gateway)[1] == ["F"]


def test_empty_manager_ip_serves_directory_users_only(ldap_gateway, platform):
    gateway = ldap_gateway(ManagerIP="")
    assert platform.ask(gateway, "alice")[1] == ["A"]
    for username in ("carol", "nobody", None):
        answer, receivers = platform.ask(gateway, username)
        assert receivers == [] and answer["status"] == "Error" and answer["message"]


def test_unusable_manager_attribute_values_fall_back(tmp_path, gateway_factory, fallback,
                                                     platform):
    # alice's attribute is a single space (empty once trimmed), bob's no valid address.
    odd = Slapd(tmp_path / "odd", {"MANAGER_A": " ", "MANAGER_B": "127.0.0.1:99999"}, tls=False)
    with odd:
        gateway = gateway_factory(**ldap_settings(odd, fallback))
        for username in ("alice", "bob"):
            assert platform.ask(gateway, username)[1] == ["F"], username
        log = gateway.log_text()
        assert "user alice: empty description attribute; using ManagerIP" in log
        assert "user bob: description is not a manager address" in log
        strict = gateway_factory(**ldap_settings(odd, fallback, LDAPFallback=False))
        for username in ("alice", "bob"):
            answer, receivers = platform.ask(strict, username)
            assert receivers == [] and answer["status"] == "Error"


# -------------------------------------------------------------------------------------
# Cache
# -------------------------------------------------------------------------------------

def test_sequential_requests_make_one_search_and_one_connection(ldap_gateway, directory,
                                                               platform):
    gateway = ldap_gateway()
    counted = {}
    for username, want in (("alice", "A"), ("carol", "F"), ("nobody", "F")):
        before, accepts = directory.search_count(), directory_accepts(directory)
        for _ in range(10):
            assert platform.ask(gateway, username)[1] == [want]
        counted[username] = directory.search_count() - before
        # One search, one directory connection: none while the cache answers.
        assert counted[username] == 1, username
        assert directory_accepts(directory) - accepts == 1, username
    print(f"\n[ldap] 10 sequential requests per user -> searches {counted}")


def test_fifty_simultaneous_first_requests_make_one_search(ldap_gateway, directory, platform):
    gateway = ldap_gateway(LDAPTimeout=30)
    before = directory.search_count()
    base_threads = idle_threads(gateway)
    answers = []

    def one():
        answers.append(platform.ask(gateway, "bob")[0]["status"])

    counts = platform.counts()
    # The directory is frozen while the 50 requests arrive, so they all miss the
    # cache at once: the first one's search is still pending when the others come.
    directory.pause()
    try:
        runner = threading.Thread(target=run_threads, args=([one] * 50, 90), daemon=True)
        runner.start()
        wait_for(lambda: gateway.threads() >= base_threads + 50, 60,
                 message="50 connections inside the gateway")
        wait_for(lambda: established_to(directory.port) >= 1, 30,
                 message="the gateway's directory connection")
        time.sleep(1.0)   # let every request reach its lookup (a margin, not a server wait)
        connections_while_frozen = established_to(directory.port)
    finally:
        directory.resume()
    runner.join(90)
    assert not runner.is_alive()
    assert answers == ["OK"] * 50
    assert len(platform.b.requests) - counts["B"] == 50
    assert platform.receivers_since(counts) == ["B"]
    searched = directory.search_count() - before
    print(f"\n[ldap] 50 simultaneous first requests for bob -> {searched} search(es), "
          f"{connections_while_frozen} directory connection(s) while they waited")
    assert connections_while_frozen == 1
    assert searched == 1
    # Then 50 more at once are all answered by the cache.
    before = directory.search_count()
    answers.clear()
    run_threads([one] * 50, 90)
    assert answers == ["OK"] * 50
    assert directory.search_count() == before


def test_cache_secs_zero_searches_every_time(ldap_gateway, directory, platform):
    gateway = ldap_gateway(LDAPCacheSecs=0)
    before, accepts = directory.search_count(), directory_accepts(directory)
    for _ in range(5):
        assert platform.ask(gateway, "alice")[1] == ["A"]
        assert platform.ask(gateway, "carol")[1] == ["F"]
    searched = directory.search_count() - before
    print(f"\n[ldap] LDAPCacheSecs 0, 10 requests -> {searched} searches")
    assert searched == 10
    assert directory_accepts(directory) - accepts == 10


def test_cache_entry_expires_after_cache_secs_and_a_hit_does_not_extend_it(
        ldap_gateway, directory, platform):
    ttl = 2.5   # fractions are allowed
    gateway = ldap_gateway(LDAPCacheSecs=ttl)
    before = directory.search_count()
    assert platform.ask(gateway, "alice")[1] == ["A"]
    assert platform.ask(gateway, "carol")[1] == ["F"]
    first = time.monotonic()   # both searches ran before this instant
    assert directory.search_count() == before + 2
    time.sleep(1.0)            # letting the cache age, not waiting for a server
    assert platform.ask(gateway, "alice")[1] == ["A"]    # a hit ...
    assert platform.ask(gateway, "carol")[1] == ["F"]
    assert directory.search_count() == before + 2
    # ... that does not extend the entry: it expires ttl after the search.
    time.sleep(max(0.0, first + ttl + 0.3 - time.monotonic()))
    assert platform.ask(gateway, "alice")[1] == ["A"]
    assert platform.ask(gateway, "carol")[1] == ["F"]
    assert directory.search_count() == before + 4
    assert platform.ask(gateway, "alice")[1] == ["A"]
    assert directory.search_count() == before + 4


def test_cache_expiry_with_one_second(ldap_gateway, directory, platform):
    gateway = ldap_gateway(LDAPCacheSecs=1)
    before = directory.search_count()
    assert platform.ask(gateway, "bob")[1] == ["B"]
    assert platform.ask(gateway, "bob")[1] == ["B"]
    assert directory.search_count() == before + 1
    time.sleep(1.3)   # letting the entry expire
    assert platform.ask(gateway, "bob")[1] == ["B"]
    assert directory.search_count() == before + 2


def test_usernames_differing_only_in_case_share_one_entry(ldap_gateway, directory, platform):
    gateway = ldap_gateway()
    for names, want in ((("Zoe", "zoe", "ZOE", "zOE"), "A"), (("émile", "ÉMILE", "Émile"), "B"),
                        (("Carol", "CAROL", "carol"), "F")):
        before = directory.search_count()
        for username in names:
            assert platform.ask(gateway, username)[1] == [want], username
        assert directory.search_count() == before + 1, names


def test_cache_is_bounded(directory, manager, monkeypatch):
    # 100,000 entries end to end would take minutes: the bound is checked in-process,
    # lowered, against the same real directory.
    sys.path.insert(0, ROOT)
    import flexvdi_gateway as gw
    monkeypatch.setattr(gw, "LDAP_CACHE_MAX", 20)
    config = gw.config_from_dict({
        "LDAPServer": LOCAL, "LDAPPort": directory.port, "LDAPBaseDN": directory.people_dn,
        "LDAPSearchRDN": "uid", "LDAPAttribute": MANAGER_ATTRIBUTE,
        "LDAPUsername": directory.bind_dn, "LDAPPassword": directory.bind_password})
    lookups = gw.LdapDirectory(config)
    for i in range(60):
        assert lookups.manager_for(f"nobody{i}") == (None, "no directory entry")
        assert len(lookups._cache) <= 20
    before = directory.search_count()
    assert lookups.manager_for("nobody59") == (None, "no directory entry")   # still cached
    assert directory.search_count() == before
    assert lookups.manager_for("alice") == (manager.address, "directory")
    assert len(lookups._cache) <= 20


# -------------------------------------------------------------------------------------
# Directory failures: never cached, the fallback (or an Error), the log says which
# -------------------------------------------------------------------------------------

def test_directory_stopped_mid_run_falls_back_then_recovers(ldap_gateway, directory,
                                                           platform):
    gateway = ldap_gateway()
    strict = ldap_gateway(LDAPFallback=False)
    assert platform.ask(gateway, "alice")[1] == ["A"]
    assert platform.ask(strict, "alice")[1] == ["A"]
    directory.stop()
    # Cached answers need no directory.
    assert platform.ask(gateway, "alice")[1] == ["A"]
    # Uncached ones fall back, every time (the failure is not cached).
    for _ in range(2):
        answer, receivers = platform.ask(gateway, "bob")
        assert receivers == ["F"] and answer["status"] == "OK"
    answer, receivers = platform.ask(strict, "bob")
    assert receivers == [] and answer["status"] == "Error" and answer["message"]
    failures = [line for line in gateway.log_text().splitlines()
                if "user bob: directory unavailable" in line]
    assert len(failures) == 2, failures
    assert "Connection refused" in failures[0] and "using ManagerIP" in failures[0]
    assert "LDAPFallback is off" in strict.log_text()
    before = directory.search_count()
    directory.restart()
    assert platform.ask(gateway, "bob")[1] == ["B"]
    assert platform.ask(strict, "bob")[1] == ["B"]
    assert directory.search_count() == before + 2


@pytest.mark.parametrize("fallback_on", [True, False], ids=["fallback", "no-fallback"])
def test_hanging_directory_is_given_up_after_the_timeout(ldap_gateway, directory, platform,
                                                         fallback_on):
    gateway = ldap_gateway(LDAPTimeout=1, LDAPFallback=fallback_on)
    assert platform.ask(gateway, "alice")[1] == ["A"]
    directory.pause()   # accepts TCP (the kernel does), never answers
    try:
        started = time.monotonic()
        answer, receivers = platform.ask(gateway, "bob")
        elapsed = time.monotonic() - started
        if fallback_on:
            assert receivers == ["F"] and answer["status"] == "OK"
        else:
            assert receivers == [] and answer["status"] == "Error" and answer["message"]
        print(f"\n[ldap] frozen directory, LDAPTimeout 1: answered in {elapsed:.2f} s")
        assert elapsed < HANG_BOUND_S
        # Cached users and requests without a username do not wait for it.
        assert platform.ask(gateway, "alice")[1] == ["A"]
        assert platform.ask(gateway)[1] == ["F"]
        line = wait_for(lambda: [x for x in gateway.log_text().splitlines()
                                 if "user bob: directory unavailable" in x], 5,
                        message="log line")[0]
        assert "timed out" in line
    finally:
        directory.resume()
    before = directory.search_count()
    assert platform.ask(gateway, "bob")[1] == ["B"]   # the failure was not cached
    assert directory.search_count() == before + 1


def test_simultaneous_requests_during_a_hang_all_fail_over_and_nothing_is_cached(
        ldap_gateway, directory, platform):
    gateway = ldap_gateway(LDAPTimeout=1)
    answers = []

    def one():
        answers.append(platform.ask(gateway, "bob")[0]["status"])

    counts = platform.counts()
    directory.pause()
    try:
        started = time.monotonic()
        run_threads([one] * 10, 60)
        elapsed = time.monotonic() - started
    finally:
        directory.resume()
    assert answers == ["OK"] * 10
    assert platform.receivers_since(counts) == ["F"]
    assert elapsed < HANG_BOUND_S + 10
    before = directory.search_count()
    assert platform.ask(gateway, "bob")[1] == ["B"]
    assert directory.search_count() == before + 1


def test_directory_that_answers_the_bind_but_never_the_search(ldap_gateway, directory,
                                                              platform):
    stall = TcpForwarder(directory.port, answers=1)
    try:
        gateway = ldap_gateway(LDAPPort=stall.port, LDAPTimeout=1)
        started = time.monotonic()
        answer, receivers = platform.ask(gateway, "bob")
        assert time.monotonic() - started < HANG_BOUND_S
        assert receivers == ["F"] and answer["status"] == "OK"
        line = wait_for(lambda: [x for x in gateway.log_text().splitlines()
                                 if "user bob: directory unavailable" in x], 5,
                        message="log line")[0]
        assert "search" in line and "timed out" in line
        # Not cached: asked again next time.
        before = directory.search_count()
        assert platform.ask(gateway, "bob")[1] == ["F"]
        assert directory.search_count() == before + 1
    finally:
        stall.stop()


def test_wrong_bind_password_falls_back_and_says_bind_refused(ldap_gateway, directory,
                                                             platform):
    gateway = ldap_gateway(LDAPPassword=WRONG_BIND_PASSWORD)
    strict = ldap_gateway(LDAPPassword=WRONG_BIND_PASSWORD, LDAPFallback=False)
    binds = directory.log_text().count(' BIND dn="cn=gateway,')
    for _ in range(2):
        answer, receivers = platform.ask(gateway, "alice")
        assert receivers == ["F"] and answer["status"] == "OK"
    answer, receivers = platform.ask(strict, "alice")
    assert receivers == [] and answer["status"] == "Error" and answer["message"]
    # Each request tried to bind again: the refusal is not cached.
    assert directory.log_text().count(' BIND dn="cn=gateway,') - binds >= 3
    lines = [x for x in gateway.log_text().splitlines() if "user alice:" in x]
    assert len(lines) == 2
    assert "bind as cn=gateway,dc=example,dc=test refused: invalidCredentials" in lines[0]
    assert "using ManagerIP" in lines[0]
    for log in (gateway.log_text(), strict.log_text()):
        assert WRONG_BIND_PASSWORD not in log and USER_PASSWORD not in log


def test_fractional_ldap_timeout_works(ldap_gateway, directory, platform):
    # PROTOCOL.md: LDAPTimeout accepts fractions; 2.0 is the same number written
    # as a JSON float.
    for timeout in (1.5, 2.0):
        gateway = ldap_gateway(LDAPTimeout=timeout, LDAPCacheSecs=0)
        assert platform.ask(gateway, "alice")[1] == ["A"], timeout
        check = subprocess.run(
            [sys.executable, "-m", "flexvdi_gateway", "-c", gateway.config_path,
             "--check-config"], check=False, cwd=ROOT, capture_output=True, timeout=60)
        assert check.returncode == 0, (check.stdout + check.stderr).decode("utf-8", "replace")
    gateway = ldap_gateway(LDAPTimeout=0.5, LDAPCacheSecs=0)
    assert platform.ask(gateway, "bob")[1] == ["B"]
    directory.pause()
    try:
        started = time.monotonic()
        assert platform.ask(gateway, "bob")[1] == ["F"]
        assert time.monotonic() - started < HANG_BOUND_S
    finally:
        directory.resume()


# -------------------------------------------------------------------------------------
# Binds, LDAPS, server forms
# -------------------------------------------------------------------------------------

def test_anonymous_bind_when_username_is_empty(ldap_gateway, directory, platform):
    gateway = ldap_gateway(LDAPUsername="", LDAPPassword="")
    anonymous = directory.log_text().count(' BIND dn="" method=128')
    assert platform.ask(gateway, "alice")[1] == ["A"]
    assert platform.ask(gateway, "bob")[1] == ["B"]
    assert platform.ask(gateway, "carol")[1] == ["F"]
    assert directory.log_text().count(' BIND dn="" method=128') - anonymous == 3
    assert ' BIND dn="cn=gateway,' not in directory.log_text()


@pytest.mark.parametrize("form", ["url", "url-case", "usessl", "host-port-usessl",
                                  "ca-file", "ca-file-localhost"])
def test_ldaps(ldap_gateway, directory, platform, form):
    p = directory.ldaps_port
    overrides = {
        "url": {"LDAPServer": f"ldaps://{LOCAL}:{p}", "LDAPPort": None},
        "url-case": {"LDAPServer": f"LDAPS://{LOCAL}:{p}/", "LDAPPort": None},
        "usessl": {"LDAPPort": p, "LDAPUseSSL": True},
        "host-port-usessl": {"LDAPServer": f"{LOCAL}:{p}", "LDAPPort": None,
                             "LDAPUseSSL": True},
        "ca-file": {"LDAPServer": f"ldaps://{LOCAL}:{p}", "LDAPPort": None,
                    "LDAPCAFile": directory.cert_file},
        "ca-file-localhost": {"LDAPServer": f"ldaps://localhost:{p}", "LDAPPort": None,
                              "LDAPCAFile": directory.cert_file},
    }[form]
    gateway = ldap_gateway(**overrides)
    sessions = tls_sessions(directory)
    assert platform.ask(gateway, "alice")[1] == ["A"]
    assert platform.ask(gateway, "bob")[1] == ["B"]
    assert platform.ask(gateway, "carol")[1] == ["F"]
    assert tls_sessions(directory) - sessions == 3


def test_ldaps_certificate_is_checked_only_with_a_ca_file(ldap_gateway, directory, platform,
                                                          certs):
    url = f"ldaps://{LOCAL}:{directory.ldaps_port}"
    wrong_ca = ldap_gateway(LDAPServer=url, LDAPPort=None, LDAPCAFile=certs["manager"])
    assert platform.ask(wrong_ca, "alice")[1] == ["F"]
    assert "certificate verify failed" in wrong_ca.log_text()
    unchecked = ldap_gateway(LDAPServer=url, LDAPPort=None)
    assert platform.ask(unchecked, "alice")[1] == ["A"]
    # LDAPUseSSL against the plain port fails: the gateway really speaks TLS.
    plain = ldap_gateway(LDAPUseSSL=True)
    assert platform.ask(plain, "alice")[1] == ["F"]
    assert "user alice: directory unavailable" in plain.log_text()


def test_frozen_ldaps_directory_is_given_up_after_the_timeout(ldap_gateway, directory,
                                                              platform):
    gateway = ldap_gateway(LDAPServer=f"ldaps://{LOCAL}:{directory.ldaps_port}",
                           LDAPPort=None, LDAPTimeout=1)
    directory.pause()   # the TLS handshake never completes
    try:
        started = time.monotonic()
        assert platform.ask(gateway, "alice")[1] == ["F"]
        assert time.monotonic() - started < HANG_BOUND_S
    finally:
        directory.resume()
    assert platform.ask(gateway, "alice")[1] == ["A"]


@pytest.mark.parametrize("form", ["host-and-port", "host:port", "ldap-url", "ldap-url-slash",
                                  "lower-case-keys"])
def test_plain_ldap_server_forms(gateway_factory, directory, fallback, platform, form):
    settings = ldap_settings(directory, fallback)
    p = directory.port
    if form == "host:port":
        settings.update(LDAPServer=f"{LOCAL}:{p}", LDAPPort=389)
    elif form == "ldap-url":
        settings["LDAPServer"] = f"ldap://{LOCAL}:{p}"
        del settings["LDAPPort"]
    elif form == "ldap-url-slash":
        settings["LDAPServer"] = f"ldap://localhost:{p}/"
        del settings["LDAPPort"]
    elif form == "lower-case-keys":
        # Key names are matched without regard to case (the documentation writes
        # both LDAPServer and LdapServer).
        settings = {("Ldap" + k[4:] if k.startswith("LDAP") else k): v
                    for k, v in settings.items()}
        settings["ldapbasedn"] = settings.pop("LdapBaseDN")
    gateway = gateway_factory(**settings)
    sessions = tls_sessions(directory)
    assert platform.ask(gateway, "alice")[1] == ["A"]
    assert platform.ask(gateway, "bob")[1] == ["B"]
    assert tls_sessions(directory) == sessions


def test_port_636_implies_ldaps(ldap_gateway, directory, platform):
    sys.path.insert(0, ROOT)
    import flexvdi_gateway as gw
    assert gw.parse_ldap_server("dir.example", 636, False) == ("dir.example", 636, True)
    assert gw.parse_ldap_server("dir.example:636", 389, False) == ("dir.example", 636, True)
    assert gw.parse_ldap_server("ldap://dir.example:636", 389, False)[2] is True
    assert gw.parse_ldap_server("ldaps://dir.example", 389, False) == (
        "dir.example", 636, True)
    assert gw.parse_ldap_server("dir.example", 389, False) == ("dir.example", 389, False)
    # End to end when port 636 can be had (root, and nothing else on it): a plain
    # TCP relay from 127.0.0.1:636 to slapd's LDAPS port.
    try:
        relay = TcpForwarder(directory.ldaps_port, listen_port=636)
    except OSError as exc:
        pytest.skip(f"cannot listen on 127.0.0.1:636 ({exc}); parsing checked only")
    try:
        gateway = ldap_gateway(LDAPPort=636)   # no LDAPUseSSL
        sessions = tls_sessions(directory)
        assert platform.ask(gateway, "alice")[1] == ["A"]
        assert tls_sessions(directory) - sessions == 1
    finally:
        relay.stop()


# -------------------------------------------------------------------------------------
# Secrets and cost
# -------------------------------------------------------------------------------------

def test_passwords_never_reach_the_log(ldap_gateway, directory, platform, spice_factory):
    gateway = ldap_gateway()
    spice = spice_factory(fakes.echo)
    gateway.desktop_token(platform.b, spice, body={
        "hwaddress": HW, "username": "bob", "password": USER_PASSWORD, "desktop": "w"})
    for username in ("alice", "carol", "nobody", "*", "alice)(uid=*"):
        platform.ask(gateway, username)
    directory.stop()
    platform.ask(gateway, "zoe")
    directory.restart()
    wrong = ldap_gateway(LDAPPassword=WRONG_BIND_PASSWORD)
    platform.ask(wrong, "alice")
    for gw in (gateway, wrong):
        log = gw.log_text()
        for secret in (BIND_PASSWORD_IN_LOG, WRONG_BIND_PASSWORD, USER_PASSWORD,
                       platform.b.spice_password):
            assert secret not in log
        # --check-config binds to the directory too: it prints no password either.
        check = subprocess.run(
            [sys.executable, "-m", "flexvdi_gateway", "-c", gw.config_path, "--check-config"],
            check=False, cwd=ROOT, capture_output=True, timeout=60)
        output = (check.stdout + check.stderr).decode("utf-8", "replace")
        assert "directory" in output
        for secret in (BIND_PASSWORD_IN_LOG, WRONG_BIND_PASSWORD):
            assert secret not in output


def _median_ms(connection, body, rounds):
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        connection.request("POST", "/vdi/authmode", json.dumps(body).encode(),
                           {"Content-Type": "text/json"})
        response = connection.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["status"] == "OK"
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def test_latency_of_cached_and_uncached_lookups(ldap_gateway, directory, platform):
    rounds = 20
    results = {}
    for label, cache_secs in (("uncached", 0), ("cached", 3600)):
        gateway = ldap_gateway(LDAPCacheSecs=cache_secs)
        connection = http.client.HTTPSConnection(LOCAL, gateway.port, timeout=30,
                                                 context=client_context())
        try:
            _median_ms(connection, {"hwaddress": HW, "username": "alice"}, 3)   # warm up
            baseline = _median_ms(connection, {"hwaddress": HW}, rounds)
            before = directory.search_count()
            median = _median_ms(connection, {"hwaddress": HW, "username": "alice"}, rounds)
            searched = directory.search_count() - before
        finally:
            connection.close()
        results[label] = (median, baseline, searched)
    (uncached, base_u, searched_u), (cached, base_c, searched_c) = (
        results["uncached"], results["cached"])
    print(f"\n[ldap] median of {rounds} requests over one keep-alive connection: "
          f"no username {base_c:.2f} ms / {base_u:.2f} ms; "
          f"cached lookup {cached:.2f} ms (+{cached - base_c:.2f} ms, {searched_c} searches); "
          f"uncached lookup {uncached:.2f} ms (+{uncached - base_u:.2f} ms, "
          f"{searched_u} searches)")
    assert searched_u == rounds and searched_c == 0
    assert cached < 2000 and uncached < 2000   # sanity only; no timing claims
