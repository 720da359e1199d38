"""flexVDI Gateway: the single public entry point of a flexVDI platform.

Clients on the internet reach only this process. It
  * forwards their JSON requests under ``/vdi/`` to the flexVDI Manager (or, with
    LDAP configured, to the manager the directory names for the user);
  * rewrites the manager's desktop answer so that the client comes back here with an
    opaque token instead of the desktop's internal address and port;
  * carries each Spice channel of the desktop inside a WebSocket (RFC 6455) to the
    desktop's Spice port on an internal host.
The wire contract is PROTOCOL.md; this module follows it section by section.

Thread model (every thread is named, so ``py-spy dump`` reads like this list):
  MainThread      command line, log handlers; waits for signals on a self-pipe
                  (SIGTERM/SIGINT stop, SIGHUP reloads the certificate).
  listener-tls    accept loop of the TLS port; never reads from a client, so a
  listener-plain  client that connects and says nothing blocks nobody.
  conn-N          one per accepted connection: TLS handshake, HTTP requests with
                  keep-alive, and for a tunnel the client -> desktop relay.
  conn-N-down     the desktop -> client relay of a tunnel.
  conn-N-manager-deadline  a timer per /vdi/ request that cuts a manager off at
                  ManagerTimeout (a socket timeout alone bounds each read only).
A tunnel therefore costs two threads. Both wait in ``select.poll`` and then do a
non-blocking read or write. OpenSSL objects are not thread-safe, so every call on a
tunnel's TLS socket happens under that tunnel's lock, and the lock is never held
while waiting. Everything bound for the client goes through the tunnel's
ClientWriter: a frame once started is finished before any other byte (over TLS an
abandoned write corrupts the next one), control frames go between data frames, and
every wait on the client has a deadline (ClientStallTimeout).

Shared state (tokens, the LDAP cache, the open tunnels, the TLS context) lives in
one ``Gateway`` object, each piece behind its own lock. Everything that belongs to
one connection lives on its thread's stack and in its ``Tunnel``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import dataclasses
import enum
import errno
import fcntl
import hashlib
import http
import http.client
import itertools
import json
import logging
import logging.handlers
import math
import mmap
import os
import re
import secrets
import select
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from typing import Any, Callable, NamedTuple

# Optional packages, each with what it adds:
try:
    # C unmasking from `websockets` (no dependencies of its own): the pure-Python
    # unmask below costs about a CPU second per GiB uploaded (bench/README.md).
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:   # pragma: no cover - the fallback is tested directly
    _apply_mask = None

__version__ = "1.0.0"

log = logging.getLogger("flexvdi_gateway")


# =====================================================================================
# Configuration
# =====================================================================================
#
# One frozen dataclass, built once by load_config(path) and passed down explicitly.
# Each field carries the JSON key admins write and a line saying what it means; the
# README's reference table is generated from the same words.

DEFAULT_CONFIG_PATH = "/etc/flexvdi/flexvdi-gateway.conf"


class ConfigError(Exception):
    """The configuration file is unusable; the message names file, key and fault."""


def _key(name: str, default: Any, doc: str, secret: bool = False) -> Any:
    return dataclasses.field(default=default, repr=not secret,
                             metadata={"key": name, "doc": doc})


@dataclasses.dataclass(frozen=True)
class Config:
    manager_address: str = _key(
        "ManagerIP", "", "the flexVDI Manager, `host` or `host:port` (port 443 if omitted)")
    ssl_port: int = _key("SslPort", 443, "TLS port the clients connect to")
    first_spice_port: int = _key(
        "FirstSpicePort", 5900, "lowest desktop Spice port a tunnel may reach")
    last_spice_port: int = _key(
        "LastSpicePort", 25900, "highest desktop Spice port a tunnel may reach")
    cert_file: str = _key(
        "CertFile", "/etc/ssl/certs/flexvdi-agent",
        "PEM certificate; created self-signed if it does not exist")
    key_file: str = _key(
        "KeyFile", "/etc/ssl/certs/flexvdi-agent", "PEM private key (may be the CertFile)")
    keepalive_s: float = _key(
        "KeepAlive", 0, "seconds between WebSocket Pings to `ver>=2` clients; 0 = off")
    debug: bool = _key("Debug", False, "log per-request and per-tunnel detail")
    listen_ip: str = _key("ListenIP", "", "address to listen on; empty = all addresses")
    plain_port: int = _key(
        "PlainPort", 0, "plain-HTTP port for a TLS-terminating reverse proxy; 0 = off")
    pong_timeout_s: float = _key(
        "PongTimeout", 10, "seconds a Ping may stay unanswered (with silence) before the tunnel closes")
    ldap_server: str = _key(
        "LDAPServer", "", "directory host (or ldap:// / ldaps:// URL); empty = no LDAP")
    ldap_port: int = _key("LDAPPort", 389, "directory port (636 implies LDAPS)")
    ldap_username: str = _key(
        "LDAPUsername", "", "bind DN (or user@domain); empty = anonymous bind")
    ldap_password: str = _key("LDAPPassword", "", "bind password", secret=True)
    ldap_base_dn: str = _key("LDAPBaseDN", "", "where users are searched")
    ldap_search_rdn: str = _key("LDAPSearchRDN", "", "attribute matched against the username, e.g. `uid`")
    ldap_attribute: str = _key("LDAPAttribute", "", "attribute holding the user's manager address")
    ldap_one_shot: bool = _key(
        "LDAPOneShot", True, "search one level below the base (false = whole subtree)")
    ldap_fallback: bool = _key(
        "LDAPFallback", True, "use ManagerIP when the directory has no manager for the user")
    ldap_cache_s: float = _key(
        "LDAPCacheSecs", 3600, "seconds a directory answer is cached; 0 = no cache")
    token_timeout_s: float = _key(
        "TokenTimeout", 300, "seconds a token stays valid with no tunnel open")
    public_address: str = _key(
        "PublicAddress", "", "spice_address handed to clients; empty = the name they used")
    manager_ca_file: str = _key(
        "ManagerCAFile", "", "verify the manager's certificate against this CA file; empty = no check")
    manager_timeout_s: float = _key(
        "ManagerTimeout", 30, "seconds the manager has to answer")
    ldap_use_ssl: bool = _key("LDAPUseSSL", False, "LDAPS (also implied by LDAPPort 636)")
    ldap_ca_file: str = _key(
        "LDAPCAFile", "", "verify the directory's certificate against this CA file; empty = no check")
    ldap_timeout_s: float = _key("LDAPTimeout", 5, "seconds for each directory operation")
    client_stall_timeout_s: float = _key(
        "ClientStallTimeout", 60, "seconds a client may accept no byte the gateway has for it "
        "(data, Pong, Close) before its tunnel ends")

    @property
    def manager(self) -> tuple[str, int] | None:
        return parse_host_port(self.manager_address, 443) if self.manager_address else None

    @property
    def ldap_enabled(self) -> bool:
        return bool(self.ldap_server)


CONFIG_FIELDS = {f.metadata["key"].lower(): f for f in dataclasses.fields(Config)}

# Fields whose value must be a TCP port; 0 is allowed only where it means "off".
_PORT_FIELDS = {"ssl_port": 1, "first_spice_port": 1, "last_spice_port": 1,
                "ldap_port": 1, "plain_port": 0}
_POSITIVE_FIELDS = ("pong_timeout_s", "token_timeout_s", "manager_timeout_s", "ldap_timeout_s",
                    "client_stall_timeout_s")
_NON_NEGATIVE_FIELDS = ("keepalive_s", "ldap_cache_s")


def parse_host_port(text: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 literal -> (host, port)."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host:
            raise ValueError(f"unbalanced brackets in {text!r}")
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected text after ] in {text!r}")
        port_text = rest[1:] if rest else ""
    elif text.count(":") > 1:
        host, port_text = text, ""
    else:
        host, _, port_text = text.partition(":")
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        raise ValueError(f"not a host name: {text!r}")
    if port_text == "" and ":" in text and not text.startswith("[") and text.count(":") == 1:
        raise ValueError(f"empty port in {text!r}")
    if not port_text:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 1..65535 in {text!r}")
    return host, int(port_text)


def parse_ldap_server(text: str, port: int, use_ssl: bool) -> tuple[str, int, bool]:
    """`host`, `host:port`, `ldap://host[:port]` or `ldaps://host[:port]` -> (host, port, ssl)."""
    lowered = text.lower()
    if lowered.startswith("ldaps://"):
        use_ssl, rest, port = True, text[8:], (port if port != 389 else 636)
    elif lowered.startswith("ldap://"):
        rest = text[7:]
    else:
        rest = text
    rest = rest.rstrip("/")
    host, port = parse_host_port(rest, port)
    return host, port, use_ssl or port == 636


def _check_type(name: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"must be true or false, not {json.dumps(value)}")
    elif isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"must be a number, not {json.dumps(value)}")
        if isinstance(default, int) and name.endswith("port") and value != int(value):
            raise ValueError(f"must be a whole number, not {value}")
        if name.endswith("port"):
            value = int(value)
    elif isinstance(default, str) and not isinstance(value, str):
        raise TypeError(f"must be a string, not {json.dumps(value)}")
    return value


def config_from_dict(data: Any, origin: str = "configuration") -> Config:
    """Validate a parsed JSON document; every fault names `origin` and the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: must be one JSON object, not {type(data).__name__}")
    values: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key, value in data.items():
        field = CONFIG_FIELDS.get(key.lower())
        if field is None:
            log.warning("%s: unknown key %s ignored", origin, json.dumps(key))
            continue
        if field.name in values:
            raise ConfigError(f"{origin}: {key}: given twice (also as {seen[field.name]})")
        try:
            values[field.name] = _check_type(field.name, value, field.default)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{origin}: {key}: {exc}") from None
        seen[field.name] = key
    config = Config(**values)

    def fail(field_name: str, problem: str) -> ConfigError:
        key = seen.get(field_name, Config.__dataclass_fields__[field_name].metadata["key"])
        return ConfigError(f"{origin}: {key}: {problem}")

    for name, lowest in _PORT_FIELDS.items():
        port = getattr(config, name)
        if not lowest <= port <= 65535:
            raise fail(name, f"must be a port number {lowest}..65535, not {port}")
    if config.first_spice_port > config.last_spice_port:
        raise fail("first_spice_port", f"{config.first_spice_port} is above LastSpicePort "
                   f"{config.last_spice_port}")
    for name in _POSITIVE_FIELDS:
        if not getattr(config, name) > 0:
            raise fail(name, f"must be more than 0, not {getattr(config, name)}")
    for name in _NON_NEGATIVE_FIELDS:
        if getattr(config, name) < 0:
            raise fail(name, f"must be 0 or more, not {getattr(config, name)}")
    if config.plain_port and config.plain_port == config.ssl_port:
        raise fail("plain_port", "must differ from SslPort")
    for name, check in (("manager_address", lambda v: parse_host_port(v, 443)),
                        ("public_address", lambda v: parse_host_port(v, 443)),
                        ("ldap_server", lambda v: parse_ldap_server(v, config.ldap_port, False))):
        if getattr(config, name):
            try:
                check(getattr(config, name))
            except ValueError as exc:
                raise fail(name, str(exc)) from None
    if config.ldap_enabled:
        for name in ("ldap_base_dn", "ldap_search_rdn", "ldap_attribute"):
            if not getattr(config, name):
                raise fail(name, "must be set when LDAPServer is set")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)*", config.ldap_search_rdn):
            raise fail("ldap_search_rdn", "must be an attribute name such as uid")
    for name in ("manager_ca_file", "ldap_ca_file"):
        path = getattr(config, name)
        if path and not os.path.isfile(path):
            raise fail(name, f"{path} does not exist")
    return config


def load_config(path: str) -> Config:
    """Read and validate the JSON configuration file, once, at start."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: "
                          f"{exc.msg}") from None
    return config_from_dict(data, path)


# =====================================================================================
# Logging
# =====================================================================================
#
# Client text is escaped and shortened before it reaches the log; tokens are shown
# by their first four characters; request headers and bodies never go to the log
# (the HTML5 client's cookie holds the whole desktop answer, password included).

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def printable(text: Any, limit: int = 120) -> str:
    """Client-controlled text made safe for one log line."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("latin-1")
    text = str(text)
    cut = len(text) > limit
    text = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                            else f"\\u{ord(m.group()):04x}", text[:limit])
    return text + ("..." if cut else "")


def token_hint(token: str) -> str:
    """Tokens are secrets: the log shows at most their first 4 characters."""
    return printable(token[:4], 4) + "..."


class RefusalLog:
    """Logs refusals, summarising repeats: one line per reason per window, with a count.

    A token-guessing flood produces a handful of lines, not one per attempt.
    """

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, list[float]] = {}  # reason -> [window start, suppressed]

    def refuse(self, reason: str, detail: str) -> None:
        now = self._clock()
        with self._lock:
            window = self._windows.get(reason)
            if window is not None and now - window[0] < self._window_s:
                window[1] += 1
                return
            suppressed = window[1] if window else 0
            self._windows[reason] = [now, 0]
        if suppressed:
            log.warning("refused %d more: %s (in the last %.0f s)", suppressed, reason,
                        self._window_s)
        log.warning("refused: %s: %s", reason, detail)

    def flush(self) -> None:
        """Reports counts of windows that have ended; called by the accept loop."""
        now = self._clock()
        with self._lock:
            ended = [(r, w[1]) for r, w in self._windows.items() if now - w[0] >= self._window_s]
            for reason, _ in ended:
                del self._windows[reason]
        for reason, count in ended:
            if count:
                log.warning("refused %d more: %s (in the last %.0f s)", count, reason,
                            self._window_s)


# =====================================================================================
# Errors, named by who is at fault, and the one place that maps them to the wire
# =====================================================================================

class GatewayError(Exception):
    """An answer the gateway makes itself. `status` is the HTTP status."""
    status = 500
    closes_connection = True   # after this answer the request stream cannot be trusted
    refusal: str | None = None  # reason for the summarising refusal log, if any

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.message = message       # plain words for the user
        self.detail = detail or message  # for the log (may name internal hosts)


class BadRequest(GatewayError):
    """The client broke HTTP or WebSocket grammar."""
    status = 400
    refusal = "malformed request"


class NotFound(GatewayError):
    """The client asked for something that is not the gateway's to serve."""
    status = 404
    refusal = "not found"


class PayloadTooLarge(GatewayError):
    status = 413
    refusal = "request body too large"


class HeadersTooLarge(GatewayError):
    status = 431
    refusal = "request head too large"


class WrongWebSocketVersion(GatewayError):
    status = 426
    refusal = "unsupported WebSocket version"


class TokenRefused(GatewayError):
    """The client presented a missing, unknown or expired token."""
    status = 403
    refusal = "unknown or expired token"


class DesktopUnavailable(GatewayError):
    """The desktop's Spice port refused or did not answer."""
    status = 502
    closes_connection = True


class ManagerUnavailable(GatewayError):
    """The manager is unreachable, too slow, or did not speak HTTP."""
    status = 200   # see PROTOCOL.md: only a 200 lets every client show the message
    closes_connection = False


class ManagerAnswerRefused(GatewayError):
    """The manager's answer cannot be handed out (e.g. a port outside the range)."""
    status = 200
    closes_connection = False


class NoManagerForUser(GatewayError):
    """The directory names no manager for this user and there is no fallback."""
    status = 200
    closes_connection = False


class DirectoryUnavailable(Exception):
    """The LDAP directory is unreachable, too slow or refused the bind."""


class ClientTimeout(Exception):
    """The client did not send its TLS handshake or request head in time."""


class ClientGone(Exception):
    """The client closed or reset the connection."""


def error_response(error: GatewayError, keep_alive: bool) -> bytes:
    """Every error answer: a JSON body, since the native client parses every answer."""
    body = json.dumps({"status": "Error", "message": error.message}).encode()
    headers = [("Content-Type", "application/json")]
    if isinstance(error, WrongWebSocketVersion):
        headers.append(("Sec-WebSocket-Version", "13"))
    return http_response(error.status, headers, body, keep_alive)


def http_response(status: int, headers: list[tuple[str, str]], body: bytes,
                  keep_alive: bool, reason: str = "") -> bytes:
    reason = reason or _reason_phrase(status)
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


# =====================================================================================
# Listeners
# =====================================================================================

HEAD_TIMEOUT_S = 10          # TLS handshake plus request head, from the connection's start
KEEPALIVE_IDLE_S = 60        # an idle keep-alive connection is closed after this
BODY_TIMEOUT_S = 30          # one read of a request body may take this long
WRITE_TIMEOUT_S = 30         # one HTTP answer must be accepted by the client within this
ACCEPT_BACKOFF_S = 0.25      # pause of the accept loop when out of file descriptors
STOP_TIMEOUT_S = 4.0         # SIGTERM: exit within 5 s, a second left for the exit itself
THREAD_STACK_BYTES = 512 * 1024  # relay threads need little; 2 per tunnel adds up
# Every thread waiting for the GIL wakes up once per switch interval (CPython's
# take_gil). With thousands of tunnels, the default 5 ms made those wake-ups alone
# use both cores: at 4,000 tunnels echoing once a second no echo came back at all.
# Relay threads release the GIL at every system call, so a longer interval only
# bounds a rare long Python stretch. Measured (bench --tests scale): 5 ms failed at
# 4,000 tunnels; 50 ms carried 6,000 with 0.8 cores.
GIL_SWITCH_INTERVAL_S = 0.05


def make_server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.load_cert_chain(cert_file, key_file or None)
    # No TLS 1.3 session tickets. A resumed TLS 1.3 handshake still does the key
    # exchange (psk_dhe_ke), so it saved the gateway nothing (bench --resume: 1.4-1.7
    # ms of CPU per new tunnel, as many as full handshakes), while minting a ticket
    # for every connection cost about 15% of the new-tunnel rate (8 parallel:
    # 450-490/s with one ticket, 530-595/s without). TLS 1.2 resumption is untouched.
    context.num_tickets = 0
    return context


def ensure_certificate(cert_file: str, key_file: str) -> bool:
    """Creates a self-signed certificate (and key) if CertFile does not exist.

    ECDSA P-256: every client the platform supports accepts it, and its handshakes
    cost a fraction of RSA's. Returns True when it created one.
    """
    if os.path.exists(cert_file):
        return False
    key_file = key_file or cert_file
    directory = os.path.dirname(os.path.abspath(cert_file))
    with tempfile.TemporaryDirectory(prefix="flexvdi-cert-") as tmp:
        key_tmp, cert_tmp = os.path.join(tmp, "key.pem"), os.path.join(tmp, "cert.pem")
        command = ["openssl", "req", "-x509", "-newkey", "ec",
                   "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "3650",
                   "-subj", "/CN=" + (socket.gethostname() or "flexvdi-gateway")[:60],
                   "-keyout", key_tmp, "-out", cert_tmp]
        try:
            done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"{cert_file}: does not exist and creating a self-signed "
                              f"certificate failed: cannot run openssl: {exc}") from None
        if done.returncode != 0:
            raise ConfigError(f"{cert_file}: does not exist and creating a self-signed "
                              f"certificate failed: {printable(done.stderr.strip(), 300)}")
        with open(key_tmp, "rb") as f:
            key_pem = f.read()
        with open(cert_tmp, "rb") as f:
            cert_pem = f.read()
    try:
        os.makedirs(directory, exist_ok=True)
        if os.path.abspath(key_file) == os.path.abspath(cert_file):
            _write_private(cert_file, key_pem + cert_pem)
        else:
            _write_private(key_file, key_pem)
            _write_private(cert_file, cert_pem)
    except OSError as exc:
        raise ConfigError(f"{cert_file}: does not exist and cannot be created: "
                          f"{exc.strerror or exc}") from None
    return True


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class Gateway:
    """The state shared by all connections, each piece behind its own lock."""

    def __init__(self, config: Config):
        self.config = config
        self.tokens = TokenRegistry(config.token_timeout_s)
        self.directory = LdapDirectory(config) if config.ldap_enabled else None
        self.refusals = RefusalLog()
        self._tunnels_lock = threading.Lock()
        self._tunnels: set = set()
        self._context_lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self._fd_warned_at = 0.0

    # -- called by main() ------------------------------------------------------------

    def load_tls(self, create: bool = True) -> None:
        """(Re)loads certificate and key; SIGHUP calls this. Old context stays on error."""
        if create and ensure_certificate(self.config.cert_file, self.config.key_file):
            log.warning("created a self-signed certificate in %s", self.config.cert_file)
        try:
            context = make_server_tls_context(self.config.cert_file, self.config.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{self.config.cert_file}: cannot load certificate and key "
                              f"({self.config.key_file}): {exc}") from None
        with self._context_lock:
            self._context = context

    def stop_tunnels(self, timeout_s: float) -> int:
        """Has every tunnel send Close 1001 and waits (at most timeout_s) for them to end.
        Tunnel.stop() does not wait, so thousands of tunnels stop in parallel."""
        with self._tunnels_lock:
            tunnels = list(self._tunnels)
        for tunnel in tunnels:
            tunnel.stop(CloseReason.GOING_AWAY, "gateway stopping")
        deadline = time.monotonic() + timeout_s
        while self.open_tunnels and time.monotonic() < deadline:
            # Polled, not notified: a wake-up per closing tunnel, each waiting for the
            # GIL behind thousands of closing threads, made the stop miss its 5 s.
            time.sleep(0.05)
        return len(tunnels)

    # -- called by connection threads ------------------------------------------------

    @property
    def tls_context(self) -> ssl.SSLContext:
        with self._context_lock:
            assert self._context is not None
            return self._context

    def tunnel_opened(self, tunnel: Tunnel) -> None:
        with self._tunnels_lock:
            self._tunnels.add(tunnel)

    def tunnel_closed(self, tunnel: Tunnel) -> None:
        with self._tunnels_lock:
            self._tunnels.discard(tunnel)

    @property
    def open_tunnels(self) -> int:
        with self._tunnels_lock:
            return len(self._tunnels)

    # -- called by listener threads --------------------------------------------------

    def out_of_descriptors(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._fd_warned_at >= 5:
            self._fd_warned_at = now
            log.error("cannot accept connections: %s; backing off until descriptors "
                      "are free", exc.strerror or exc)


class GatewayServer(socketserver.ThreadingTCPServer):
    """One listening socket; every accepted connection gets its own named thread.

    The TLS handshake happens in that thread (see serve_connection), never in the
    accept loop, so a client that sends half a hello blocks nobody.
    """
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, gateway: Gateway, host: str, port: int, tls: bool):
        self.gateway = gateway
        self.tls = tls
        self._ids = itertools.count(1)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), None, bind_and_activate=False)  # type: ignore[arg-type]
        try:
            if self.address_family == socket.AF_INET6:
                # Dual stack: "::" also takes IPv4 clients.
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def get_request(self):
        try:
            return self.socket.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.gateway.out_of_descriptors(exc)
                time.sleep(ACCEPT_BACKOFF_S)  # back off: the socket stays readable
            raise

    def process_request(self, request, client_address):
        thread = threading.Thread(target=self.process_request_thread,
                                  args=(request, client_address),
                                  name=f"conn-{next(self._ids)}", daemon=True)
        thread.start()

    def finish_request(self, request, client_address):
        serve_connection(self.gateway, request, client_address, self.tls)

    def handle_error(self, request, client_address):
        log.exception("connection from %s: internal error", client_address)

    def service_actions(self):
        self.gateway.refusals.flush()


def listen_addresses(listen_ip: str) -> str:
    """ListenIP "" means every address: IPv6 dual stack where the host has it."""
    if listen_ip:
        return listen_ip.strip("[]")
    return "::" if socket.has_ipv6 and _ipv6_works() else "0.0.0.0"


def _ipv6_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
        return True
    except OSError:
        return False


def open_listeners(gateway: Gateway) -> list[GatewayServer]:
    config = gateway.config
    host = listen_addresses(config.listen_ip)
    servers = []
    try:
        servers.append(GatewayServer(gateway, host, config.ssl_port, tls=True))
        if config.plain_port:
            servers.append(GatewayServer(gateway, host, config.plain_port, tls=False))
    except OSError as exc:
        for server in servers:
            server.server_close()
        raise ConfigError(f"cannot listen on {host}: {exc.strerror or exc}") from None
    return servers


# =====================================================================================
# Request parsing (pure functions over bytes; RFC 9112)
# =====================================================================================

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADER_LINES = 100
MAX_BODY_BYTES = 1024 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/(1\.[01])")
_FIELD_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HOST_VALUE = re.compile(r"[A-Za-z0-9.\-_~%!$&'()*+,;=]*(:[0-9]*)?|\[[0-9A-Fa-f:.]+\](:[0-9]*)?")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-authenticate",
                        "proxy-authorization"))


@dataclasses.dataclass
class Request:
    method: str
    target: str
    version: str                     # "1.1" or "1.0"
    headers: list[tuple[str, str]]   # (lower-cased name, value) in arrival order

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_tokens(self, name: str) -> list[str]:
        """Comma-separated list header, all its lines, lower-cased tokens."""
        return [t.strip().lower() for key, value in self.headers if key == name
                for t in value.split(",") if t.strip()]

    @property
    def is_upgrade(self) -> bool:
        return self.method == "GET" and "websocket" in self.header_tokens("upgrade")

    @property
    def keep_alive(self) -> bool:
        tokens = self.header_tokens("connection")
        if self.version == "1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    @property
    def content_length(self) -> int | None:
        value = self.header("content-length")
        return None if value is None else int(value)

    @property
    def chunked(self) -> bool:
        return self.header("transfer-encoding") is not None


def parse_request_head(head: bytes) -> Request:
    """Parses a request head (without its final empty line) strictly, or raises."""
    if b"\x00" in head:
        raise BadRequest("NUL byte in the request head")
    lines = head.split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        raise BadRequest("bare CR or LF in the request head")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if not match:
        raise BadRequest("malformed request line", "malformed request line: "
                         + printable(lines[0], 80))
    method, target, version = (g.decode("ascii") for g in match.groups())
    if len(lines) - 1 > MAX_HEADER_LINES:
        raise HeadersTooLarge(f"more than {MAX_HEADER_LINES} header lines")
    headers = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise BadRequest("obsolete line folding in a header")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise BadRequest("malformed header line", "malformed header line: "
                             + printable(line, 80))
        value = value.strip(b" \t")
        if _FIELD_VALUE_BAD.search(value):
            raise BadRequest("control character in a header value")
        headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
    request = Request(method, target, version, headers)
    _check_framing(request)
    return request


def _check_framing(request: Request) -> None:
    lengths = [v for k, v in request.headers if k == "content-length"]
    if len(lengths) > 1:
        raise BadRequest("repeated Content-Length")
    if lengths and not (lengths[0].isascii() and lengths[0].isdigit() and len(lengths[0]) < 19):
        raise BadRequest("Content-Length is not a number")
    encodings = request.header_tokens("transfer-encoding")
    if encodings:
        if lengths:
            raise BadRequest("both Content-Length and Transfer-Encoding")
        if encodings != ["chunked"] or request.version == "1.0":
            raise BadRequest("unsupported Transfer-Encoding")
    hosts = [v for k, v in request.headers if k == "host"]
    if len(hosts) > 1:
        raise BadRequest("repeated Host header")
    if request.version == "1.1" and not hosts:
        raise BadRequest("missing Host header")
    if hosts and not _HOST_VALUE.fullmatch(hosts[0]):
        raise BadRequest("malformed Host header")
    if request.method == "CONNECT" or not request.target.startswith("/"):
        raise NotFound("not found", "not an origin-form request target: "
                       + printable(request.target, 80))


def normalize_path(target: str) -> tuple[str, str]:
    """Origin-form target -> (normalized path, query).

    Percent-encoded unreserved characters are decoded and dot segments resolved
    (RFC 3986 sections 2.3 and 5.2.4), so `/vdi/%2e%2e/x` is seen as `/x`. An encoded
    slash or backslash, or a backslash, is refused: servers disagree about them.
    """
    path, _, query = target.partition("?")
    if "#" in path:
        raise BadRequest("fragment in the request target")
    if "\\" in path:
        raise NotFound("not found", "backslash in path")
    out = []
    i = 0
    while i < len(path):
        char = path[i]
        if char == "%":
            hex_digits = path[i + 1:i + 3]
            if len(hex_digits) != 2 or not all(c in "0123456789abcdefABCDEF" for c in hex_digits):
                raise BadRequest("malformed percent-encoding in the path")
            decoded = chr(int(hex_digits, 16))
            if decoded in "/\\":
                raise NotFound("not found", "encoded slash or backslash in path")
            out.append(decoded if decoded in _UNRESERVED else "%" + hex_digits.upper())
            i += 3
        else:
            out.append(char)
            i += 1
    return remove_dot_segments("".join(out)), query


def remove_dot_segments(path: str) -> str:
    segments = path.split("/")[1:]
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    result = "/" + "/".join(out)
    if segments and segments[-1] in (".", "..") and not result.endswith("/"):
        result += "/"
    return result


def vdi_target(target: str) -> str:
    """The target to forward to the manager, or NotFound if it is not under /vdi/."""
    path, query = normalize_path(target)
    if not path.startswith("/vdi/"):
        raise NotFound("not found", "path outside /vdi/: " + printable(target, 80))
    return path + ("?" + query if query else "")


def query_parameters(target: str) -> dict[str, str]:
    """First value of each query parameter, percent-decoded."""
    from urllib.parse import unquote
    params: dict[str, str] = {}
    for pair in target.partition("?")[2].split("&"):
        name, _, value = pair.partition("=")
        params.setdefault(unquote(name), unquote(value))
    return params


def host_without_port(host: str) -> str:
    """`[::1]:8443` -> `[::1]` (brackets kept: clients write wss://%s:%s), `a:1` -> `a`."""
    host = host.strip()
    if host.startswith("["):
        return host[:host.index("]") + 1] if "]" in host else host
    if host.count(":") > 1:
        return f"[{host}]"
    return host.partition(":")[0]


def public_host(public_address: str, plain: bool, request: Request,
                local_ip: str) -> str:
    """The name under which this client reaches the gateway (PROTOCOL.md)."""
    if public_address:
        return public_address
    if plain:
        forwarded = request.header("x-forwarded-host")
        if forwarded and forwarded.split(",")[0].strip():
            return host_without_port(forwarded.split(",")[0])
    host = request.header("host")
    if host and host_without_port(host):
        return host_without_port(host)
    return f"[{local_ip}]" if ":" in local_ip else local_ip


# A LF without its CR, or a CR followed by anything but LF (a CR at the very end of
# what has arrived so far may still get its LF).
_BARE_CR_OR_LF = re.compile(rb"(?<!\r)\n|\r(?=[^\n])")


class Stream:
    """Blocking reads and writes of one connection with deadlines; HTTP phase only."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()

    def _recv(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ClientTimeout("timed out")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise ClientTimeout("timed out") from None
        if not data:
            raise ClientGone("closed the connection")
        return data

    def read_head(self, deadline: float, idle_deadline: float | None = None) -> bytes | None:
        """The next request head; None when the client closed cleanly between requests."""
        if not self.buffer:
            try:
                self.buffer += self._recv(idle_deadline or deadline)
            except (ClientGone, ClientTimeout):
                if idle_deadline is not None:
                    return None
                raise
            if idle_deadline is not None:
                deadline = time.monotonic() + HEAD_TIMEOUT_S
        elif idle_deadline is not None:   # pipelined: this head's clock starts now
            deadline = time.monotonic() + HEAD_TIMEOUT_S
        scanned = 0
        while True:
            end = self.buffer.find(b"\r\n\r\n", max(0, scanned - 3))
            if end >= 0:
                head = bytes(self.buffer[:end])
                del self.buffer[:end + 4]
                if len(head) > MAX_HEAD_BYTES:
                    raise HeadersTooLarge("request head over 64 KiB")
                return head
            if len(self.buffer) > MAX_HEAD_BYTES:
                raise HeadersTooLarge("request head over 64 KiB")
            # A head whose lines end in a bare LF never gets its CRLFCRLF: refuse it
            # now rather than at the deadline.
            if _BARE_CR_OR_LF.search(self.buffer, max(0, scanned - 1)):
                raise BadRequest("bare CR or LF in the request head")
            scanned = len(self.buffer)
            self.buffer += self._recv(deadline)

    def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self.buffer += self._recv(time.monotonic() + BODY_TIMEOUT_S)
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def read_line(self, limit: int = 4096) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end > limit or (end < 0 and len(self.buffer) > limit):
                raise BadRequest("chunk header line too long")
            if _BARE_CR_OR_LF.search(self.buffer, 0, end if end >= 0 else len(self.buffer)):
                raise BadRequest("bare CR or LF in a chunk header line")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[:end + 2]
                return line
            self.buffer += self._recv(time.monotonic() + BODY_TIMEOUT_S)

    def read_body(self, request: Request) -> bytes:
        if request.chunked:
            return self._read_chunked()
        length = request.content_length or 0
        if length > MAX_BODY_BYTES:
            raise PayloadTooLarge("request body over 1 MiB")
        if length and "100-continue" in request.header_tokens("expect"):
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        return self.read_exactly(length)

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size_text = self.read_line().split(b";", 1)[0].strip(b" \t")
            if not size_text or len(size_text) > 8 or not all(
                    c in b"0123456789abcdefABCDEF" for c in size_text):
                raise BadRequest("malformed chunk size")
            size = int(size_text, 16)
            if size == 0:
                break
            if len(body) + size > MAX_BODY_BYTES:
                raise PayloadTooLarge("request body over 1 MiB")
            body += self.read_exactly(size)
            if self.read_exactly(2) != b"\r\n":
                raise BadRequest("chunk data not followed by CRLF")
        for _ in range(MAX_HEADER_LINES):   # trailer section, ignored
            if not self.read_line():
                return bytes(body)
        raise BadRequest("too many trailer lines")

    def send(self, data: bytes) -> None:
        self.sock.settimeout(WRITE_TIMEOUT_S)
        self.sock.sendall(data)


# =====================================================================================
# Connections: TLS handshake, then HTTP requests, then maybe a tunnel
# =====================================================================================

def serve_connection(gateway: Gateway, raw: socket.socket, peer: tuple, tls: bool) -> None:
    """Serves one accepted connection to its end; the one place that closes it."""
    started = time.monotonic()
    deadline = started + HEAD_TIMEOUT_S
    client = f"{peer[0]}:{peer[1]}" if ":" not in peer[0] else f"[{peer[0]}]:{peer[1]}"
    sock = raw
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            sock = gateway.tls_context.wrap_socket(raw, server_side=True,
                                                   do_handshake_on_connect=False)
            try:
                tls_handshake(sock, deadline)
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as exc:
                # Load balancer health checks connect and close: not worth a warning.
                # (A peer's EOF in the handshake is SSLZeroReturnError on Python 3.11.2,
                # Debian 12's, and SSLEOFError on later 3.11 releases.)
                log.debug("%s: closed during the TLS handshake: %s", client, exc)
                return
            except (ssl.SSLError, OSError) as exc:
                gateway.refusals.refuse("TLS handshake failed", f"{client}: {exc}")
                return
        _serve_requests(gateway, Stream(sock), client, tls, deadline)
    except ClientTimeout as exc:
        gateway.refusals.refuse("client too slow", f"{client}: {exc}")
    except (ClientGone, ConnectionError, ssl.SSLError, socket.timeout) as exc:
        log.debug("%s: connection ended: %s", client, exc)
    except Exception:
        log.exception("%s: internal error", client)
    finally:
        sock.close()
        log.debug("%s: connection closed after %.1f s", client, time.monotonic() - started)


def tls_handshake(sock: ssl.SSLSocket, deadline: float) -> None:
    """The server side of the TLS handshake, within an absolute deadline.

    A blocking handshake with a socket timeout would restart the clock on every
    read, so a client dripping its hello byte by byte could hold it far longer.
    """
    sock.setblocking(False)
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            events = select.POLLIN
        except ssl.SSLWantWriteError:
            events = select.POLLOUT
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not _wait(sock, events, remaining):
            raise ClientTimeout("TLS handshake not completed in time")


def _serve_requests(gateway: Gateway, stream: Stream, client: str, tls: bool,
                    deadline: float) -> None:
    idle_deadline = None
    while True:
        request = None
        try:
            head = stream.read_head(deadline, idle_deadline)
            if head is None:
                return
            request = parse_request_head(head)
            if request.is_upgrade:
                serve_tunnel(gateway, stream, request, client)
                return
            keep_alive = serve_vdi(gateway, stream, request, client, tls)
        except GatewayError as error:
            if error.refusal:
                gateway.refusals.refuse(error.refusal, f"{client}: {error.detail}")
            else:
                log.warning("%s: %s", client, error.detail)
            keep_alive = (not error.closes_connection and request is not None
                          and request.keep_alive)
            stream.send(error_response(error, keep_alive))
        if not keep_alive:
            return
        idle_deadline = time.monotonic() + KEEPALIVE_IDLE_S


# =====================================================================================
# Manager proxy and answer rewrite
# =====================================================================================

MAX_MANAGER_ANSWER_BYTES = 16 * 1024 * 1024


def serve_vdi(gateway: Gateway, stream: Stream, request: Request, client: str,
              tls: bool) -> bool:
    """Forwards one /vdi/ request to the manager; returns whether to keep the connection."""
    started = time.monotonic()
    target = vdi_target(request.target)
    body = stream.read_body(request)
    config = gateway.config
    manager_address = choose_manager(gateway, body, client)
    status, reason, headers, answer = forward_to_manager(
        config, manager_address, request, target, body, client, tls)
    found = find_desktop(answer)
    if found is not None:
        desktop_answer, desktop = found
        if not config.first_spice_port <= desktop[1] <= config.last_spice_port:
            raise ManagerAnswerRefused(
                "The desktop cannot be reached through this gateway.",
                f"manager {manager_address} sent Spice port {desktop[1]}, outside "
                f"{config.first_spice_port}..{config.last_spice_port}; nothing registered")
        local_ip = stream.sock.getsockname()[0]
        host = public_host(config.public_address, not tls, request, local_ip)
        token = gateway.tokens.issue(desktop)
        answer = render_desktop_answer(desktop_answer, host, token)
        log.info("%s: desktop %s:%d via token %s, spice_address %s", client, desktop[0],
                 desktop[1], token_hint(token), printable(host))
    keep_alive = request.keep_alive
    headers = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP
               and k.lower() != "content-length"]
    stream.send(http_response(status, headers, answer, keep_alive, reason))
    log.debug("%s: %s %s -> manager %s: %d, %d bytes in %.0f ms", client, request.method,
              printable(target), manager_address, status, len(answer),
              (time.monotonic() - started) * 1000)
    return keep_alive


def choose_manager(gateway: Gateway, body: bytes, client: str) -> str:
    """ManagerIP, or with LDAP and a username in the body, the user's own manager."""
    config = gateway.config
    username = username_in(body) if gateway.directory else None
    if gateway.directory is None or username is None:
        return _fallback_manager(config, "no manager configured (ManagerIP is empty)")
    try:
        manager, why = gateway.directory.manager_for(username)
    except DirectoryUnavailable as exc:
        manager, why = None, f"directory unavailable: {exc}"
    if manager is not None:
        return manager
    if not config.ldap_fallback:
        raise NoManagerForUser("No desktop service is configured for this user.",
                               f"user {printable(username)}: {why}; LDAPFallback is off")
    manager = _fallback_manager(config, f"user {printable(username)}: {why}, and the "
                                "fallback ManagerIP is empty")
    log.warning("%s: user %s: %s; using ManagerIP", client, printable(username), why)
    return manager


def _fallback_manager(config: Config, why: str) -> str:
    if not config.manager_address:
        raise NoManagerForUser("No desktop service is configured for this user.", why)
    return config.manager_address


def username_in(body: bytes) -> str | None:
    """The non-empty string `username` of a JSON object body, whatever the Content-Type."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    username = data.get("username") if isinstance(data, dict) else None
    return username if isinstance(username, str) and username else None


def manager_tls_context(ca_file: str) -> ssl.SSLContext:
    if ca_file:
        context = ssl.create_default_context(cafile=ca_file)
        context.check_hostname = False  # managers are addressed by IP in ManagerIP
        return context
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # managers ship self-signed certificates
    return context


def forward_headers(request: Request, body: bytes, client: str, tls: bool
                    ) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop ones (RFC 9110 7.6.1), plus X-Forwarded-*."""
    named = set(request.header_tokens("connection"))
    dropped = HOP_BY_HOP | named | {"accept-encoding", "host", "content-length", "expect",
                                    "x-forwarded-for", "x-forwarded-proto",
                                    "x-forwarded-host"}
    headers = [(k, v) for k, v in request.headers if k not in dropped]
    client_ip = client.rpartition(":")[0].strip("[]")
    forwarded_for = request.header("x-forwarded-for")
    # Behind a reverse proxy (plain port) its X-Forwarded-* are the truth; on the
    # public TLS port they are whatever the internet says, so they are replaced.
    if not tls and forwarded_for:
        headers.append(("X-Forwarded-For", f"{forwarded_for}, {client_ip}"))
    else:
        headers.append(("X-Forwarded-For", client_ip))
    proto = request.header("x-forwarded-proto") if not tls else None
    headers.append(("X-Forwarded-Proto", proto or ("https" if tls else "http")))
    forwarded_host = (request.header("x-forwarded-host") if not tls else None) or request.header("host")
    if forwarded_host:
        headers.append(("X-Forwarded-Host", forwarded_host))
    if body or request.method in ("POST", "PUT", "PATCH"):
        headers.append(("Content-Length", str(len(body))))
    return headers


def forward_to_manager(config: Config, manager_address: str, request: Request, target: str,
                       body: bytes, client: str, tls: bool
                       ) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """One request to the manager; ManagerUnavailable names the manager and the cause."""
    host, port = parse_host_port(manager_address, 443)
    deadline = time.monotonic() + config.manager_timeout_s
    connection = http.client.HTTPSConnection(
        host, port, timeout=config.manager_timeout_s,
        context=manager_tls_context(config.manager_ca_file))
    connection.response_class = _ManagerResponse

    def unavailable(why: str) -> ManagerUnavailable:
        if expired.is_set():
            why = f"no answer within {config.manager_timeout_s:g} s"
        return ManagerUnavailable("The desktop service is not available right now. "
                                  "Please try again later.",
                                  f"manager {manager_address}: {why}")

    # The socket timeout bounds each read only: a manager sending a byte now and then
    # would hold the client for ever. At the deadline the socket is shut down.
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        if connection.sock is not None:
            _hard_shutdown(connection.sock)
    watchdog = threading.Timer(config.manager_timeout_s, expire)
    watchdog.name = threading.current_thread().name + "-manager-deadline"
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.putrequest(request.method, target, skip_accept_encoding=True)
        for name, value in forward_headers(request, body, client, tls):
            connection.putheader(name, value)
        connection.endheaders(body or None)
        response = connection.getresponse()
        chunks = []
        size = 0
        while True:
            if time.monotonic() > deadline:
                raise socket.timeout("answer not complete in time")
            chunk = response.read(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_MANAGER_ANSWER_BYTES:
                raise unavailable("answer over 16 MiB, cut off")
            chunks.append(chunk)
        if response.length:   # read(amt) returns short at EOF instead of raising
            raise http.client.IncompleteRead(b"", response.length)
        return response.status, response.reason, response.getheaders(), b"".join(chunks)
    except socket.timeout:
        raise unavailable(f"no answer within {config.manager_timeout_s:g} s") from None
    except ConnectionRefusedError:
        raise unavailable("connection refused") from None
    except ssl.SSLError as exc:
        raise unavailable(f"TLS failed: {exc.reason or exc}") from None
    except (http.client.RemoteDisconnected, http.client.IncompleteRead,
            ConnectionResetError):
        raise unavailable("closed the connection before answering completely") from None
    except http.client.HTTPException as exc:
        raise unavailable(f"did not answer HTTP ({type(exc).__name__})") from None
    except socket.gaierror as exc:
        raise unavailable(f"cannot resolve {host}: {exc.strerror}") from None
    except OSError as exc:
        raise unavailable(exc.strerror or str(exc)) from None
    finally:
        watchdog.cancel()
        connection.close()


class _LineTracker:
    """The response's file, remembering the last line read (see _ManagerResponse)."""

    def __init__(self, fp):
        self._fp = fp
        self.last_line = b""

    def readline(self, *args):
        self.last_line = self._fp.readline(*args)
        return self.last_line

    def __getattr__(self, name):
        return getattr(self._fp, name)


class _ManagerResponse(http.client.HTTPResponse):
    """http.client takes a head cut off by EOF for a whole one (and then an empty,
    close-delimited body): a manager dying mid-answer would pass for an empty 200."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fp = _LineTracker(self.fp)

    def begin(self):
        super().begin()
        if self.fp is not None and self.fp.last_line not in (b"\r\n", b"\n"):
            raise http.client.IncompleteRead(b"")


def spice_port_of(value: Any) -> int | None:
    """`spice_port` as the manager sends it, a JSON number or string, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value.strip())
    return None


def find_desktop(answer: bytes) -> tuple[dict[str, Any], tuple[str, int]] | None:
    """The parsed answer and (address, port) if this is a desktop answer to rewrite."""
    if b"spice_port" not in answer:
        return None
    try:
        data = json.loads(answer)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("status") != "OK":
        return None
    address, port = data.get("spice_address"), spice_port_of(data.get("spice_port"))
    if not isinstance(address, str) or not address or port is None:
        return None
    return data, (address, port)


def render_desktop_answer(answer: dict[str, Any], host: str, token: str) -> bytes:
    """The answer with the gateway's address, the token and use_ws; the rest untouched."""
    rewritten = dict(answer)
    rewritten["spice_address"] = host
    rewritten["spice_port"] = token
    rewritten["use_ws"] = True
    return json.dumps(rewritten).encode("utf-8")


# =====================================================================================
# Tokens
# =====================================================================================

MAX_TOKENS = 100_000


class ClientLife:
    """When the client holding a token was last heard from, on any of its tunnels.

    All tunnels of a token belong to one client process (its Spice channels), so a
    frame on any of them is a sign of life for all: an idle channel whose own Pong
    is late behind a stalled network is not cut while the client talks on another.
    A client that really vanishes goes silent on every channel at once.
    """
    __slots__ = ("heard_at",)

    def __init__(self) -> None:
        self.heard_at = 0.0   # time.monotonic(); a plain float: one writer at a time wins


class TokenGrant(NamedTuple):
    desktop: tuple[str, int]
    life: ClientLife


class _TokenEntry:
    __slots__ = ("grant", "idle_since", "tunnels")

    def __init__(self, desktop: tuple[str, int], now: float):
        self.grant = TokenGrant(desktop, ClientLife())
        self.tunnels = 0
        self.idle_since = now


class TokenRegistry:
    """token -> desktop, in memory, least recently active first.

    A token stays valid while any tunnel opened with it is open and for `timeout_s`
    after it was issued or its last tunnel closed. When `max_tokens` are held, the
    token idle the longest is dropped.
    """

    def __init__(self, timeout_s: float, max_tokens: int = MAX_TOKENS,
                 clock: Callable[[], float] = time.monotonic):
        self._timeout_s = timeout_s
        self._max = max_tokens
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, _TokenEntry] = collections.OrderedDict()

    def issue(self, desktop: tuple[str, int]) -> str:
        # 12 random bytes = 96 bits, 16 characters of [A-Za-z0-9_-]: within the
        # 17 characters old mobile launchers keep.
        token = secrets.token_urlsafe(12)
        now = self._clock()
        with self._lock:
            self._purge(now)
            if len(self._entries) >= self._max:
                self._drop_idlest()
            self._entries[token] = _TokenEntry(desktop, now)
        return token

    def acquire(self, token: str) -> TokenGrant | None:
        """The desktop of a valid token, counting one more open tunnel; else None."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(token)
            if entry is None:
                return None
            if entry.tunnels == 0 and now - entry.idle_since >= self._timeout_s:
                del self._entries[token]
                return None
            entry.tunnels += 1
            self._entries.move_to_end(token)
            return entry.grant

    def release(self, token: str) -> None:
        with self._lock:
            entry = self._entries.get(token)
            if entry is not None:
                entry.tunnels -= 1
                if entry.tunnels == 0:
                    entry.idle_since = self._clock()
                    self._entries.move_to_end(token)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _purge(self, now: float) -> None:
        while self._entries:
            token, entry = next(iter(self._entries.items()))
            if entry.tunnels or now - entry.idle_since < self._timeout_s:
                return
            del self._entries[token]

    def _drop_idlest(self) -> None:
        for token, entry in self._entries.items():
            if entry.tunnels == 0:
                del self._entries[token]
                return
        self._entries.popitem(last=False)


# =====================================================================================
# LDAP: which manager serves a user
# =====================================================================================

LDAP_CACHE_MAX = 100_000


class _Flight:
    """One directory search in progress; simultaneous misses for a user wait on it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: tuple[str | None, str] | None = None
        self.error: DirectoryUnavailable | None = None


class LdapDirectory:
    """Looks users up with ldap3; answers are cached in a lock-protected dict.

    Keyed by the lower-cased username, an entry lives `LDAPCacheSecs` from its
    search (a hit does not extend it). "No manager for this user" is an answer and
    is cached; a directory failure is not.
    """

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.host, self.port, self.use_ssl = parse_ldap_server(
            config.ldap_server, config.ldap_port, config.ldap_use_ssl)
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, tuple[str | None, str]]] = {}
        self._flights: dict[str, _Flight] = {}

    def manager_for(self, username: str) -> tuple[str | None, str]:
        """(manager address or None, why); raises DirectoryUnavailable."""
        key = username.lower()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached[0] > self._clock():
                return cached[1]
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        assert flight is not None
        if not leader:
            if not flight.done.wait(self.config.ldap_timeout_s * 4 + 1):
                raise DirectoryUnavailable("waiting for another search of this user timed out")
            if flight.error is not None:
                raise flight.error
            assert flight.result is not None
            return flight.result
        try:
            searched_at = self._clock()
            flight.result = self._search(username)
            if self.config.ldap_cache_s > 0:
                with self._lock:
                    self._store(key, searched_at + self.config.ldap_cache_s, flight.result)
            return flight.result
        except DirectoryUnavailable as exc:
            flight.error = exc
            raise
        except Exception as exc:   # a bug here must not leave the waiters without an answer
            log.exception("directory lookup of %s failed", printable(username))
            flight.error = DirectoryUnavailable(f"lookup failed: {printable(repr(exc))}")
            raise flight.error from None
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()

    def _store(self, key: str, expires: float, result: tuple[str | None, str]) -> None:
        # Entries are stored in search order and share one lifetime, so the first
        # ones are the oldest: evicting from the front costs O(1) per insert.
        self._cache.pop(key, None)
        now = self._clock()
        while self._cache and (len(self._cache) >= LDAP_CACHE_MAX
                               or next(iter(self._cache.values()))[0] <= now):
            del self._cache[next(iter(self._cache))]
        self._cache[key] = (expires, result)

    def connect(self):
        """A bound ldap3 connection; raises DirectoryUnavailable saying which step failed."""
        import ldap3
        from ldap3.core.exceptions import LDAPException
        config = self.config
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED if config.ldap_ca_file else ssl.CERT_NONE,
                        ca_certs_file=config.ldap_ca_file or None)
        server = ldap3.Server(self.host, port=self.port, use_ssl=self.use_ssl, tls=tls,
                              get_info=ldap3.NONE, connect_timeout=config.ldap_timeout_s)
        connection = ldap3.Connection(
            server, user=config.ldap_username or None, password=config.ldap_password or None,
            # ldap3 packs receive_timeout into SO_RCVTIMEO as a C long: whole seconds only.
            read_only=True, receive_timeout=math.ceil(config.ldap_timeout_s),
            raise_exceptions=False,
            auto_bind=ldap3.AUTO_BIND_NONE)
        where = f"{self.host}:{self.port}"
        try:
            if not connection.bind():
                description = connection.result.get("description", "refused")
                connection.unbind()
                raise DirectoryUnavailable(f"{where}: bind as "
                                           f"{printable(config.ldap_username or 'anonymous')} "
                                           f"refused: {description}")
        except (LDAPException, OSError) as exc:
            _close_quietly(connection)   # a refused connection must not leak its socket
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else _ldap_error(exc)
            raise DirectoryUnavailable(f"{where}: cannot connect or bind: {why}") from None
        return connection

    def _search(self, username: str) -> tuple[str | None, str]:
        import ldap3
        from ldap3.core.exceptions import LDAPException
        from ldap3.utils.conv import escape_filter_chars
        config = self.config
        try:
            username.encode("utf-8")
        except UnicodeEncodeError:   # valid JSON ("\\ud800"), but no LDAP string can hold it
            return None, "no directory entry (the username is not valid Unicode)"
        connection = self.connect()
        # RFC 4515: the username is searched for, escaped, never refused or rewritten.
        search_filter = f"({config.ldap_search_rdn}={escape_filter_chars(username)})"
        scope = ldap3.LEVEL if config.ldap_one_shot else ldap3.SUBTREE
        try:
            ok = connection.search(config.ldap_base_dn, search_filter, search_scope=scope,
                                   attributes=[config.ldap_attribute],
                                   time_limit=int(max(1, config.ldap_timeout_s)))
            result = connection.result
            entries = [r for r in (connection.response or []) if r.get("type") == "searchResEntry"]
        except LDAPException as exc:
            raise DirectoryUnavailable(f"{self.host}:{self.port}: search failed: "
                                       f"{_ldap_error(exc)}") from None
        finally:
            _close_quietly(connection)
        if not ok and not entries and result.get("result") not in (0, 32):  # 32 noSuchObject
            raise DirectoryUnavailable(f"{self.host}:{self.port}: search failed: "
                                       f"{result.get('description')}")
        if not entries:
            return None, "no directory entry"
        values = entries[0].get("raw_attributes", {}).get(config.ldap_attribute)
        if values is None:
            attributes = entries[0].get("raw_attributes", {})
            values = next((v for k, v in attributes.items()
                           if k.lower() == config.ldap_attribute.lower()), None)
        if not values:
            return None, f"no {config.ldap_attribute} attribute"
        value = values[0].decode("utf-8", "replace").strip() if isinstance(
            values[0], bytes) else str(values[0]).strip()
        if not value:
            return None, f"empty {config.ldap_attribute} attribute"
        try:
            parse_host_port(value, 443)
        except ValueError:
            return None, f"{config.ldap_attribute} is not a manager address: {printable(value)}"
        return value, "directory"


def _close_quietly(connection) -> None:
    try:
        connection.unbind()
    except Exception as exc:   # noqa: BLE001 - a broken connection fails in any way
        log.debug("directory unbind failed: %s", exc)


def _ldap_error(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return printable(text, 200)


# =====================================================================================
# Tunnels, part 1: WebSocket handshake and framing (RFC 6455), pure functions
# =====================================================================================

WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_CLIENT_FRAME = 1024 * 1024   # a larger client frame is closed with 1009
# The native client (libsoup) drops the session on a frame of 128 KiB or more; we
# keep every whole frame, header included, within 64 KiB.
MAX_SEND_PAYLOAD = 65536 - 16
PING_PAYLOAD = b"flexvdi"


class Opcode(enum.IntEnum):
    """RFC 6455 5.2; the names are wsproto's."""
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseReason(enum.IntEnum):
    """The Close codes the gateway sends (RFC 6455 7.4.1); the names are wsproto's."""
    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_FRAME_PAYLOAD_DATA = 1007
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011


_KNOWN_OPCODES = frozenset(int(op) for op in Opcode)
_BASE64_TEXT = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


class ProtocolViolation(Exception):
    """The client broke RFC 6455 inside a tunnel; `code` is the Close code to send."""

    def __init__(self, code: CloseReason, message: str):
        super().__init__(message)
        self.code = code


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode()).digest()).decode()


def check_websocket_key(key: str | None) -> str:
    if key is None:
        raise BadRequest("missing Sec-WebSocket-Key")
    try:
        if len(base64.b64decode(key.strip(), validate=True)) == 16:
            return key.strip()
    except (binascii.Error, ValueError):
        pass
    raise BadRequest("malformed Sec-WebSocket-Key")


def choose_subprotocol(request: Request) -> str | None:
    """`binary` if offered, else `base64` if offered, else none (never one not offered)."""
    offered = [t.strip() for k, v in request.headers if k == "sec-websocket-protocol"
               for t in v.split(",")]
    for name in ("binary", "base64"):
        if name in offered:
            return name
    return None


def handshake_response(key: str, subprotocol: str | None) -> bytes:
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Accept: {accept_key(key)}"]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def client_version(params: dict[str, str]) -> int:
    """`ver`; a missing or non-numeric one counts as 1 (such clients never get Pings)."""
    value = params.get("ver", "")
    return int(value) if value.isascii() and value.isdigit() and len(value) < 6 else 1


def frame_header(opcode: Opcode, length: int) -> bytes:
    """Header of an unmasked, final server frame."""
    if length < 126:
        return struct.pack("!BB", 0x80 | opcode, length)
    if length < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, length)
    return struct.pack("!BBQ", 0x80 | opcode, 127, length)


def encode_frame(opcode: Opcode, payload: bytes = b"") -> bytes:
    return frame_header(opcode, len(payload)) + payload


def close_payload(code: int | None, reason: str = "") -> bytes:
    """A Close frame's payload: the code and a reason cut to fit a control frame."""
    if code is None:
        return b""
    return struct.pack("!H", code) + reason.encode()[:120]


_XOR_TABLES = [bytes(value ^ key for value in range(256)) for key in range(256)]


def unmask_python(data, mask: bytes) -> bytearray:
    """Every fourth byte shares a mask byte, so four C-level translate() calls over
    strided slices do the work, without a Python loop over bytes."""
    out = bytearray(data)
    for lane in range(4):
        out[lane::4] = out[lane::4].translate(_XOR_TABLES[mask[lane]])
    return out


def unmask(data, mask: bytes, offset: int = 0):
    """XOR with the 4-byte mask, starting at mask byte `offset` (RFC 6455 5.3)."""
    if offset:
        mask = mask[offset:] + mask[:offset]
    if _apply_mask is not None:
        return _apply_mask(data, mask)
    return unmask_python(data, mask)


def valid_close_code(code: int) -> bool:
    """Codes a client may send (RFC 6455 7.4, IANA registry): not 1004-1006, 1015."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def parse_close_payload(payload: bytes) -> tuple[int | None, str]:
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolViolation(CloseReason.PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = struct.unpack("!H", payload[:2])[0]
    if not valid_close_code(code):
        raise ProtocolViolation(CloseReason.PROTOCOL_ERROR, f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(CloseReason.INVALID_FRAME_PAYLOAD_DATA,
                                "close reason is not UTF-8") from None
    return code, reason


class FrameHeader(NamedTuple):
    """What a client frame's header says (RFC 6455 5.2)."""
    fin: bool
    opcode: Opcode
    length: int      # of the payload
    mask: bytes
    size: int        # of the header itself


def parse_frame_header(buf, pos: int = 0) -> FrameHeader | None:
    """The client frame header at `pos`, None if incomplete, or raises.

    Checks what the first two bytes tell as soon as they arrive, so a bad frame is
    refused before its payload is waited for.
    """
    available = len(buf) - pos
    if available < 2:
        return None
    first, second = buf[pos], buf[pos + 1]
    fin, opcode = bool(first & 0x80), first & 0x0F
    if first & 0x70:
        raise ProtocolViolation(CloseReason.PROTOCOL_ERROR,
                                "reserved bits set, no extension was negotiated")
    if opcode not in _KNOWN_OPCODES:
        raise ProtocolViolation(CloseReason.PROTOCOL_ERROR, f"unknown opcode {opcode}")
    if not second & 0x80:
        raise ProtocolViolation(CloseReason.PROTOCOL_ERROR, "unmasked client frame")
    length = second & 0x7F
    if opcode >= Opcode.CLOSE and (not fin or length > 125):
        raise ProtocolViolation(CloseReason.PROTOCOL_ERROR,
                                "fragmented or oversized control frame")
    size = 6
    if length == 126:
        size = 8
        if available < 4:
            return None
        length = struct.unpack_from("!H", buf, pos + 2)[0]
    elif length == 127:
        size = 14
        if available < 10:
            return None
        length = struct.unpack_from("!Q", buf, pos + 2)[0]
        if length >> 63:
            raise ProtocolViolation(CloseReason.PROTOCOL_ERROR,
                                    "frame length with the top bit set")
    if length > MAX_CLIENT_FRAME:
        raise ProtocolViolation(CloseReason.MESSAGE_TOO_BIG,
                                f"client frame of {length} bytes, over 1 MiB")
    if available < size:
        return None
    return FrameHeader(fin, Opcode(opcode), length, bytes(buf[pos + size - 4:pos + size]), size)


class EventKind(enum.Enum):
    DATA = "data"     # binary payload, passed on as it arrives
    PING = "ping"
    PONG = "pong"
    CLOSE = "close"   # the client's Close: `code` (or None) and `reason`
    ERROR = "error"   # the client broke the protocol: `code` to answer, `reason` what


class Event(NamedTuple):
    """One thing the decoder found in the client's bytes."""
    kind: EventKind
    payload: bytes = b""
    code: int | None = None
    reason: str = ""


class FrameDecoder:
    """Incremental decoder of client frames; pure, no I/O.

    feed() returns Events in order: DATA as binary payload arrives (fragments and
    partial frames are passed on at once, never buffered whole), PING, PONG, CLOSE,
    and last, if the client broke the protocol, ERROR (nothing is decoded after it).
    """

    def __init__(self, base64_text: bool = False):
        self._base64 = base64_text
        self._buf = bytearray()
        self._frame: FrameHeader | None = None   # the frame whose payload is arriving
        self._remaining = 0          # of its payload
        self._mask_offset = 0        # mask byte its next payload byte takes
        self._message: Opcode | None = None   # TEXT or BINARY: the message in progress
        self._control = bytearray()
        self._text = bytearray()
        self.failed = False

    def feed(self, data) -> list[Event]:
        """Decodes what arrived; `data` may be a view of a buffer the caller reuses."""
        events: list[Event] = []
        if self.failed:
            return events
        if self._buf:   # a header split across reads: join it with what follows
            self._buf += data
            data = self._buf
            self._buf = bytearray()
        view = memoryview(data)
        end = len(view)
        pos = 0
        try:
            while True:
                frame = self._frame
                if frame is None:
                    header = parse_frame_header(view, pos)
                    if header is None:
                        break
                    pos += header.size
                    self._start_frame(header)
                    if header.length == 0:
                        self._finish_frame(events)
                    continue
                take = min(self._remaining, end - pos)
                if take == 0:
                    break
                chunk = unmask(view[pos:pos + take], frame.mask, self._mask_offset)
                pos += take
                self._remaining -= take
                self._mask_offset = (self._mask_offset + take) & 3
                self._payload(frame.opcode, chunk, events)
                if self._remaining == 0:
                    self._finish_frame(events)
        except ProtocolViolation as exc:
            self.failed = True
            events.append(Event(EventKind.ERROR, code=exc.code, reason=str(exc)))
        if pos < end and not self.failed:
            self._buf = bytearray(view[pos:])   # at most a partial header (< 14 bytes)
        view.release()
        return events

    def _start_frame(self, header: FrameHeader) -> None:
        opcode = header.opcode
        if opcode == Opcode.CONTINUATION:
            if self._message is None:
                raise ProtocolViolation(CloseReason.PROTOCOL_ERROR,
                                        "continuation frame without a message")
        elif opcode < Opcode.CLOSE:
            if self._message is not None:
                raise ProtocolViolation(CloseReason.PROTOCOL_ERROR,
                                        "new message before the previous one ended")
            if opcode == Opcode.TEXT and not self._base64:
                raise ProtocolViolation(CloseReason.UNSUPPORTED_DATA,
                                        "text frame on a binary tunnel")
            self._message = opcode
        else:
            self._control.clear()
        self._frame = header
        self._remaining = header.length
        self._mask_offset = 0

    def _payload(self, opcode: Opcode, chunk: bytes, events: list[Event]) -> None:
        if opcode >= Opcode.CLOSE:
            self._control += chunk
        elif self._message == Opcode.BINARY:
            events.append(Event(EventKind.DATA, chunk))
        else:
            self._text += chunk
            if len(self._text) > MAX_CLIENT_FRAME:
                raise ProtocolViolation(CloseReason.MESSAGE_TOO_BIG, "base64 message over 1 MiB")

    def _finish_frame(self, events: list[Event]) -> None:
        frame = self._frame
        assert frame is not None
        self._frame = None
        if frame.opcode == Opcode.CLOSE:
            code, reason = parse_close_payload(bytes(self._control))
            events.append(Event(EventKind.CLOSE, code=code, reason=reason))
        elif frame.opcode == Opcode.PING:
            events.append(Event(EventKind.PING, bytes(self._control)))
        elif frame.opcode == Opcode.PONG:
            events.append(Event(EventKind.PONG, bytes(self._control)))
        elif frame.fin:
            if self._message == Opcode.TEXT:
                events.append(Event(EventKind.DATA, decode_base64_text(bytes(self._text))))
                self._text.clear()
            self._message = None


def decode_base64_text(text: bytes) -> bytes:
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(CloseReason.INVALID_FRAME_PAYLOAD_DATA,
                                "text message is not UTF-8") from None
    if not _BASE64_TEXT.fullmatch(text):
        raise ProtocolViolation(CloseReason.INVALID_FRAME_PAYLOAD_DATA,
                                "text message is not base64")
    return base64.b64decode(text)


# =====================================================================================
# Tunnels, part 2: the one writer to the client, and the two relays
# =====================================================================================
#
# A tunnel has two threads: the connection thread relays client -> desktop (and
# answers the client's Pings), the `-down` thread relays desktop -> client. Both wait
# in poll() and then do a non-blocking read or write; OpenSSL objects are not
# thread-safe, so every call on the client's TLS socket is made under the tunnel's
# `tls_lock`, which is never held while waiting. Everything sent to the client goes
# through its ClientWriter (rule: a frame started is a frame finished).

DESKTOP_CONNECT_TIMEOUT_S = 10
CLOSE_LINGER_S = 2        # after our Close is out, how long we wait for the client's
GRACE_S = 3               # one side gone, the other frozen: end after this
CLIENT_READ_BYTES = 256 * 1024   # decrypted bytes read before decoding them
SMALL_READ_BYTES = 4096          # a tunnel's desktop read buffer while it is quiet
DOWN_BATCH_FRAMES = 4            # full frames from a streaming desktop per TLS write
BUFFER_IDLE_S = 1.0       # a desktop quiet this long gets its small read buffer back
WANT_READ_WAIT_S = 0.1    # a write that needs a read first: look again this soon

_WOULD_BLOCK = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError)
_HANGUP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


def _hard_shutdown(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    # socket.socket.shutdown, not SSLSocket.shutdown: the latter drops the TLS
    # object under the feet of the thread that may be using it.
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


def _wait(sock: socket.socket, events: int, timeout_s: float | None) -> int:
    poller = select.poll()
    poller.register(sock, events)
    ready = poller.poll(None if timeout_s is None else max(0, int(timeout_s * 1000)))
    return ready[0][1] if ready else 0


class Gathered(NamedTuple):
    end: int                       # where the last gathered frame ends in the buffer
    payload_bytes: int             # of all the frames
    last_read: int                 # size of the last desktop read (0: none was ready)
    error: OSError | None          # a desktop error, to act on after sending the frames


def gather_frames(sock: socket.socket, buf: bytearray, view: memoryview, size: int,
                  limit: int) -> Gathered:
    """Appends more whole binary frames after the first (its payload at buf[10:10 + size],
    its header just before) while the desktop socket has them ready.

    A desktop that filled a whole frame most likely has more waiting (a video stream,
    a file copy): one TLS write of several frames costs fewer trips through Python and
    the TLS layer than one write per frame. Frames stay within `limit` payload bytes
    each, with minimal headers.
    """
    end = 10 + size
    total = size
    while size == limit and end + 4 + limit <= len(buf):
        try:
            size = sock.recv_into(view[end + 4:end + 4 + limit])
        except _WOULD_BLOCK:
            return Gathered(end, total, 0, None)
        except OSError as exc:
            return Gathered(end, total, 0, exc)
        if size == 0:
            return Gathered(end, total, 0, None)   # EOF: the next read sees it again
        header = frame_header(Opcode.BINARY, size)
        if len(header) == 2:   # under 126 bytes: close the gap left for 4
            buf[end + 2:end + 2 + size] = buf[end + 4:end + 4 + size]
        buf[end:end + len(header)] = header
        end += len(header) + size
        total += size
    return Gathered(end, total, size, None)


def serve_tunnel(gateway: Gateway, stream: Stream, request: Request, client: str) -> None:
    """Checks the upgrade, connects the desktop, answers 101, relays to the end."""
    version = request.header("sec-websocket-version")
    if version is None or version.strip() != "13":
        raise WrongWebSocketVersion("WebSocket version 13 required",
                                    "Sec-WebSocket-Version " + printable(version or "missing"))
    key = check_websocket_key(request.header("sec-websocket-key"))
    params = query_parameters(request.target)
    token = params.get("token", "")
    if not token:
        raise TokenRefused("missing token")
    grant = gateway.tokens.acquire(token)
    if grant is None:
        raise TokenRefused("unknown or expired token", f"token {token_hint(token)}")
    desktop = grant.desktop
    desktop_sock = None
    try:
        try:
            desktop_sock = socket.create_connection(desktop, timeout=DESKTOP_CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise DesktopUnavailable(
                "desktop unavailable",
                f"desktop {desktop[0]}:{desktop[1]} (token {token_hint(token)}): "
                f"{exc.strerror or exc}") from None
        desktop_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        subprotocol = choose_subprotocol(request)
        stream.send(handshake_response(key, subprotocol))
        tunnel = Tunnel(gateway.config, stream.sock, desktop_sock, client, desktop, token,
                        subprotocol, client_version(params), grant.life)
        gateway.tunnel_opened(tunnel)
        try:
            tunnel.run(bytes(stream.buffer))
        finally:
            gateway.tunnel_closed(tunnel)
    finally:
        gateway.tokens.release(token)
        if desktop_sock is not None:
            desktop_sock.close()


def _new_buffer(size: int, old=None, old_view: memoryview | None = None):
    """A desktop read buffer and its view, the old one (if any) given back.

    Large buffers are anonymous mappings: unmapped when the burst is over, their
    memory really goes back to the system. From malloc, freed 256 KiB blocks stay in
    the process (glibc raises its mmap threshold after the first free), so RSS kept
    every tunnel's largest buffer (tests/test_load.py measures it).
    """
    if old_view is not None:
        old_view.release()
    if isinstance(old, mmap.mmap):
        old.close()
    buf = bytearray(size) if size <= 64 * 1024 else mmap.mmap(-1, size)
    return buf, memoryview(buf)


class TunnelEnd:
    """Why a tunnel ended (the first reason noted wins), and the one way to end it:
    shutting both sockets down wakes every thread of the tunnel wherever it waits."""

    def __init__(self, client_sock: socket.socket, desktop_sock: socket.socket):
        self._lock = threading.Lock()
        self._sockets = (desktop_sock, client_sock)
        self.reason: str | None = None
        self.ended = False

    def note(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason

    def end(self, reason: str) -> None:
        self.note(reason)
        with self._lock:
            if self.ended:
                return
            self.ended = True
        for sock in self._sockets:
            _hard_shutdown(sock)


class ClientWriter:
    """The one way bytes reach a tunnel's client: whole frames, in order, bounded.

    Over TLS a write that would block must be retried with the same bytes: one given
    up half-way makes OpenSSL send the rest of its record in place of the next
    frame's first bytes, and the client reads garbage. So a thread that starts a
    frame finishes it, or ends the tunnel, and no other thread writes meanwhile:
    that thread holds `_writing`.

    The down thread writes data frames. Ping, Pong and Close, from any thread, are
    queued and go out between data frames, written by the thread that holds
    `_writing` when they are queued (the down thread, after its current frame), or
    at once by the queuing thread if nobody is writing. Nothing follows our Close.
    A client that accepts no byte for `stall_timeout_s` while a frame waits for it
    ends the tunnel: `client not reading`.
    """

    def __init__(self, sock: socket.socket, tls_lock: threading.Lock, stall_timeout_s: float,
                 end: TunnelEnd):
        self._sock = sock
        self._tls_lock = tls_lock
        self._stall_timeout_s = stall_timeout_s
        self._end = end
        self._writing = threading.Lock()
        self._queue_lock = threading.Lock()   # the queue and the two flags below
        self._queue: collections.deque[tuple[Opcode, bytes]] = collections.deque()
        self._ping_queued = False
        self.closing = False           # our Close is queued or out: nothing after it
        self.ping_out_at: float | None = None   # last byte of our last Ping handed over
        self.close_out_at: float | None = None  # last byte of our Close handed over

    # -- any thread --------------------------------------------------------------------

    def queue(self, opcode: Opcode, payload: bytes = b"", write: bool = True) -> None:
        """Queues a control frame; with `write`, writes it now if nobody is writing
        (waiting for the client at most `stall_timeout_s`)."""
        with self._queue_lock:
            if self.closing or (opcode == Opcode.PING and self._ping_queued):
                return
            if opcode == Opcode.CLOSE:
                self.closing = True
            elif opcode == Opcode.PING:
                self._ping_queued = True
            self._queue.append((opcode, payload))
        if write:
            self.flush()

    def queue_close(self, code: int | None, reason: str = "", write: bool = True) -> None:
        self.queue(Opcode.CLOSE, close_payload(code, reason), write)

    def flush(self, deadline: float | None = None) -> None:
        """Writes the queued control frames unless another thread is writing (which
        then writes them itself after its current frame). A frame not out by
        `deadline` ends the tunnel: nothing may follow a frame left half-written."""
        while self._queue and self._writing.acquire(blocking=False):
            try:
                self._write_queued(deadline)
            finally:
                self._writing.release()
            # Loop: a frame queued after our last look but before the release found
            # `_writing` taken and left the writing to us.

    @property
    def writing(self) -> bool:
        """Some thread is writing a frame now."""
        return self._writing.locked()

    def desktop_gone(self) -> None:
        """The desktop has gone: what is left for the client is delivered while it
        keeps taking bytes, but a client frozen for GRACE_S is not waited for."""
        self._stall_timeout_s = min(self._stall_timeout_s, GRACE_S)

    def wait_idle(self, timeout_s: float) -> None:
        """Waits (at most timeout_s) until no frame is being written, so that what was
        queued before is out, or the tunnel ended."""
        if self._writing.acquire(timeout=timeout_s):
            self._writing.release()

    # -- the down thread ---------------------------------------------------------------

    def send_data(self, frames) -> bool:
        """Writes whole data frames (and the control frames queued meanwhile); False
        when the tunnel is over or closing, so that the caller stops."""
        deadline = time.monotonic() + self._stall_timeout_s + 1
        while not self._writing.acquire(timeout=1.0):
            # The holder's own writes are bounded by the stall timeout; this is a
            # second bound, should it be stuck elsewhere.
            if self._end.ended or time.monotonic() > deadline:
                return False
        try:
            if not self._write_queued() or self.closing:
                return False
            return self._write_whole(frames) and self._write_queued()
        finally:
            self._writing.release()
            self.flush()

    # -- the holder of _writing only ---------------------------------------------------

    def _write_queued(self, deadline: float | None = None) -> bool:
        while self._queue:
            with self._queue_lock:
                opcode, payload = self._queue.popleft()
                if opcode == Opcode.PING:
                    self._ping_queued = False
            if not self._write_whole(encode_frame(opcode, payload), deadline):
                return False
            # Out from when its last byte is handed over (PROTOCOL.md); the up thread
            # clears it when the client is heard from.
            if opcode == Opcode.PING and self.ping_out_at is None:
                self.ping_out_at = time.monotonic()
            elif opcode == Opcode.CLOSE:
                self.close_out_at = time.monotonic()
        return True

    def _write_whole(self, data, deadline: float | None = None) -> bool:
        """Hands every byte of `data` to the socket; False if the tunnel ended.
        Waits for the client at most `stall_timeout_s` without progress, or until
        `deadline`; then ends the tunnel."""
        view = memoryview(data)
        stalled_since: float | None = None
        while view.nbytes:
            if self._end.ended:
                return False
            try:
                with self._tls_lock:
                    sent = self._sock.send(view)
            except ssl.SSLWantReadError:
                sent, event = 0, select.POLLIN
            except _WOULD_BLOCK:
                sent, event = 0, select.POLLOUT
            except OSError as exc:
                self._end.end(f"client connection lost: {exc.strerror or exc}")
                return False
            if sent:
                view = view[sent:]
                stalled_since = None
                continue
            now = time.monotonic()
            if stalled_since is None:
                stalled_since = now
            remaining = stalled_since + self._stall_timeout_s - now
            if deadline is not None and deadline - now < remaining:
                remaining = deadline - now
            if remaining <= 0:
                self._end.end(f"client not reading: no byte accepted in "
                              f"{self._stall_timeout_s:g} s")
                return False
            if event == select.POLLIN:
                # TLS wants to read first; the up thread reads, so look again soon.
                _wait(self._sock, select.POLLIN, min(remaining, WANT_READ_WAIT_S))
            # At most a second at a time: desktop_gone() may shorten the timeout.
            elif _wait(self._sock, select.POLLOUT, min(remaining, 1.0)) & select.POLLOUT:
                stalled_since = None   # room again: the client took bytes
        return True


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's send queue that the peer has not acknowledged yet."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return 0


class CloseLinger:
    """After our Close is out, how long to wait for the client's Close answer.

    Until the client has taken every byte (our send queue is empty), then
    CLOSE_LINGER_S after that or after the client's last byte (counted for GRACE_S at
    most, so that an upload going on does not hold the tunnel), whichever is later.
    Closing earlier, a slow client still reading its backlog would answer a Ping into
    a closed socket, get a reset, and lose what it had not read. A send queue that
    does not shrink for GRACE_S means the client is not reading.
    """

    def __init__(self, sock: socket.socket, close_at: float):
        self._sock = sock
        self._queued = -1
        self._progress_at = close_at

    def check(self, now: float, heard_at: float) -> tuple[float, str | None]:
        """(when to look again, None) or (now, why the tunnel ends now)."""
        queued = unsent_bytes(self._sock)
        if queued != self._queued:
            self._queued, self._progress_at = queued, now
        if queued:
            if now - self._progress_at >= GRACE_S:
                return now, f"client not reading: no byte accepted in {GRACE_S:g} s"
            return now + 0.5, None
        heard = min(heard_at, self._progress_at + GRACE_S)
        end_by = max(self._progress_at, heard) + CLOSE_LINGER_S
        return (now, "no Close answer from the client") if now >= end_by else (end_by, None)


class Tunnel:
    """One WebSocket tunnel: the client's socket and the desktop's, two relay threads.

    The connection thread runs the client -> desktop relay (run()), a second thread
    the desktop -> client relay. Sockets are owned (closed) by serve_connection and
    serve_tunnel; the tunnel only shuts them down to wake its threads.
    """

    def __init__(self, config: Config, client_sock: socket.socket, desktop_sock: socket.socket,
                 client: str, desktop: tuple[str, int], token: str,
                 subprotocol: str | None, version: int, life: ClientLife):
        self.config = config
        self.client_sock = client_sock
        self.desktop_sock = desktop_sock
        self.client = client
        self.desktop = desktop
        self.token = token
        self.subprotocol = subprotocol
        self.version = version
        self.life = life
        # Clients without ver >= 2 do not answer Pings: they never get one.
        self.keepalive_s = config.keepalive_s if version >= 2 else 0
        self.started = time.monotonic()
        self.bytes_up = 0      # client -> desktop payload bytes
        self.bytes_down = 0    # desktop -> client payload bytes
        self._tls_lock = threading.Lock()    # every call on client_sock
        self._end = TunnelEnd(client_sock, desktop_sock)
        self.writer = ClientWriter(client_sock, self._tls_lock,
                                   config.client_stall_timeout_s, self._end)
        self._pending = getattr(client_sock, "pending", None)
        self._stopping = False

    @property
    def ended(self) -> bool:
        return self._end.ended

    def stop(self, code: int, reason: str) -> None:
        """From the main thread (SIGTERM), without waiting: our Close goes out through
        the down thread, which the desktop socket's shutdown wakes; it then ends the
        tunnel at once (the process is about to exit: no waiting for the answer)."""
        self._stopping = True
        self._end.note(reason)
        self.writer.queue_close(code, reason, write=False)
        _hard_shutdown(self.desktop_sock)

    def _close_and_end(self, code: int | None, text: str, why: str) -> None:
        """From the up thread: our Close (after the frame being written, if any),
        within CLOSE_LINGER_S, then the end."""
        self._end.note(why)
        self.writer.queue_close(code, text, write=False)
        self.writer.flush(deadline=time.monotonic() + CLOSE_LINGER_S)
        self.writer.wait_idle(CLOSE_LINGER_S)
        self._end.end(why)

    def run(self, early: bytes) -> None:
        self.client_sock.setblocking(False)
        self.desktop_sock.setblocking(False)
        down = threading.Thread(target=self._relay_down,
                                name=threading.current_thread().name + "-down", daemon=True)
        log.debug("%s: tunnel to %s:%d open (token %s, subprotocol %s, ver %d)", self.client,
                  self.desktop[0], self.desktop[1], token_hint(self.token),
                  self.subprotocol or "none", self.version)
        down.start()
        try:
            self._relay_up(early)
        except Exception as exc:   # a bug must not leave the desktop connected
            log.exception("%s: tunnel relay failed", self.client)
            self._end.end(f"internal error: {exc}")
        finally:
            self._end.end("tunnel closed")
            down.join(GRACE_S + CLOSE_LINGER_S)
            log.info("tunnel ended: client %s, desktop %s:%d, token %s, %d bytes up, "
                     "%d bytes down, %.1f s: %s", self.client, self.desktop[0], self.desktop[1],
                     token_hint(self.token), self.bytes_up, self.bytes_down,
                     time.monotonic() - self.started, self._end.reason)

    # -- the connection thread: client -> desktop ------------------------------------

    def _relay_up(self, early: bytes) -> None:
        pong_timeout_s = self.config.pong_timeout_s
        keepalive = self.keepalive_s
        writer = self.writer
        life = self.life
        decoder = FrameDecoder(base64_text=self.subprotocol == "base64")
        poller = select.poll()
        poller.register(self.client_sock, select.POLLIN)
        poller.register(self.desktop_sock, _HANGUP)   # desktop gone while we wait
        next_ping = time.monotonic() + keepalive if keepalive else None
        desktop_gone = False
        linger: CloseLinger | None = None
        heard_at = 0.0
        data = early
        drained = False   # the last read took everything: wait before reading again
        while not self._end.ended:
            if linger is None and writer.close_out_at is not None:
                # The down thread's Close is out (desktop gone, SIGTERM): from now on
                # only the client's answer is awaited, whatever else it still sends.
                linger = CloseLinger(self.client_sock, writer.close_out_at)
            if linger is not None:
                look_again, why = linger.check(time.monotonic(), heard_at)
                if why:
                    self._end.end(why)
                    return
            if not data:
                data, drained = (None, False) if drained else self._read_client()
            if data is not None:
                if not data:
                    self._end.end("client disconnected without a Close")
                    return
                # Any byte from the client is a sign of life, on this tunnel or another.
                life.heard_at = heard_at = time.monotonic()
                writer.ping_out_at = None
                if self._handle_client_bytes(decoder, data):
                    return
                data = b""
                continue
            # Nothing to read now: wait for the client, the desktop's hang-up or a timer.
            ping_at = writer.ping_out_at
            if ping_at is not None and life.heard_at >= ping_at:   # heard on another tunnel
                writer.ping_out_at = ping_at = None
            pong_due = None if ping_at is None else ping_at + pong_timeout_s
            if linger is None:
                # Desktop gone: the down thread delivers what it sent, then our Close
                # (the writer bounds that by the client's progress); look for it soon.
                look_again = time.monotonic() + 0.5 if desktop_gone or writer.closing else None
            timers = [t for t in (next_ping, pong_due, look_again) if t is not None]
            timeout_ms = (max(0, int((min(timers) - time.monotonic()) * 1000)) + 1
                          if timers else None)
            for fd, event in poller.poll(timeout_ms):
                if fd != self.client_sock.fileno() and event & _HANGUP:
                    poller.unregister(self.desktop_sock)
                    desktop_gone = True
                    writer.desktop_gone()
            now = time.monotonic()
            if (pong_due is not None and now >= pong_due and writer.ping_out_at is not None
                    and life.heard_at < writer.ping_out_at):
                self._close_and_end(CloseReason.GOING_AWAY, "ping timeout",
                                    f"no answer to Ping within {pong_timeout_s:g} s")
                return
            if next_ping is not None and now >= next_ping:
                writer.queue(Opcode.PING, PING_PAYLOAD)
                next_ping = now + keepalive

    def _read_client(self):
        """(decrypted bytes, drained): bytes None if none are ready, b"" at EOF.

        One SSL read returns at most one TLS record (16 KiB); reading on until
        CLIENT_READ_BYTES or nothing is left makes fewer, larger trips through the
        decoder. A short read with nothing pending in OpenSSL most likely emptied the
        socket: `drained` then sends the caller to poll() rather than to a read that
        fails (interactive channels save a system call and an exception per message).
        Fresh bytes objects, not a buffer kept per tunnel: an idle tunnel then holds
        no memory for reading (1,000 tunnels x 256 KiB would be 250 MiB).
        """
        chunks = []
        size = 0
        drained = False
        full = 16384 if self._pending else 65536   # a TLS record, or one plain read
        with self._tls_lock:
            while size < CLIENT_READ_BYTES:
                try:
                    chunk = self.client_sock.recv(65536)
                except _WOULD_BLOCK:
                    drained = True
                    break
                except OSError as exc:
                    if size:
                        break   # deliver what arrived; the error comes again next read
                    self._end.end(f"client connection lost: {exc.strerror or exc}")
                    return b"", True
                if not chunk:
                    if size:
                        break
                    return b"", True
                chunks.append(chunk)
                size += len(chunk)
                if len(chunk) < full and not (self._pending and self._pending()):
                    drained = True
                    break
        if not chunks:
            return None, False
        return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), drained

    def _handle_client_bytes(self, decoder: FrameDecoder, data: bytes) -> bool:
        """Acts on decoded events; True when the tunnel is over."""
        for event in decoder.feed(data):
            kind = event.kind
            if kind is EventKind.DATA:
                if not self.writer.closing:
                    self._send_to_desktop(event.payload)
            elif kind is EventKind.PING:
                self.writer.queue(Opcode.PONG, event.payload)
            elif kind is EventKind.CLOSE:
                code = event.code
                self._close_and_end(code, "", "client closed" + (f" ({code})" if code else ""))
                return True
            elif kind is EventKind.ERROR:
                self._close_and_end(event.code, event.reason[:100],
                                    f"client broke the protocol: {event.reason}")
                return True
            if self._end.ended:
                return True
        return False

    def _send_to_desktop(self, data: bytes) -> None:
        view = memoryview(data)
        keepalive = self.keepalive_s
        next_ping = None
        while view.nbytes and not self._end.ended:
            try:
                sent = self.desktop_sock.send(view)
            except _WOULD_BLOCK:
                sent = 0
            except OSError as exc:
                self._close_and_end(CloseReason.INTERNAL_ERROR, "desktop connection lost",
                                    f"desktop connection lost: {exc.strerror or exc}")
                return
            if sent:
                view = view[sent:]
                self.bytes_up += sent
                next_ping = None
                continue
            _wait(self.desktop_sock, select.POLLOUT, 1.0)
            # The desktop is not reading, so neither do we read the client: a client
            # that went away meanwhile is seen only when we write to it (its kernel
            # answers a closed connection with a reset). Keep pinging; no Pong is
            # awaited, it would wait unread behind the upload.
            now = time.monotonic()
            if keepalive and next_ping is None:
                next_ping = now + keepalive
            elif keepalive and now >= next_ping:
                self.writer.queue(Opcode.PING, PING_PAYLOAD)
                next_ping = now + keepalive

    # -- the down thread: desktop -> client ------------------------------------------

    def _relay_down(self) -> None:
        try:
            self._relay_down_loop()
        except Exception as exc:
            log.exception("%s: tunnel relay (down) failed", self.client)
            self._end.end(f"internal error: {exc}")

    def _relay_down_loop(self) -> None:
        writer = self.writer
        base64_mode = self.subprotocol == "base64"
        limit = (MAX_SEND_PAYLOAD // 4) * 3 if base64_mode else MAX_SEND_PAYLOAD
        batch_bytes = limit if base64_mode else DOWN_BATCH_FRAMES * (limit + 4)
        small = 10 + min(limit, SMALL_READ_BYTES)
        # Interactive channels (inputs, cursor) move a few bytes at a time: their
        # buffer stays small. One that fills it gets a full frame's worth, and one
        # that fills a full frame gets room for a batch of frames (gather_frames);
        # a desktop quiet for BUFFER_IDLE_S gets the small one back.
        buf, view = _new_buffer(small)
        poller = select.poll()
        poller.register(self.desktop_sock, select.POLLIN)
        poller.register(self.client_sock, _HANGUP)   # client gone while the desktop is silent
        client_gone_at: float | None = None
        drained = False   # the last read was short: wait before reading again
        while not self._end.ended:
            if writer.closing:   # SIGTERM, or the up thread is closing: no more data
                self._stop_relaying_down()
                return
            try:
                if drained:
                    drained = False
                    raise BlockingIOError   # go to poll() without a failing read
                size = self.desktop_sock.recv_into(view[10:10 + limit])
            except _WOULD_BLOCK:
                if client_gone_at is not None:
                    timeout = max(0.0, client_gone_at + GRACE_S - time.monotonic())
                else:
                    timeout = BUFFER_IDLE_S if len(buf) > small else None
                ready = poller.poll(None if timeout is None else int(timeout * 1000) + 1)
                for fd, event in ready:
                    if fd == self.client_sock.fileno() and event & _HANGUP:
                        poller.unregister(self.client_sock)
                        client_gone_at = time.monotonic()
                if client_gone_at is not None and time.monotonic() >= client_gone_at + GRACE_S:
                    self._end.end("client disconnected")
                elif not ready and len(buf) > small:
                    buf, view = _new_buffer(small, buf, view)   # the burst is over
                continue
            except OSError as exc:
                self._desktop_lost(exc)
                return
            if size == 0:
                # Every byte the desktop sent has been delivered: now Close 1000,
                # and the up thread waits a moment for the client's answer.
                self._desktop_gone(CloseReason.NORMAL_CLOSURE, "desktop closed",
                                   "desktop closed")
                return
            error = None
            if base64_mode:
                frames = encode_frame(Opcode.TEXT, base64.b64encode(view[10:10 + size]))
                total = size
            else:
                header = frame_header(Opcode.BINARY, size)
                start = 10 - len(header)
                buf[start:10] = header
                end, total, size, error = gather_frames(self.desktop_sock, buf, view, size, limit)
                frames = view[start:end]
            if not writer.send_data(frames):
                self._stop_relaying_down()
                return
            self.bytes_down += total
            if error is not None:
                self._desktop_lost(error)
                return
            capacity = min(limit, len(buf) - 10)   # of one read
            drained = size < capacity
            if size == capacity and len(buf) < 10 + batch_bytes:
                # A full frame next, then room for a whole batch.
                buf, view = _new_buffer(10 + (limit if capacity < limit else batch_bytes),
                                        buf, view)

    def _desktop_lost(self, exc: OSError) -> None:
        self._desktop_gone(CloseReason.INTERNAL_ERROR, "desktop connection lost",
                           f"desktop connection lost: {exc.strerror or exc}")

    def _desktop_gone(self, code: CloseReason, text: str, why: str) -> None:
        """Our Close after what the desktop sent; the desktop socket's shutdown then
        wakes the up thread, which waits for the client's answer."""
        self._end.note(why)
        self.writer.desktop_gone()
        self.writer.queue_close(code, text)
        _hard_shutdown(self.desktop_sock)

    def _stop_relaying_down(self) -> None:
        """The writer is closing: our Close goes out (it may be queued behind the frame
        that was being written); at SIGTERM the tunnel then ends without waiting."""
        self.writer.flush()
        if self._stopping:
            self._end.end("gateway stopping")


# =====================================================================================
# Operation: --check-config and main()
# =====================================================================================

def check_config(path: str, out=sys.stdout) -> int:
    """One line per check; the number of failed checks (0 = all good)."""
    failures = 0

    def report(name: str, ok: bool, text: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"{name}: {'OK' if ok else 'FAIL'}: {text}", file=out)

    try:
        config = load_config(path)
    except ConfigError as exc:
        report("configuration", False, str(exc))
        return failures
    report("configuration", True, path)
    if not os.path.exists(config.cert_file):
        problem = _cannot_create(config.cert_file) or _cannot_create(config.key_file)
        report("certificate", not problem, f"{config.cert_file} does not exist yet; " + (
            f"a self-signed one cannot be created: {problem}" if problem
            else "a self-signed one will be created at start"))
    else:
        try:
            make_server_tls_context(config.cert_file, config.key_file)
            report("certificate", True, f"{config.cert_file} and its key load and match")
        except (OSError, ssl.SSLError) as exc:
            report("certificate", False, f"{config.cert_file} / {config.key_file}: {exc}")
    if config.manager_address:
        probe = Request("POST", "/vdi/authmode", "1.1",
                        [("host", "flexvdi-gateway-check"),
                         ("content-type", "application/json")])
        body = json.dumps({"hwaddress": "flexvdi-gateway-check"}).encode()
        try:
            status, _, _, answer = forward_to_manager(config, config.manager_address, probe,
                                                      "/vdi/authmode", body, "127.0.0.1:0", True)
            try:
                answer_status = json.loads(answer).get("status")
            except (ValueError, AttributeError):
                answer_status = None
            report("manager", status == 200 and answer_status is not None,
                   f"{config.manager_address} answered HTTP {status}, status "
                   f"{json.dumps(answer_status)}")
        except ManagerUnavailable as exc:
            report("manager", False, exc.detail)
    else:
        # Only a directory without fallback can do without ManagerIP.
        ok = config.ldap_enabled and not config.ldap_fallback
        report("manager", ok, "ManagerIP is not set" + (
            "; every user's manager comes from the directory" if ok
            else ": /vdi/ requests would get an Error answer"))
    if config.ldap_enabled:
        try:
            LdapDirectory(config).connect().unbind()
            report("directory", True, f"bind to {config.ldap_server} as "
                   f"{config.ldap_username or 'anonymous'} works")
        except DirectoryUnavailable as exc:
            report("directory", False, str(exc))
    return failures


def _cannot_create(path: str) -> str:
    """Why ensure_certificate() could not create `path` ("" if it looks possible)."""
    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(directory):
        directory = os.path.dirname(directory)
    if not os.path.isdir(directory):
        return f"{directory} is not a directory"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{directory} is not writable"
    return ""


def _log_handler(to_stderr: bool) -> logging.Handler:
    if not to_stderr and os.path.exists("/dev/log"):
        try:
            handler: logging.Handler = logging.handlers.SysLogHandler(
                address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            handler.ident = "flexvdi-gateway: "  # type: ignore[attr-defined]
            handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
            return handler
        except OSError:
            pass
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s flexvdi-gateway %(levelname)s [%(threadName)s] %(message)s"))
    return handler


class _SignalPipe:
    """The signals main() waits for, read from a self-pipe (signal.set_wakeup_fd)."""

    def __init__(self, signums: tuple[int, ...]):
        self._read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        # A full pipe just drops the byte: a burst of one signal is one event anyway.
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in signums:
            signal.signal(signum, _no_op_handler)

    def wait(self) -> set[int]:
        """Blocks until a signal arrives; returns every signal received by then."""
        data = os.read(self._read_fd, 4096)
        return {signal.Signals(number) for number in data}


def _no_op_handler(signum, frame) -> None:
    """The work happens in main(), woken through the pipe."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flexvdi-gateway",
                                     description="flexVDI Gateway: the public entry point "
                                                 "of a flexVDI platform")
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH,
                        help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--stderr", action="store_true",
                        help="log to standard error instead of syslog")
    parser.add_argument("--check-config", action="store_true",
                        help="check the configuration, certificate, manager and directory")
    parser.add_argument("--version", action="version", version=__version__)
    args = parser.parse_args(argv)

    handler = _log_handler(args.stderr or args.check_config)
    logging.getLogger().addHandler(handler)
    log.setLevel(logging.INFO)
    if args.check_config:
        return 1 if check_config(args.config) else 0
    # Signals first: a reload or stop during start-up must not kill the process. They
    # only write their number to a pipe (the C-level handler behind set_wakeup_fd);
    # the Python-level handler does nothing. A handler that took a lock, like
    # Event.set(), could deadlock: it runs in the main thread, which may hold it.
    signals = _SignalPipe((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    try:
        config = load_config(args.config)
        if config.debug:
            log.setLevel(logging.DEBUG)
        gateway = Gateway(config)
        gateway.load_tls()
        threading.stack_size(THREAD_STACK_BYTES)
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        servers = open_listeners(gateway)
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        if not isinstance(handler, logging.StreamHandler):   # syslog: say it on stderr too
            print(f"flexvdi-gateway: cannot start: {exc}", file=sys.stderr)
        return 2
    if not config.manager_address and not config.ldap_enabled:
        log.warning("ManagerIP is empty: /vdi/ requests get an Error answer until it is set")

    for server in servers:
        name = "listener-tls" if server.tls else "listener-plain"
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                         name=name, daemon=True).start()
        log.info("listening on %s port %d (%s)", server.server_address[0],
                 server.server_address[1], "TLS" if server.tls else "plain HTTP")
    while True:
        received = signals.wait()
        if signal.SIGHUP in received:   # a burst of SIGHUPs is one reload
            try:
                gateway.load_tls(create=False)   # a file gone at reload is an error
                log.info("reloaded certificate and key from %s", config.cert_file)
            except ConfigError as exc:
                log.error("reload failed, keeping the old certificate: %s", exc)
        if received & {signal.SIGTERM, signal.SIGINT}:
            break
    log.info("stopping: closing listeners and %d tunnels", gateway.open_tunnels)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for server in servers:
        server.shutdown()
        server.server_close()
    gateway.stop_tunnels(timeout_s=deadline - time.monotonic())
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
