"""Checks of the slapd test fixture itself (tests/slapd.py), not of the gateway."""

import os
import socket
import ssl

import pytest

try:
    from slapd import MANAGER_ATTRIBUTE, SLAPD, Slapd, available, render_ldif
except ImportError:  # tests/ imported as a package
    from tests.slapd import MANAGER_ATTRIBUTE, SLAPD, Slapd, available, render_ldif

ldap3 = pytest.importorskip("ldap3")
escape_filter_chars = pytest.importorskip("ldap3.utils.conv").escape_filter_chars

pytestmark = pytest.mark.skipif(
    not available(),
    reason=f"OpenLDAP server not installed ({SLAPD}, slapadd, ldapsearch, openssl: "
    "apt-get install slapd ldap-utils)",
)

MANAGER_A = "127.0.0.1:1111"
MANAGER_B = "127.0.0.1:2222"
TIMEOUT = 5


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    d = Slapd(tmp_path_factory.mktemp("slapd"), {"MANAGER_A": MANAGER_A, "MANAGER_B": MANAGER_B})
    with d:
        yield d


def connect(d, user=None, password=None, ldaps=False, get_info=ldap3.NONE, tls=None):
    if ldaps:
        tls = tls or ldap3.Tls(validate=ssl.CERT_NONE)
        server = ldap3.Server(d.host, port=d.ldaps_port, use_ssl=True, tls=tls,
                              get_info=get_info, connect_timeout=TIMEOUT)
    else:
        server = ldap3.Server(d.host, port=d.port, get_info=get_info, connect_timeout=TIMEOUT)
    return ldap3.Connection(server, user=user, password=password, receive_timeout=TIMEOUT)


def lookup(conn, base, uid, scope=ldap3.LEVEL):
    assert conn.search(base, f"(uid={escape_filter_chars(uid)})", search_scope=scope,
                       attributes=[MANAGER_ATTRIBUTE, "uid"]) or conn.result["result"] == 0
    return [e for e in conn.response if e.get("type") == "searchResEntry"]


def manager(entry):
    values = entry["attributes"].get(MANAGER_ATTRIBUTE) or []
    return values[0] if values else None


def test_users_and_substituted_managers(directory):
    conn = connect(directory, directory.bind_dn, directory.bind_password)
    assert conn.bind(), conn.result
    try:
        expected = {"alice": MANAGER_A, "bob": MANAGER_B, "carol": None,
                    "émile": MANAGER_B, "zoe": MANAGER_A, "ZOE": MANAGER_A}
        for uid, want in expected.items():
            entries = lookup(conn, directory.people_dn, uid)
            assert len(entries) == 1, uid
            assert manager(entries[0]) == want, uid
        assert lookup(conn, directory.people_dn, "nobody") == []
        assert lookup(conn, directory.people_dn, "*") == []  # escaped: no such uid
    finally:
        conn.unbind()


def test_deep_user_needs_subtree(directory):
    conn = connect(directory)  # anonymous
    assert conn.bind(), conn.result
    try:
        assert lookup(conn, directory.people_dn, "deep", ldap3.LEVEL) == []
        entries = lookup(conn, directory.people_dn, "deep", ldap3.SUBTREE)
        assert [manager(e) for e in entries] == [MANAGER_B]
        assert entries[0]["dn"] == "uid=deep,ou=staff," + directory.people_dn
    finally:
        conn.unbind()


def test_binds(directory):
    good = connect(directory, directory.bind_dn, directory.bind_password)
    assert good.bind(), good.result
    good.unbind()
    bad = connect(directory, directory.bind_dn, "wrong")
    assert not bad.bind()
    assert bad.result["result"] == 49  # invalidCredentials
    bad.unbind()
    # Anonymous binds work; passwords are readable by nobody.
    for user, password in ((None, None), (directory.bind_dn, directory.bind_password)):
        conn = connect(directory, user, password)
        assert conn.bind(), conn.result
        assert conn.search(directory.bind_dn, "(objectClass=*)", ldap3.BASE,
                           attributes=["cn", "userPassword"])
        attributes = conn.response[0]["attributes"]
        assert attributes["cn"] == ["gateway"]
        assert not attributes.get("userPassword")
        conn.unbind()


@pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning")
def test_ldaps_without_and_with_verification(directory):
    conn = connect(directory, directory.bind_dn, directory.bind_password, ldaps=True)
    assert conn.bind(), conn.result
    assert [manager(e) for e in lookup(conn, directory.people_dn, "alice")] == [MANAGER_A]
    conn.unbind()
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=directory.cert_file)
    conn = connect(directory, ldaps=True, tls=tls)
    assert conn.bind(), conn.result
    conn.unbind()
    # And the certificate is really checked: the system CAs do not know it.
    context = ssl.create_default_context()
    raw = socket.create_connection((directory.host, directory.ldaps_port), TIMEOUT)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(raw, server_hostname=directory.host)
    finally:
        raw.close()


def test_search_count_counts_each_search_once(directory):
    # get_info=ALL makes ldap3 read the root DSE and the schema when binding:
    # those are not lookups in the test tree and are not counted.
    conn = connect(directory, directory.bind_dn, directory.bind_password, get_info=ldap3.ALL)
    before = directory.search_count()
    assert conn.bind(), conn.result
    assert directory.search_count() == before
    try:
        for i in range(30):
            uid = ("alice", "nobody", "deep", "émile", "a)(uid=*")[i % 5]
            lookup(conn, directory.people_dn, uid, (ldap3.LEVEL, ldap3.SUBTREE)[i % 2])
            assert directory.search_count() == before + i + 1
        # A search of the root DSE does not count.
        assert conn.search("", "(objectClass=*)", ldap3.BASE)
        assert directory.search_count() == before + 30
        assert directory.search_count(directory.people_dn) >= 30
    finally:
        conn.unbind()


def test_stop_and_restart(tmp_path):
    d = Slapd(tmp_path, {"MANAGER_A": MANAGER_A, "MANAGER_B": None}, tls=False)
    assert d.ldaps_port is None
    with d:
        port, pid = d.port, d.pid
        conn = connect(d)
        assert conn.bind()
        assert [manager(e) for e in lookup(conn, d.people_dn, "bob")] == [None]
        conn.unbind()
        d.stop()
        assert not d.running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone and reaped
        with pytest.raises(OSError):
            socket.create_connection((d.host, port), timeout=TIMEOUT).close()
        count = d.search_count()
        d.restart()
        assert d.running and d.port == port and d.pid != pid
        conn = connect(d)
        assert conn.bind()
        assert [manager(e) for e in lookup(conn, d.people_dn, "alice")] == [MANAGER_A]
        conn.unbind()
        assert d.search_count() == count + 1
        pid = d.pid
    assert not d.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_pause_resume_and_stop_while_paused(tmp_path):
    d = Slapd(tmp_path, {"MANAGER_A": MANAGER_A, "MANAGER_B": MANAGER_B}, tls=False)
    with d:
        conn = ldap3.Connection(
            ldap3.Server(d.host, port=d.port, get_info=ldap3.NONE, connect_timeout=1),
            receive_timeout=1,
        )
        d.pause()
        with pytest.raises(ldap3.core.exceptions.LDAPException):
            conn.bind()  # accepted by the kernel, never answered
        conn.unbind()
        d.resume()
        conn = connect(d)
        assert conn.bind()
        conn.unbind()
        pid = d.pid
        d.pause()
    # Stopping a paused slapd is quick and leaves nothing behind.
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_render_ldif_checks_substitutions():
    template = "dn: x\nl: @A@\ndescription: @B@\n# @C@ in a comment is left alone\n"
    out = render_ldif(template, {"@A@": "é", "B": None})
    assert "l:: w6k=" in out and "description" not in out and "# @C@" in out
    with pytest.raises(ValueError):
        render_ldif(template, {"A": "x"})  # B missing
    with pytest.raises(ValueError):
        render_ldif(template, {"A": "x", "B": "y", "TYPO": "z"})
    with pytest.raises(ValueError):
        render_ldif(template, {"A": "", "B": "y"})
