"""A real OpenLDAP ``slapd`` for the tests, on loopback ports, in a temp dir.

Pure helper: no pytest in here.  Typical use::

    with Slapd(tmp_path, {"MANAGER_A": "127.0.0.1:8443", "MANAGER_B": None}) as d:
        ...  # d.host, d.port, d.ldaps_port, d.people_dn, d.search_count(), ...

The directory tree comes from ``tests/data/directory.ldif`` (see the comment at
its top).  The fixture never touches ``/etc/ldap`` except to read the stock
schema files (core, cosine, inetorgperson) that the ``slapd`` package ships.
"""

from __future__ import annotations

import atexit
import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
LDAPSEARCH = "/usr/bin/ldapsearch"
OPENSSL = "openssl"
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")

#: The standard attribute (Directory String syntax) that holds each user's
#: manager address ("host" or "host:port") in tests/data/directory.ldif.
MANAGER_ATTRIBUTE = "description"

TEMPLATE = Path(__file__).resolve().parent / "data" / "directory.ldif"
BASE_DN = "dc=example,dc=test"
PEOPLE_DN = "ou=people," + BASE_DN
BIND_DN = "cn=gateway," + BASE_DN
BIND_PASSWORD = "gw-secret"

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

_PLACEHOLDER = re.compile(r"@([A-Za-z0-9_]+)@")
# A stats line of slapd, written when a search request has been parsed and
# before the database runs it, e.g.
#   ... conn=1001 op=1 SRCH base="ou=people,dc=example,dc=test" scope=1 ...
_SRCH = re.compile(r' SRCH base="(.*?)" scope=\d')

_running: weakref.WeakSet[Slapd] = weakref.WeakSet()


def available() -> bool:
    """Whether everything this helper runs is installed."""
    return (
        all(os.access(p, os.X_OK) for p in (SLAPD, SLAPADD, LDAPSEARCH))
        and shutil.which(OPENSSL) is not None
        and (SCHEMA_DIR / "inetorgperson.ldif").is_file()
    )


def _free_ports(n: int) -> list[int]:
    """n distinct loopback ports that were free a moment ago."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _can_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _ldif_line(attr: str, value: str) -> str:
    """One LDIF attribute line, base64 when the value is not a SAFE-STRING."""
    safe = (
        value.isascii()
        and not any(c in value for c in "\0\r\n")
        and not value.startswith((" ", ":", "<"))
        and not value.endswith(" ")
    )
    if safe:
        return f"{attr}: {value}"
    return f"{attr}:: {base64.b64encode(value.encode('utf-8')).decode('ascii')}"


def render_ldif(template: str, substitutions: dict[str, str | None]) -> str:
    """Fill the ``@NAME@`` placeholders of the directory template.

    Keys may be given as ``"MANAGER_A"`` or ``"@MANAGER_A@"``.  A value of
    ``None`` drops the attribute line holding the placeholder (that user then
    has no manager attribute).  Every placeholder must be given, and every key
    must be used, so a typo fails loudly.  An empty string is refused: the
    attribute's syntax does not allow empty values (slapadd would reject it).
    """
    subs: dict[str, str | None] = {}
    for key, value in substitutions.items():
        name = key[1:-1] if len(key) > 2 and key[0] == key[-1] == "@" else key
        if value is not None:
            if not isinstance(value, str):
                raise TypeError(f"substitution {name}: expected str or None")
            if value == "" or "\n" in value or "\r" in value or "\0" in value:
                raise ValueError(
                    f"substitution {name}: empty or multi-line values are not "
                    "valid here (use None to leave the attribute out)"
                )
        subs[name] = value
    used: set[str] = set()
    out: list[str] = []
    for line in template.splitlines():
        names = _PLACEHOLDER.findall(line)
        if not names or line.startswith("#"):
            out.append(line)
            continue
        missing = [n for n in names if n not in subs]
        if missing:
            raise ValueError(f"no substitution given for {', '.join(missing)}")
        used.update(names)
        attr, sep, value = line.partition(": ")
        if not sep or ":" in attr:
            raise ValueError(f"placeholder outside a plain attribute line: {line!r}")
        if any(subs[n] is None for n in names):
            continue
        value = _PLACEHOLDER.sub(lambda m: subs[m.group(1)], value)
        out.append(_ldif_line(attr, value))
    unused = set(subs) - used
    if unused:
        raise ValueError(f"unknown substitutions: {', '.join(sorted(unused))}")
    return "\n".join(out) + "\n"


class Slapd:
    """One slapd process serving tests/data/directory.ldif on 127.0.0.1.

    Search counting: :meth:`search_count` parses slapd's own ``stats`` log
    (slapd runs with ``-d stats``, its stderr goes to ``slapd.log``).  slapd
    writes one ``SRCH base="..."`` line per search request once it has parsed
    it and before the database runs it, so by the time a client has the answer
    the line is in the file (stderr is unbuffered).  Only searches whose base
    is ``dc=example,dc=test`` or below are counted: the readiness probe's
    root-DSE reads and the root-DSE/``cn=Subschema`` reads some clients (ldap3
    with its default ``get_info``) make on connecting are not user lookups and
    would make counts depend on the client library.  This was preferred over
    the monitor backend (``cn=Search,cn=Operations,cn=Monitor``), whose
    ``monitorOpCompleted`` counts every search on any base, including the
    probes, the client's schema reads and the monitor reads themselves.
    The count is cumulative over the object's life (restarts included), and
    it counts searches the directory received and ran, whatever their result.
    """

    host = "127.0.0.1"
    base_dn = BASE_DN
    people_dn = PEOPLE_DN
    bind_dn = BIND_DN
    bind_password = BIND_PASSWORD

    def __init__(self, tmpdir, substitutions: dict[str, str | None], tls: bool = True):
        self.dir = Path(tmpdir)
        self.tls = tls
        self._ldif = render_ldif(TEMPLATE.read_text(encoding="utf-8"), dict(substitutions))
        self.port: int | None = None
        self.ldaps_port: int | None = None
        self.config_dir = self.dir / "slapd.d"
        self.db_dir = self.dir / "db"
        self.log_path = self.dir / "slapd.log"
        self._tls_dir = self.dir / "tls"
        self.cert_file: str | None = None  # CA certificate (for LDAPCAFile)
        self._proc: subprocess.Popen | None = None
        self._prepared = False
        self._count_lock = threading.Lock()
        self._count_offset = 0
        self._count = 0

    # -- public ---------------------------------------------------------------

    @property
    def uri(self) -> str:
        return f"ldap://{self.host}:{self.port}"

    @property
    def ldaps_uri(self) -> str | None:
        return f"ldaps://{self.host}:{self.ldaps_port}" if self.tls else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running else None

    def pause(self) -> None:
        """Freeze slapd (SIGSTOP): connections are still accepted by the kernel
        but nothing is answered, like a directory that is far too slow."""
        if self.running:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT)."""
        if self.running:
            self._proc.send_signal(signal.SIGCONT)

    def start(self) -> Slapd:
        """Set everything up (first time only) and start slapd; wait until it answers."""
        if self.running:
            return self
        if not self._prepared:
            self._prepare()
            # A port found free can be taken before slapd binds it: try a
            # couple of fresh ones before giving up.
            for attempt in range(3):
                ports = _free_ports(2)
                self.port = ports[0]
                self.ldaps_port = ports[1] if self.tls else None
                try:
                    self._launch()
                    break
                except RuntimeError as e:
                    if attempt == 2 or "already in use" not in str(e):
                        raise
        else:
            self._launch()
        return self

    def stop(self) -> None:
        """Stop slapd (SIGTERM, then SIGKILL after STOP_TIMEOUT); always reaps it."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                # Not reaped yet, so the pid is still ours even if it just exited.
                proc.send_signal(signal.SIGCONT)  # in case it was paused
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=STOP_TIMEOUT)
            _running.discard(self)

    def restart(self) -> Slapd:
        """Stop and start again: same ports, same configuration and data."""
        self.stop()
        return self.start()

    def search_count(self, base: str | None = None) -> int:
        """Searches slapd has run on ``base`` (default: the whole test tree) or below.

        With ``base`` given, a fresh count over the whole log is returned for
        that base; without it the running total is updated incrementally.
        """
        if base is not None:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
            return sum(1 for b in _SRCH.findall(text) if _under(b, base))
        with self._count_lock:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(self._count_offset)
                    data = f.read()
            except FileNotFoundError:
                return self._count
            end = data.rfind(b"\n") + 1  # only whole lines
            self._count_offset += end
            text = data[:end].decode("utf-8", errors="replace")
            self._count += sum(1 for b in _SRCH.findall(text) if _under(b, self.base_dn))
            return self._count

    def log_text(self) -> str:
        """slapd's log so far (for assertion messages)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- setup ----------------------------------------------------------------

    def _run(self, args: list[str], what: str, input_text: str | None = None) -> None:
        r = subprocess.run(
            args,
            input=input_text,
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
            env=_env(),
        )
        if r.returncode != 0:
            raise RuntimeError(f"{what} failed ({r.returncode}): {r.stderr.strip()}")

    def _prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for d in (self.config_dir, self.db_dir):
            if d.exists():
                shutil.rmtree(d)
            d.mkdir()
        if self.tls:
            self._make_certificates()
        config = self.dir / "config.ldif"
        config.write_text(self._config_ldif(), encoding="utf-8")
        data = self.dir / "directory.ldif"
        data.write_text(self._ldif, encoding="utf-8")
        self._run(
            [SLAPADD, "-n0", "-F", str(self.config_dir), "-l", str(config)],
            "slapadd (cn=config)",
        )
        self._run(
            [SLAPADD, "-q", "-F", str(self.config_dir), "-b", self.base_dn, "-l", str(data)],
            "slapadd (directory data)",
        )
        self._prepared = True

    def _make_certificates(self) -> None:
        d = self._tls_dir
        d.mkdir(exist_ok=True)
        ca_key, ca_crt = d / "ca.key", d / "ca.pem"
        key, csr, crt = d / "server.key", d / "server.csr", d / "server.pem"
        ext = d / "server.ext"
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        self._run(
            [OPENSSL, "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_crt),
             "-days", "2", "-subj", "/CN=flexvdi-gateway test LDAP CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            "openssl (CA certificate)",
        )
        self._run(
            [OPENSSL, "req", "-new", *ec, "-keyout", str(key), "-out", str(csr),
             "-subj", "/CN=127.0.0.1"],
            "openssl (server request)",
        )
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid\n",
            encoding="ascii",
        )
        self._run(
            [OPENSSL, "x509", "-req", "-in", str(csr), "-CA", str(ca_crt),
             "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
             "-extfile", str(ext), "-out", str(crt)],
            "openssl (server certificate)",
        )
        self.cert_file = str(ca_crt)
        self._server_cert, self._server_key = crt, key

    def _config_ldif(self) -> str:
        tls = ""
        if self.tls:
            tls = (
                f"olcTLSCACertificateFile: {self.cert_file}\n"
                f"olcTLSCertificateFile: {self._server_cert}\n"
                f"olcTLSCertificateKeyFile: {self._server_key}\n"
            )
        schemas = "".join(
            f"include: file://{SCHEMA_DIR / name}.ldif\n\n"
            for name in ("core", "cosine", "inetorgperson")
        )
        return (
            "dn: cn=config\n"
            "objectClass: olcGlobal\n"
            "cn: config\n"
            f"olcPidFile: {self.dir / 'slapd.pid'}\n"
            f"{tls}"
            "\n"
            "dn: cn=module{0},cn=config\n"
            "objectClass: olcModuleList\n"
            "cn: module{0}\n"
            f"olcModulePath: {MODULE_DIR}\n"
            "olcModuleLoad: back_mdb\n"
            "\n"
            "dn: cn=schema,cn=config\n"
            "objectClass: olcSchemaConfig\n"
            "cn: schema\n"
            "\n"
            f"{schemas}"
            "dn: olcDatabase={-1}frontend,cn=config\n"
            "objectClass: olcDatabaseConfig\n"
            "objectClass: olcFrontendConfig\n"
            "olcDatabase: {-1}frontend\n"
            "\n"
            "dn: olcDatabase={0}config,cn=config\n"
            "objectClass: olcDatabaseConfig\n"
            "olcDatabase: {0}config\n"
            "olcAccess: {0}to * by * none\n"
            "\n"
            "dn: olcDatabase={1}mdb,cn=config\n"
            "objectClass: olcDatabaseConfig\n"
            "objectClass: olcMdbConfig\n"
            "olcDatabase: {1}mdb\n"
            f"olcSuffix: {self.base_dn}\n"
            f"olcDbDirectory: {self.db_dir}\n"
            "olcDbMaxSize: 16777216\n"
            "olcDbNoSync: TRUE\n"
            "olcDbIndex: objectClass eq\n"
            "olcDbIndex: uid eq\n"
            "olcAccess: {0}to attrs=userPassword by anonymous auth by * none\n"
            "olcAccess: {1}to * by * read\n"
        )

    # -- process --------------------------------------------------------------

    def _launch(self) -> None:
        urls = f"ldap://{self.host}:{self.port}/"
        if self.tls:
            urls += f" ldaps://{self.host}:{self.ldaps_port}/"
        # The child keeps its own copy of the log's descriptor.
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [SLAPD, "-h", urls, "-F", str(self.config_dir), "-d", "stats"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=_env(),
            )
        _running.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        ports = [self.port] + ([self.ldaps_port] if self.tls else [])
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"slapd exited with status {self._proc.returncode} while starting:\n"
                    + self.log_text()[-3000:]
                )
            if all(_can_connect(self.host, p) for p in ports) and self._probe():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"slapd did not answer within {START_TIMEOUT:.0f} s:\n"
                    + self.log_text()[-3000:]
                )
            time.sleep(0.02)  # poll interval, not a wait for the server

    def _probe(self) -> bool:
        try:
            r = subprocess.run(
                [LDAPSEARCH, "-x", "-H", self.uri, "-b", "", "-s", "base",
                 "-o", "nettimeout=2", "-l", "2", "1.1"],
                check=False,
                capture_output=True,
                timeout=5,
                env=_env(),
            )
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0


def _under(dn: str, base: str) -> bool:
    """Whether ``dn`` is ``base`` or below it (compared loosely, case-insensitively)."""
    dn = re.sub(r"\s*,\s*", ",", dn.strip()).lower()
    base = re.sub(r"\s*,\s*", ",", base.strip()).lower()
    return dn == base or dn.endswith("," + base)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["LDAPNOINIT"] = "1"  # ignore /etc/ldap/ldap.conf and ~/.ldaprc
    return env


@atexit.register
def _stop_all() -> None:
    for d in list(_running):
        try:
            d.stop()
        except (OSError, subprocess.SubprocessError):
            continue
