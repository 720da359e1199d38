"""The README's two commands on a fresh Debian 12 machine, as a new user runs them.

The machine is a root made by `debootstrap --variant=minbase
--include=python3,git,ca-certificates,curl bookworm` (a minimal server: no pip, no venv),
made once and cached as a tarball under /var/cache/flexvdi-gateway-tests/, and unpacked
anew for each run. The checkout goes in as a `git clone` of this repository with its
working tree laid over it (tracked files as they are now, plus new files that git does
not ignore): what is tested is what `git add -A` would commit. Every command runs as root
through `chroot`, inside a private mount namespace (`unshare --mount`) that holds the
root's /proc, /sys, /dev/pts and /dev/shm, so no mount outlives the command or shows on
the host.

What the host needs to reach the package registries goes in too, read from the host's
own configuration at run time: its Debian mirror (apt sources), apt's proxy and validity
settings, pip's network index settings, proxy variables, and the CA certificates added
under /usr/local/share/ca-certificates (for a TLS-intercepting proxy). Besides those, the
root gets only what a real machine has and a bare debootstrap lacks: /etc/hosts, the
host's /etc/resolv.conf, and a policy-rc.d that keeps package scripts from starting
services (nginx) that would outlive the command on the host's network.

The first command must start the gateway, in the foreground: it runs in the background
here until POST /vdi/authmode answers JSON on examples/quickstart.conf's port, then its
process group is ended and nothing may be left running in the root. The second (`bash
.ci/run`) runs a few quick test files there, picked through PYTEST_ADDOPTS. Each runs a
second time, which must reuse the venv and install no package.

Slow (several minutes, mostly apt and pip), root only.
"""

import fcntl
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
QUICKSTART_CONF = REPO / "examples" / "quickstart.conf"
CACHE = Path("/var/cache/flexvdi-gateway-tests")
SUITE = "bookworm"
INCLUDE = "python3,git,ca-certificates,curl"
CHECKOUT = "/root/flexvdi-gateway"  # the clone, inside the root
INSIDE = "FLEXVDI_GATEWAY_FRESH_ROOT"  # set for everything that runs in the root
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The second command runs these in the root: rpm, systemd-analyze, slapd, a venv of
# its own and real gateways. Never this file: it is slow, and skips itself there.
INNER_TESTS = '-m "not slow" -k "test_packaging or test_slapd_fixture or test_flow"'
INNER_TESTS_AGAIN = '-m "not slow" -k test_packaging'

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get(INSIDE) == "1", reason="already in the fresh root"),
]


def run(cmd, timeout, **kw):
    return subprocess.run([str(c) for c in cmd], check=False, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                          errors="replace", timeout=timeout, **kw)


def tail(text, lines=60):
    return "\n".join(text.splitlines()[-lines:])


def readme_commands():
    """The README's two commands: its first two code lines before its first section."""
    commands = []
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            break
        if line.startswith("    ") and line.strip():
            commands.append(line.strip())
    assert len(commands) >= 2, f"README.md: two commands before the first section? {commands}"
    return commands[:2]


# ------------------------------------------------------------ the host's configuration


def host_debian_mirror():
    """The host's Debian mirror: the first apt source of a main suite with 'main'."""
    entries = []  # (types, uri, suites, components)
    files = sorted(Path("/etc/apt/sources.list.d").glob("*"))
    if Path("/etc/apt/sources.list").exists():
        files.insert(0, Path("/etc/apt/sources.list"))
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.split()
                if fields.get("enabled") != ["no"]:
                    entries.extend((fields.get("types", []), uri, fields.get("suites", []),
                                    fields.get("components", []))
                                   for uri in fields.get("uris", []))
        elif path.suffix == ".list":
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
                if len(words) >= 4:
                    entries.append(([words[0]], words[1], [words[2]], words[3:]))
    for types, uri, suites, components in entries:
        # bookworm-updates and bookworm-security live elsewhere or hold only updates.
        if "deb" in types and "main" in components and any("-" not in s for s in suites):
            return uri
    return None


def host_apt_settings():
    """apt's settings for reaching the mirror: proxies and the Release file checks."""
    r = run(["apt-config", "dump"], timeout=60)
    return [line for line in r.stdout.splitlines()
            if re.match(r"Acquire::((https?|ftp)::Proxy|Check-Valid-Until|Check-Date)\b", line)]


def host_pip_settings():
    """pip's index settings on the host that reach a network index (not file://)."""
    r = run([sys.executable, "-m", "pip", "config", "list"], timeout=60)
    settings = {}
    for line in r.stdout.splitlines():
        m = re.match(r"[^.]+\.(index-url|extra-index-url|trusted-host)='(.*)'$", line)
        if m:
            settings[m.group(1)] = m.group(2)  # later lines are the stronger sources
    for key in ("index-url", "extra-index-url"):
        urls = [u for u in settings.get(key, "").split() if re.match(r"https?://", u)]
        if urls:
            settings[key] = " ".join(urls)
        else:
            settings.pop(key, None)
    return settings


def proxy_environment():
    return {k: v for k, v in os.environ.items()
            if k.lower() in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")}


# ------------------------------------------------------------ the root


def mounts_under(path):
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [line.split()[4] for line in f if (line.split()[4] + "/").startswith(prefix)]


def processes_in(root):
    """PIDs of processes whose root directory is `root` (or below it)."""
    root = str(root).rstrip("/")
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                where = os.readlink(f"/proc/{entry}/root")
            except OSError:
                continue
            if where == root or where.startswith(root + "/"):
                found.append(int(entry))
    return found


def left_running(root, seconds=15):
    """What still runs in `root` once `seconds` have passed (or at once when nothing)."""
    deadline = time.monotonic() + seconds
    while processes_in(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    return describe(processes_in(root))


def describe(pids):
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
            out.append(f"{pid}: {command}")
        except OSError:
            out.append(f"{pid}: (gone)")
    return "\n".join(out)


def remove_root(path):
    """Removes a root once nothing is mounted in it and nothing runs in it."""
    for pid in processes_in(path):  # ours: they run in a root that this test made
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    left_running(path, 10)
    if mounts_under(path) or processes_in(path):
        raise AssertionError(f"{path} left in place: still mounted or in use "
                             f"({mounts_under(path)}, {processes_in(path)})")
    shutil.rmtree(path)


def in_namespace(argv):
    """`argv` in a private mount namespace: whatever it mounts vanishes with it."""
    return ["unshare", "--mount", "--propagation", "private", *argv]


def pristine_root_tarball(mirror):
    """The debootstrap root as a tarball, made on the first call on this machine."""
    key = hashlib.sha256(f"{SUITE} minbase {INCLUDE} {mirror}".encode()).hexdigest()[:12]
    tarball = CACHE / f"debian-{SUITE}-minbase-{key}.tar"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        deadline = time.monotonic() + 1200
        while True:  # another run on this machine may be making it right now
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{CACHE}/lock held for 20 minutes"
                time.sleep(1)
        if tarball.exists():
            return tarball, 0.0
        started = time.monotonic()
        build = Path(tempfile.mkdtemp(dir=CACHE, prefix="debootstrap-"))
        try:
            build.chmod(0o755)
            r = run(in_namespace(["debootstrap", "--variant=minbase", f"--include={INCLUDE}",
                                  SUITE, build, mirror]), timeout=1200)
            assert r.returncode == 0, "debootstrap failed:\n" + tail(r.stdout)
            part = tarball.with_suffix(".part")
            r = run(["tar", "--numeric-owner", "-C", build, "-cf", part, "."], timeout=600)
            assert r.returncode == 0, r.stdout
            os.replace(part, tarball)
        finally:
            remove_root(build)
        return tarball, time.monotonic() - started


def prepare_root(root, tarball):
    r = run(["tar", "--numeric-owner", "-C", root, "-xpf", tarball], timeout=600)
    assert r.returncode == 0, r.stdout
    root.chmod(0o755)  # as / is (mkdtemp made it 0700): apt downloads as the user _apt
    etc = root / "etc"
    if os.path.exists("/etc/resolv.conf"):
        shutil.copyfile("/etc/resolv.conf", etc / "resolv.conf")
    if not (etc / "hosts").exists():
        (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost "
                                   "ip6-loopback\n", encoding="utf-8")
    policy = root / "usr" / "sbin" / "policy-rc.d"
    policy.write_text("#!/bin/sh\n# No service starts in this chroot.\nexit 101\n",
                      encoding="utf-8")
    policy.chmod(0o755)
    apt = host_apt_settings()
    if apt:
        (etc / "apt" / "apt.conf.d" / "90host-network").write_text(
            "".join(line + "\n" for line in apt), encoding="utf-8")
    pip = host_pip_settings()
    if pip:
        (etc / "pip.conf").write_text(
            "[global]\n" + "".join(f"{k} = {v}\n" for k, v in pip.items()), encoding="utf-8")
    cas = Path("/usr/local/share/ca-certificates")
    if cas.is_dir() and any(cas.iterdir()):
        shutil.copytree(cas, root / cas.relative_to("/"), dirs_exist_ok=True)
        r = run(in_namespace(["chroot", root, "update-ca-certificates"]), timeout=120,
                env=root_environment())
        assert r.returncode == 0, r.stdout


def copy_checkout(dest):
    """A clone of this repository with its working tree over it (what `git add -A`
    would commit), so that uncommitted changes are tested too."""
    r = run(["git", "clone", "--quiet", "--no-hardlinks", REPO, dest], timeout=300)
    assert r.returncode == 0, r.stdout
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       cwd=REPO, capture_output=True, check=True, timeout=60)
    for name in filter(None, r.stdout.decode().split("\0")):
        source, target = REPO / name, dest / name
        if source.is_symlink() or source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.exists():
                target.unlink()
            shutil.copy2(source, target, follow_symlinks=False)
        elif not source.exists() and (target.is_symlink() or target.exists()):
            target.unlink()  # deleted in the working tree


def root_environment(**extra):
    env = {"PATH": ROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb", INSIDE: "1"}
    env.update(proxy_environment())
    env.update(extra)
    return env


class RootCommand:
    """One README command, run by bash in the root from the checkout, in a process
    group of its own, its output in a log file."""

    MOUNTS = ('mount -t proc proc "$0/proc" && mount -t sysfs -o ro sysfs "$0/sys" && '
              'mount -t devpts -o newinstance,ptmxmode=0666 devpts "$0/dev/pts" && '
              'mount -t tmpfs tmpfs "$0/dev/shm" && exec chroot "$0" /bin/bash -c "$1"')

    def __init__(self, root, command, log_path, **env):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            in_namespace(["sh", "-c", self.MOUNTS, str(root), f"cd {CHECKOUT} && {command}"]),
            env=root_environment(**env), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def output(self):
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout):
        """Exit status and seconds taken; ends the whole group on a timeout."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"still running after {timeout} s:\n{tail(self.output())}")
        return code, time.monotonic() - self.started

    def stop(self):
        for signum, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                continue
            try:  # the leader is gone: the rest of its group may not be
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
        self._log.close()


# ------------------------------------------------------------ the gateway


def quickstart_address():
    conf = json.loads(QUICKSTART_CONF.read_text(encoding="utf-8"))
    return conf.get("ListenIP") or "127.0.0.1", conf["SslPort"]


def port_is_free(host, port):
    """True when nothing listens there (TIME_WAIT leftovers do not count: the gateway
    binds with SO_REUSEADDR too)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            return True
        except OSError:
            return False


def authmode(host, port):
    """POST /vdi/authmode as a client does; the certificate is self-signed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection(host, port, timeout=60, context=context)
    try:
        connection.request("POST", "/vdi/authmode", json.dumps({"hwaddress": "fresh-root"}),
                           {"Content-Type": "text/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def quick_start(root, command, log_path, timeout):
    """Runs the first command until the gateway answers; returns (answer, seconds)."""
    host, port = quickstart_address()
    assert port_is_free(host, port), (
        f"{host}:{port}, the port of examples/quickstart.conf, is in use on this machine: "
        "the quick start cannot listen there")
    process = RootCommand(root, command, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.proc.poll() is not None:
                raise AssertionError(f"the first command ended (exit {process.proc.returncode}) "
                                     f"without a gateway answering:\n{tail(process.output())}")
            try:
                status, body = authmode(host, port)
                break
            except (OSError, http.client.HTTPException) as e:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no answer on {host}:{port} within {timeout} s "
                                         f"({e}):\n{tail(process.output())}") from None
                time.sleep(0.2)
        took = time.monotonic() - process.started
        assert status == 200, (status, body)
        answer = json.loads(body)
        assert isinstance(answer, dict) and "status" in answer, answer
    finally:
        process.stop()
    left = left_running(root)
    assert not left, "left running after the stop of its process group:\n" + left
    assert port_is_free(host, port), f"{host}:{port} still taken after the stop"
    return answer, took


def dpkg_log_size(root):
    log = root / "var" / "log" / "dpkg.log"
    return log.stat().st_size if log.exists() else 0


def system_python_has_project(root):
    """Files of the project or its dependencies in the root's system Python."""
    found = []
    for base in ("usr/lib", "usr/local/lib"):
        for site in (root / base).glob("python3*/*-packages"):
            found += [str(p) for p in site.iterdir()
                      if re.match(r"(flexvdi|ldap3|websockets)", p.name)]
    return found


# ------------------------------------------------------------ the test


@pytest.fixture
def fresh_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, chroot, mounts)")
    for tool in ("debootstrap", "unshare", "chroot", "git", "tar"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: apt-get install debootstrap)")
    mirror = host_debian_mirror()
    if mirror is None:
        pytest.skip("no Debian mirror in this host's apt sources")
    tarball, debootstrap_took = pristine_root_tarball(mirror)
    root = Path(tempfile.mkdtemp(prefix="flexvdi-fresh-root-"))
    try:
        prepare_root(root, tarball)
        copy_checkout(root / CHECKOUT.lstrip("/"))
        yield root, debootstrap_took
    finally:
        remove_root(root)


def test_readme_commands_on_a_fresh_debian_12_root(fresh_root, tmp_path):
    root, debootstrap_took = fresh_root
    first, second = readme_commands()
    checkout = root / CHECKOUT.lstrip("/")
    venv = checkout / ".venv"
    times = {"debootstrap (0: cached)": debootstrap_took}

    # The first command installs the gateway and starts it.
    _, times["first command"] = quick_start(root, first, tmp_path / "first-1.log", 900)
    assert (venv / "bin" / "flexvdi-gateway").is_file(), "no gateway in .venv/"
    assert not system_python_has_project(root), system_python_has_project(root)
    made = (venv / "pyvenv.cfg").stat()
    packages = dpkg_log_size(root)

    # Again: the same venv, no package installed.
    _, times["first command again"] = quick_start(root, first, tmp_path / "first-2.log", 300)
    assert (venv / "pyvenv.cfg").stat().st_ino == made.st_ino, "the venv was made anew"
    assert (venv / "pyvenv.cfg").stat().st_mtime_ns == made.st_mtime_ns
    assert dpkg_log_size(root) == packages, "the second run installed packages"

    # The second command installs what the tests need and runs them.
    for name, addopts, timeout in (("second command", INNER_TESTS, 1500),
                                   ("second command again", INNER_TESTS_AGAIN, 600)):
        packages = dpkg_log_size(root)
        log = tmp_path / f"{name.replace(' ', '-')}.log"
        process = RootCommand(root, second, log, PYTEST_ADDOPTS=addopts)
        try:
            code, times[name] = process.wait(timeout)
            left = left_running(root)
        finally:
            process.stop()
        output = process.output()
        assert not left, f"left running after {second!r}:\n{left}"
        assert code == 0, f"{second!r} failed (exit {code}):\n{tail(output, 100)}"
        assert re.search(r"^\d+ passed", output.splitlines()[-1]), tail(output)
        assert not re.search(r"\d+ (failed|error)", output.splitlines()[-1]), tail(output)
        if name.endswith("again"):
            assert (venv / "pyvenv.cfg").stat().st_ino == made.st_ino, "the venv was made anew"
            assert dpkg_log_size(root) == packages, "the second run installed packages"
    assert not system_python_has_project(root), system_python_has_project(root)

    print("".join(f"\n{k}: {v:.0f} s" for k, v in times.items()))
