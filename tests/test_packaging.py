"""Packaging and operations files: RPM spec, systemd unit, default config, setup.py.

Every external command runs with a timeout, so each test is bounded in time.
Nothing here imports flexvdi_gateway.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULE = REPO / "flexvdi_gateway.py"
UNIT = REPO / "flexvdi-gateway.service"
CONF = REPO / "flexvdi-gateway.conf"
SPEC = REPO / "flexvdi-gateway.spec"
SETUP = REPO / "setup.py"
VERSION = "1.0.0"

# The documented keys and defaults (PROTOCOL.md, "Configuration").
DEFAULTS = {
    "ManagerIP": "",
    "SslPort": 443,
    "FirstSpicePort": 5900,
    "LastSpicePort": 25900,
    "CertFile": "/etc/ssl/certs/flexvdi-agent",
    "KeyFile": "/etc/ssl/certs/flexvdi-agent",
    "KeepAlive": 0,
    "Debug": False,
    "ListenIP": "",
    "PlainPort": 0,
    "PongTimeout": 10,
    "LDAPServer": "",
    "LDAPPort": 389,
    "LDAPUsername": "",
    "LDAPPassword": "",
    "LDAPBaseDN": "",
    "LDAPSearchRDN": "",
    "LDAPAttribute": "",
    "LDAPOneShot": True,
    "LDAPFallback": True,
    "LDAPCacheSecs": 3600,
    "TokenTimeout": 300,
    "PublicAddress": "",
    "ManagerCAFile": "",
    "ManagerTimeout": 30,
    "LDAPUseSSL": False,
    "LDAPCAFile": "",
    "LDAPTimeout": 5,
    "ClientStallTimeout": 60,
}

PLACEHOLDER_MODULE = "def main():\n    return 0\n"


def run(cmd, timeout, **kw):
    env = dict(os.environ, SYSTEMD_PAGER="cat", SYSTEMD_COLORS="0", LC_ALL="C.UTF-8")
    env.update(kw.pop("env", {}))
    return subprocess.run(
        [str(c) for c in cmd],
        check=False,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
        env=env,
        **kw,
    )


def need(tool):
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian: apt-get install rpm systemd)")
    return path


# ---------------------------------------------------------------- config file


def test_conf_is_json_with_every_documented_default():
    conf = json.loads(CONF.read_text(encoding="utf-8"))
    assert isinstance(conf, dict)
    assert sorted(conf) == sorted(DEFAULTS), "keys differ from the documented ones"
    for key, expected in DEFAULTS.items():
        value = conf[key]
        # bool is an int in Python: compare the types as well as the values.
        assert type(value) is type(expected), (
            f"{key}: {value!r} is not a {type(expected).__name__}"
        )
        assert value == expected, f"{key}: {value!r} != documented {expected!r}"


# ---------------------------------------------------------------- systemd unit


def unit_settings():
    settings = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_has_the_required_settings():
    s = unit_settings()
    assert s["ExecStart"] == [
        "/usr/bin/flexvdi-gateway -c /etc/flexvdi/flexvdi-gateway.conf"
    ]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"]
    assert s["User"] == ["flexvdi-gateway"]
    assert s["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["ProtectSystem"] == ["strict"]
    assert s["PrivateTmp"] == ["yes"]
    # Syslog goes through /dev/log, an AF_UNIX socket.
    families = s["RestrictAddressFamilies"][0].split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert s["WantedBy"] == ["multi-user.target"]


def test_unit_verifies():
    need("systemd-analyze")
    r = run(["systemd-analyze", "verify", "--man=no", UNIT], timeout=60)
    problems = []
    for line in r.stdout.splitlines():
        if not line.strip():
            continue
        # Outside an installed system the command itself is absent: the only
        # complaint accepted.
        if not Path("/usr/bin/flexvdi-gateway").exists() and (
            "Command /usr/bin/flexvdi-gateway is not executable" in line
        ):
            continue
        problems.append(line)
    assert not problems, r.stdout


def test_unit_security_exposure_at_most_3():
    need("systemd-analyze")
    r = run(
        ["systemd-analyze", "security", "--no-pager", "--offline=true", UNIT],
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", r.stdout)
    assert m, f"no exposure level in the output (exit {r.returncode}):\n{r.stdout}"
    assert float(m.group(1)) <= 3.0, r.stdout


# ---------------------------------------------------------------- RPM


@pytest.fixture(scope="module")
def rpm_file(tmp_path_factory):
    need("rpmbuild")
    top = tmp_path_factory.mktemp("rpmtop")
    stage = tmp_path_factory.mktemp("rpmstage")
    src = stage / f"flexvdi-gateway-{VERSION}"
    src.mkdir()
    for path in (SETUP, UNIT, CONF, SPEC):
        shutil.copy2(path, src / path.name)
    # The package is what is checked here, not the module: stand-ins keep the
    # build possible while those files are still being written.
    for name, stub in (
        ("flexvdi_gateway.py", PLACEHOLDER_MODULE),
        ("README.md", "flexVDI Gateway\n"),
    ):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
        else:
            (src / name).write_text(stub, encoding="utf-8")
    sources = top / "SOURCES"
    sources.mkdir()
    with tarfile.open(sources / f"flexvdi-gateway-{VERSION}.tar.gz", "w:gz") as tar:
        tar.add(src, arcname=src.name)
    r = run(
        [
            "rpmbuild",
            "-bb",
            "--define",
            f"_topdir {top}",
            "--define",
            f"_tmppath {top}/tmp",
            SPEC,
        ],
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-5000:]
    rpms = sorted((top / "RPMS").rglob("*.rpm"))
    assert len(rpms) == 1, rpms
    return rpms[0]


def rpm_query(rpm_file, *args):
    # stderr apart: a warning there (e.g. about signatures) must not spoil the answer.
    r = subprocess.run(
        ["rpm", "-qp", *args, str(rpm_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_rpm_is_noarch(rpm_file):
    assert rpm_query(rpm_file, "--qf", "%{ARCH}") == "noarch"
    assert re.fullmatch(
        rf"flexvdi-gateway-{re.escape(VERSION)}-1\S*\.noarch\.rpm", rpm_file.name
    )


def test_rpm_file_list(rpm_file):
    files = rpm_query(rpm_file, "-l").split()
    assert "/usr/bin/flexvdi-gateway" in files
    assert "/usr/lib/systemd/system/flexvdi-gateway.service" in files
    assert "/etc/flexvdi/flexvdi-gateway.conf" in files
    assert any(
        re.fullmatch(r"/usr/lib/python3\.\d+/site-packages/flexvdi_gateway\.py", f)
        for f in files
    ), files


def test_rpm_config_file_is_noreplace_and_private(rpm_file):
    assert (
        "/etc/flexvdi/flexvdi-gateway.conf"
        in rpm_query(rpm_file, "--configfiles").split()
    )
    out = rpm_query(
        rpm_file,
        "--qf",
        "[%{FILENAMES} %{FILEFLAGS:fflags} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEMODES:perms}\n]",
    )
    line = next(
        ln
        for ln in out.splitlines()
        if ln.startswith("/etc/flexvdi/flexvdi-gateway.conf ")
    )
    _, flags, owner, perms = line.split()
    assert "c" in flags and "n" in flags, line  # %config(noreplace)
    assert owner == "root:flexvdi-gateway", line
    assert perms == "-rw-r-----", line  # may hold LDAPPassword


def test_rpm_scriptlets(rpm_file):
    scripts = rpm_query(rpm_file, "--scripts")
    assert "useradd" in scripts and "flexvdi-gateway" in scripts
    assert "systemctl" in scripts or "systemd-update-helper" in scripts
    assert "preset" in scripts or "install-system-units" in scripts
    assert "daemon-reload" in scripts or "systemd-update-helper" in scripts
    for section in ("preinstall", "postinstall", "preuninstall", "postuninstall"):
        assert f"{section} scriptlet" in scripts


def test_rpm_requires(rpm_file):
    requires = rpm_query(rpm_file, "-R")
    for dep in ("python3-ldap3", "openssl"):
        assert dep in requires
    assert "python3-websockets" in rpm_query(rpm_file, "--recommends")


def rpm_payload(rpm_file):
    """{path: (mode, bytes)} of the package's payload (rpm2cpio, newc format)."""
    r = subprocess.run(
        ["rpm2cpio", str(rpm_file)], capture_output=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr
    data, pos, files = r.stdout, 0, {}
    while True:
        header = data[pos : pos + 110]
        assert header[:6] == b"070701", "not a newc cpio archive"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return files
        files["/" + name.removeprefix("./").lstrip("/")] = (
            mode,
            data[pos : pos + size],
        )
        pos = (pos + size + 3) & ~3


def test_rpm_launcher_runs_main(rpm_file, tmp_path):
    payload = rpm_payload(rpm_file)
    mode, launcher = payload["/usr/bin/flexvdi-gateway"]
    assert mode & 0o111, oct(mode)
    assert launcher.startswith(b"#!/usr/bin/python3")
    script = tmp_path / "flexvdi-gateway"
    script.write_bytes(launcher)
    # A stand-in module proves the launcher calls main() and exits with its result.
    (tmp_path / "flexvdi_gateway.py").write_text(
        "import sys\n\ndef main():\n    print('ARGS', sys.argv[1:])\n    return 7\n",
        encoding="utf-8",
    )
    r = run(
        [sys.executable, script, "-c", "x.conf"],
        timeout=60,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert r.returncode == 7, r.stdout
    assert "ARGS ['-c', 'x.conf']" in r.stdout


def test_versions_agree():
    spec = SPEC.read_text(encoding="utf-8")
    assert re.search(r"^Version:\s*" + re.escape(VERSION) + r"\s*$", spec, re.MULTILINE)
    assert f'version="{VERSION}"' in SETUP.read_text(encoding="utf-8")


# ---------------------------------------------------------------- pip install


@pytest.mark.skipif(not MODULE.exists(), reason="flexvdi_gateway.py does not exist yet")
def test_pip_install_into_fresh_venv(tmp_path):
    # Build from a copy so that pip leaves no build/ or *.egg-info in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for path in (SETUP, MODULE, REPO / "README.md"):
        if path.exists():
            shutil.copy2(path, src / path.name)
    venv = tmp_path / "venv"
    r = run([sys.executable, "-m", "venv", venv], timeout=60)
    assert r.returncode == 0, r.stdout
    py = venv / "bin" / "python"
    r = run(
        [
            py,
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "-q",
            src,
        ],
        timeout=150,
        env={"PIP_NO_INPUT": "1"},
    )
    assert r.returncode == 0, r.stdout[-5000:]
    exe = venv / "bin" / "flexvdi-gateway"
    assert exe.is_file() and os.access(exe, os.X_OK)
    r = run(
        [py, "-c", ("import ldap3, websockets.speedups, flexvdi_gateway as g; "
                    "assert g._apply_mask is not None")],
        timeout=60,
    )
    assert r.returncode == 0, r.stdout
    # The console script reaches main(): a missing configuration file is a
    # clean failure naming the file (PROTOCOL.md, "Configuration").
    missing = tmp_path / "missing.conf"
    r = run(
        [exe, "--stderr", "--check-config", "-c", missing], timeout=60, cwd=tmp_path
    )
    assert r.returncode != 0, r.stdout
    assert "missing.conf" in r.stdout, r.stdout
    assert "Traceback" not in r.stdout, r.stdout
