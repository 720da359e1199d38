#!/usr/bin/env python3
"""Benchmark: flexvdi-gateway against websockify, side by side, on loopback.

Starts a fake flexVDI manager and fake Spice backends (bench/fakes.py), the
gateway (``python3 -m flexvdi_gateway -c CONF --stderr``) and websockify (TLS,
TokenFile plugin) pointing at the same backends, runs the same client work
against both, interleaved, and prints medians, ratios gateway/websockify and
the project's targets with PASS/FAIL.  See bench/README.md.
"""

import argparse
import asyncio
import collections
import ctypes
import hashlib
import http.client
import json
import math
import multiprocessing
import os
import platform
import random
import re
import resource
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import benchlib as bl

HERE = os.path.dirname(os.path.abspath(__file__))
CLK = os.sysconf("SC_CLK_TCK")
GIB = float(1 << 30)
CHUNK = 65536  # client message size (the relays send at most 64 KiB too)
THREADS_CONSTANT = 32  # "at most 2 threads per tunnel plus a constant"
RSS_LIMIT_MIB = 150


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------- processes

def raise_nofile():
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit
    (thousands of tunnels need thousands of descriptors: the client one per
    tunnel, the gateway two).  Returns (soft, hard) afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    if want == resource.RLIM_INFINITY:  # the kernel caps it at fs.nr_open
        try:
            with open("/proc/sys/fs/nr_open") as f:
                want = int(f.read())
        except (OSError, ValueError):
            want = soft
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _child_setup():
    # Die with the benchmark even if it is killed with SIGKILL.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    # Inherited from the bench already (main() raises it first); again in
    # case a relay is started by something that did not.
    raise_nofile()


class Procs:
    """Every process the benchmark starts; cleanup() ends them all."""

    def __init__(self):
        self.items = []

    def start(self, name, argv, log_path, cwd=None, stdin=subprocess.DEVNULL,
              stdout=None, env=None):
        # All processes start before the benchmark starts any thread, so
        # preexec_fn (for PR_SET_PDEATHSIG) is safe here.
        with open(log_path, "ab") as logf:
            p = subprocess.Popen(
                argv, cwd=cwd, stdin=stdin, stdout=stdout if stdout is not None else logf,
                stderr=logf, start_new_session=True, env=env,
                preexec_fn=_child_setup)  # noqa: PLW1509
        self.items.append((name, p))
        return p

    def stop(self, p, deadline_s=5.0):
        """SIGTERM the process, then SIGKILL after the deadline; the same
        for descendants it leaves behind (websockify's forks)."""
        if p.poll() is not None:
            return
        kids = tree_pids(p.pid)[0][1:]
        try:
            p.terminate()
        except OSError:
            pass
        try:
            p.wait(deadline_s)
        except subprocess.TimeoutExpired:
            p.kill()
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                pass
        end = time.monotonic() + 2.0
        for pid in kids:
            while time.monotonic() < end and _alive(pid):
                time.sleep(0.05)
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def cleanup(self):
        for _, p in reversed(self.items):
            try:
                if p.stdin:
                    p.stdin.close()
            except OSError:
                pass
            self.stop(p)
        self.items = []


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:data.rindex(b")") + 3] != b"Z"
    except (OSError, ValueError):
        return False


# ------------------------------------------------------------------- procfs

def proc_table():
    """pid -> (ppid, CPU ticks = utime + stime + cutime + cstime)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(b")") + 2:].split()
        table[int(name)] = (int(rest[1]), sum(int(x) for x in rest[11:15]))
    return table


def tree_pids(root, table=None):
    """[root, descendants...] (pids) and the table they came from."""
    if table is None:
        table = proc_table()
    if root not in table:
        return [], table
    kids = collections.defaultdict(list)
    for pid, (ppid, _) in table.items():
        kids[ppid].append(pid)
    out = [root]
    i = 0
    while i < len(out):
        out.extend(kids.get(out[i], ()))
        i += 1
    return out, table


def tree_cpu(root):
    """CPU seconds of the process tree: for every live member utime+stime
    plus cutime+cstime (children it has already reaped, e.g. websockify's
    finished per-connection forks)."""
    pids, table = tree_pids(root)
    return sum(table[p][1] for p in pids) / CLK


def _status_fields(pid, names):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in names:
                    out[k] = int(v.split()[0])
    except (OSError, ValueError):
        pass
    return out


def tree_mem(root):
    """(RSS MiB summed over the tree, threads summed, number of processes)."""
    pids, _ = tree_pids(root)
    rss = threads = 0
    for pid in pids:
        f = _status_fields(pid, ("VmRSS", "Threads"))
        rss += f.get("VmRSS", 0)
        threads += f.get("Threads", 0)
    return rss / 1024.0, threads, len(pids)


def tree_pss(root):
    """PSS MiB summed over the tree (shared pages split between sharers)."""
    pids, _ = tree_pids(root)
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            pass
    return total / 1024.0


def machine_busy():
    """(busy CPU seconds of the whole machine, CPU seconds of this process tree:
    client, fakes, relays)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / CLK, tree_cpu(os.getpid())


def other_cpu(before, after):
    """CPU seconds used by processes outside the benchmark between two
    machine_busy() readings (10 ms ticks: meaningful over seconds only)."""
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1]))


def client_cpu():
    """CPU seconds of this process (all its threads), nanosecond clock."""
    return time.process_time()


# ------------------------------------------------------------------ targets

class Target:
    relay = False
    available = True
    why = ""
    only = None   # the tests this target takes part in (None: all)

    def __init__(self, name):
        self.name = name

    def open(self, kind, timeout=10.0):
        raise NotImplementedError

    def spec(self, kind):
        """What a fresh process needs to open the same connection as
        open(kind): port, WebSocket path (None: direct), TLS on/off."""
        raise NotImplementedError

    def alive(self):
        return self.available

    def fail(self, why):
        self.available = False
        self.why = why

    def settle(self, timeout=5.0):
        pass


class Direct(Target):
    def __init__(self, name, ports, tls_ctx):
        super().__init__(name)
        self.ports = ports
        self.tls_ctx = tls_ctx

    def open(self, kind, timeout=10.0):
        return bl.open_direct(self.ports[kind], self.tls_ctx, timeout)

    def spec(self, kind):
        return {"port": self.ports[kind], "path": None, "tls": self.tls_ctx is not None}


class Relay(Target):
    relay = True

    def __init__(self, name):
        super().__init__(name)
        self.proc = None
        self.port = None
        self.tokens = {}
        self.ctx = bl.client_context()
        self.baseline_procs = 1
        self.log_path = None

    def log_size(self):
        try:
            return os.path.getsize(self.log_path)
        except (OSError, TypeError):
            return 0

    def log_problems(self, since, top=3):
        """Most frequent error/exception lines the relay logged since offset."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = f.read(8 << 20).decode("utf-8", "replace")
        except (OSError, TypeError):
            return {}
        c = collections.Counter()
        for line in text.splitlines():
            if re.search(r"error|exception|traceback|too many", line, re.IGNORECASE):
                c[re.sub(r"\d+", "N", line.strip())[-120:]] += 1
        return dict(c.most_common(top))

    @property
    def pid(self):
        return self.proc.pid

    def path(self, kind):
        return f"/?ver=2&token={self.tokens[kind]}"

    def open(self, kind, timeout=10.0):
        return bl.open_ws(self.port, self.path(kind), self.ctx, timeout)

    def spec(self, kind):
        return {"port": self.port, "path": self.path(kind), "tls": True}

    def alive(self):
        return self.available and self.proc is not None and self.proc.poll() is None

    def settle(self, timeout=5.0):
        """Wait until finished tunnels' processes are gone (reaped)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(tree_pids(self.pid)[0]) <= self.baseline_procs:
                return
            time.sleep(0.05)

    def cpu(self):
        return tree_cpu(self.pid)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_listening(port, proc, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def tail(path, n=8):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join("    " + x for x in lines[-n:])
    except OSError:
        return ""


def start_websockify(procs, args, work, cert, key, backends):
    t = Relay("websockify")
    tokfile = os.path.join(work, "websockify.tokens")
    with open(tokfile, "w") as f:
        for kind, port in backends.items():
            f.write(f"{kind}: 127.0.0.1:{port}\n")
            t.tokens[kind] = kind
    t.port = free_port()
    logp = os.path.join(work, "websockify.log")
    # Defaults kept on purpose (fork per connection), as an admin deploys it.
    argv = [args.python, "-m", "websockify", "--cert", cert, "--key", key, "--ssl-only",
            "--token-plugin", "TokenFile", "--token-source", tokfile,
            f"127.0.0.1:{t.port}"]
    t.log_path = logp
    t.proc = procs.start("websockify", argv, logp)
    if not wait_listening(t.port, t.proc, 15):
        t.fail(f"websockify did not start (log {logp}):\n{tail(logp)}")
        return t
    time.sleep(0.3)
    t.settle()
    t.baseline_procs = len(tree_pids(t.pid)[0])
    return t


class SocatTls(Target):
    """Reference, not a contender: socat relaying TLS to TCP (C, OpenSSL, fork per
    connection, 64 KiB buffer), with no WebSocket at all. Its CPU per GiB is what
    any relay pays here for a TLS session plus two loopback TCP connections: a
    floor for the gateway's and websockify's figures. Throughput tests only."""
    relay = True
    only = ("down", "up", "bidi")

    def __init__(self, name="socat-tls"):
        super().__init__(name)
        self.ports = {}
        self.procs = []
        self.ctx = bl.client_context()

    def open(self, kind, timeout=10.0):
        return bl.open_direct(self.ports[kind], self.ctx, timeout)

    @property
    def proc(self):   # for the "exited during the run" report: the first one gone
        return next((p for p in self.procs if p.poll() is not None), self.procs[0])

    def alive(self):
        return self.available and all(p.poll() is None for p in self.procs)

    def settle(self, timeout=5.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(len(tree_pids(p.pid)[0]) <= 1 for p in self.procs):
                return
            time.sleep(0.05)

    def cpu(self):
        return sum(tree_cpu(p.pid) for p in self.procs)


def start_socat(procs, work, cert, key, backends):
    t = SocatTls()
    exe = shutil.which("socat")
    if exe is None:
        t.fail("socat is not installed (apt-get install socat)")
        return t
    for kind in ("source", "sink", "duplex"):   # the backends of down, up, bidi
        port = free_port()
        logp = os.path.join(work, f"socat-{kind}.log")
        listen = (f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={cert},"
                  f"key={key},verify=0,nodelay")
        argv = [exe, "-b", "65536", listen, f"TCP:127.0.0.1:{backends[kind]},nodelay"]
        proc = procs.start(f"socat-{kind}", argv, logp)
        t.procs.append(proc)
        t.ports[kind] = port
        if not wait_listening(port, proc, 10):
            t.fail(f"socat did not start (log {logp}):\n{tail(logp)}")
            return t
    return t


def gateway_token(port, ctx, desktop):
    c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=15)
    try:
        body = json.dumps({"hwaddress": "bench", "username": "u", "password": "p",
                           "desktop": desktop})
        c.request("POST", "/vdi/desktop", body, {"Content-Type": "text/json"})
        r = c.getresponse()
        data = r.read()
    finally:
        c.close()
    try:
        ans = json.loads(data)
    except ValueError:
        raise bl.BenchError(f"/vdi/desktop answer is not JSON (HTTP {r.status}): {data[:120]!r}")
    if ans.get("status") != "OK" or "spice_port" not in ans:
        raise bl.BenchError(f"/vdi/desktop answered {ans!r}")
    if ans.get("use_ws") not in (True, "true"):
        raise bl.BenchError(f"/vdi/desktop answer has use_ws={ans.get('use_ws')!r}")
    return str(ans["spice_port"])


def start_gateway(procs, args, work, cert, key, manager_port, name="gateway", repo=None):
    t = Relay(name)
    repo = os.path.abspath(repo or args.repo)
    if not (os.path.exists(os.path.join(repo, "flexvdi_gateway.py"))
            or os.path.isdir(os.path.join(repo, "flexvdi_gateway"))):
        t.fail(f"flexvdi_gateway not found in {repo}")
        return t
    t.port = free_port()
    conf = os.path.join(work, f"{name}.conf")
    with open(conf, "w") as f:
        json.dump({"ManagerIP": f"127.0.0.1:{manager_port}", "SslPort": t.port,
                   "ListenIP": "127.0.0.1", "CertFile": cert, "KeyFile": key,
                   "FirstSpicePort": 1, "LastSpicePort": 65535,
                   "PublicAddress": "127.0.0.1", "KeepAlive": 0}, f, indent=1)
    logp = os.path.join(work, f"{name}.log")
    argv = [args.python, "-m", "flexvdi_gateway", "-c", conf, "--stderr"]
    t.log_path = logp
    t.proc = procs.start(name, argv, logp, cwd=repo)
    if not wait_listening(t.port, t.proc, 15):
        rc = t.proc.poll()
        why = f"exit code {rc}" if rc is not None else "not listening after 15 s"
        t.fail(f"gateway did not start ({why}; log {logp}):\n{tail(logp)}")
        return t
    try:
        for kind in ("source", "sink", "duplex", "echo"):
            t.tokens[kind] = gateway_token(t.port, t.ctx, kind)
    except (OSError, ssl.SSLError, http.client.HTTPException, bl.BenchError) as e:
        t.fail(f"gateway started but /vdi/desktop failed: {e}\n{tail(logp)}")
        return t
    time.sleep(0.3)
    t.settle()
    t.baseline_procs = len(tree_pids(t.pid)[0])
    return t


# -------------------------------------------------------------------- tests

def test_throughput(target, mode, size, timeout):
    kind = {"down": "source", "up": "sink", "bidi": "duplex"}[mode]
    target.settle()
    conn = target.open(kind)
    try:
        deadline = time.monotonic() + timeout
        r0 = target.cpu() if target.relay else None
        c0 = client_cpu()
        t0 = time.perf_counter()
        if mode == "down":
            got = [0]

            def on_data(mv):
                got[0] += len(mv)

            conn.sendall(bl.HDR.pack(bl.MAGIC, size, 0))
            bl.pump(conn, (), on_data, lambda: got[0] >= size, deadline)
            if got[0] != size:
                raise bl.BenchError(f"received {got[0]} bytes, expected {size}")
        elif mode == "up":
            reply = bytearray()
            conn.sendall(bl.HDR.pack(bl.MAGIC, size, 0))
            bl.pump(conn, bl.pattern_chunks(size, CHUNK), reply.extend,
                    lambda: len(reply) >= bl.SINK_REPLY.size, deadline)
            count, _ = bl.SINK_REPLY.unpack(bytes(reply[:bl.SINK_REPLY.size]))
            if count != size:
                raise bl.BenchError(f"sink counted {count} bytes, expected {size}")
        else:
            h = hashlib.sha256()
            st = {"got": 0}
            tail_buf = bytearray()

            def on_data(mv):
                r = size - st["got"]
                if r > 0:
                    h.update(mv[:r])
                if len(mv) > r:
                    tail_buf.extend(mv[max(r, 0):])
                st["got"] += len(mv)

            conn.sendall(bl.HDR.pack(bl.MAGIC, size, bl.FLAG_HASH))
            bl.pump(conn, bl.pattern_chunks(size, CHUNK), on_data,
                    lambda: st["got"] >= size + 32, deadline)
        t1 = time.perf_counter()
        c1 = client_cpu()
        r1 = target.cpu() if target.relay else None
        if mode == "bidi":
            want = bl.pattern_digest(size)
            if h.digest() != want:
                raise bl.BenchError("sha256 mismatch on the client side (downlink)")
            if bytes(tail_buf[:32]) != want:
                raise bl.BenchError("sha256 mismatch on the backend side (uplink)")
    finally:
        conn.close()
    wall = t1 - t0
    carried = size * (2 if mode == "bidi" else 1)
    res = {"mbps": size / wall / 1e6, "seconds": wall,
           "client_cpu_frac": (c1 - c0) / wall,
           "client_cpu_per_gib": (c1 - c0) / (carried / GIB),
           "client_ceiling_mbps": carried / max(c1 - c0, 1e-3) / 1e6}
    if conn.is_ws:
        res["max_server_frame"] = conn.decoder.max_frame
    if r0 is not None:
        res["relay_cpu_per_gib"] = (r1 - r0) / (carried / GIB)
    return res


def percentile(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, round(p / 100.0 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


def test_rtt(target, iters, max_seconds):
    target.settle()
    conn = target.open("echo")
    samples = []
    try:
        payload = os.urandom(64)
        end = time.monotonic() + max_seconds
        for i in range(iters + 20):
            if time.monotonic() > end:
                break
            t0 = time.perf_counter()
            conn.roundtrip(payload, time.monotonic() + 10)
            dt = time.perf_counter() - t0
            if i >= 20:  # warm-up excluded
                samples.append(dt)
    finally:
        conn.close()
    samples.sort()
    return {"p50_us": percentile(samples, 50) * 1e6, "p99_us": percentile(samples, 99) * 1e6,
            "n": len(samples)}


def _hs_ops(opener, take, end, payload):
    """The new-tunnel loop: while before ``end`` and ``take()`` grants one
    more from the budget: open (TLS + WebSocket handshake), one 64-byte echo,
    close.  Returns (ok, fail, Counter of error kinds)."""
    ok = fail = 0
    errors = collections.Counter()
    while time.monotonic() < end and take():
        try:
            conn = opener()
            try:
                conn.roundtrip(payload, time.monotonic() + 10)
            finally:
                conn.close()
            ok += 1
        except (OSError, bl.BenchError) as e:
            fail += 1
            errors[type(e).__name__ + ": " + str(e)[:60]] += 1
    return ok, fail, errors


def _hs_worker(spec, budget, go, end, out):
    """One worker process of the parallel new-tunnel test.

    Starts from ``spec`` only (port, path, TLS on/off, mask, parent pid) and
    makes its own TLS context; says "ready", waits for ``go``, then runs
    _hs_ops until the shared deadline ``end`` or until the shared ``budget``
    is used up; sends back ok, fail, error kinds, its own CPU seconds
    (process_time, from the start signal on) and when it finished."""
    _child_setup()
    if os.getppid() != spec["parent"]:  # the bench died before PR_SET_PDEATHSIG
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench handles Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    res = {"ok": 0, "fail": 0, "errors": {}, "cpu": 0.0, "finish": None}
    try:
        bl.set_mask_impl(spec["mask"])
        bl.RESUME = spec["resume"]
        ctx = bl.client_context() if spec["tls"] else None
        port, path = spec["port"], spec["path"]
        if path is None:
            def opener():
                return bl.open_direct(port, ctx, 10)
        else:
            def opener():
                return bl.open_ws(port, path, ctx, 10)
        payload = os.urandom(64)

        def take():
            with budget.get_lock():
                if budget.value <= 0:
                    return False
                budget.value -= 1
                return True

        out.send("ready")
        if not go.wait(120):
            res["error"] = "no start signal"
            return
        c0 = time.process_time()
        ok, fail, errors = _hs_ops(opener, take, end.value, payload)
        res.update(ok=ok, fail=fail, errors=dict(errors), cpu=time.process_time() - c0,
                   finish=time.monotonic())
    except Exception as e:  # noqa: BLE001 - reported to the bench
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        try:
            out.send(res)
            out.close()
        except OSError:
            pass


def _hs_processes(target, parallel, max_ops, max_seconds):
    """Run ``parallel`` _hs_worker processes; returns (ok, fail, errors,
    wall seconds, client CPU seconds incl. the workers', relay CPU seconds
    during the run)."""
    # fork is cheap and the workers use nothing but their spec; it is only
    # safe while this process has a single thread (a thread holding a lock
    # at fork time would leave it locked in the child), else spawn.
    method = "fork" if threading.active_count() == 1 else "spawn"
    mp = multiprocessing.get_context(method)
    spec = dict(target.spec("echo"), mask=bl.MASK_NAME, resume=bl.RESUME, parent=os.getpid())
    budget = mp.Value("l", max_ops)
    end = mp.Value("d", 0.0)
    go = mp.Event()
    workers = []
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        for _ in range(parallel):
            r, w = mp.Pipe(duplex=False)
            p = mp.Process(target=_hs_worker, args=(spec, budget, go, end, w), daemon=True)
            p.start()
            w.close()
            workers.append((p, r))
        for p, r in workers:
            try:
                ready = r.poll(60) and r.recv() == "ready"
            except EOFError:
                ready = False
            if not ready:
                raise bl.BenchError(f"handshake worker ({method}) did not start "
                                    f"(exit code {p.exitcode})")
        r0 = target.cpu() if target.relay else None
        c0 = client_cpu()
        t_go = time.monotonic()
        end.value = t_go + max_seconds
        go.set()
        ok = fail = 0
        cpu = 0.0
        errors = collections.Counter()
        finish = []
        for p, r in workers:
            left = t_go + max_seconds + 30 - time.monotonic()
            try:
                res = r.recv() if r.poll(max(left, 0.1)) else {"error": "no result (timed out)"}
            except EOFError:
                res = {"error": f"worker exited (code {p.exitcode})"}
            ok += res.get("ok", 0)
            fail += res.get("fail", 0)
            cpu += res.get("cpu", 0.0)
            errors.update(res.get("errors", {}))
            if res.get("error"):
                errors["worker: " + res["error"][:60]] += 1
            finish.append(res.get("finish") or time.monotonic())
        wall = max(finish) - t_go
        c1 = client_cpu()
        relay = target.cpu() - r0 if r0 is not None else None
    finally:
        for p, _ in workers:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(3)
            if p.is_alive():
                p.kill()
                p.join(1)
        for _, r in workers:
            r.close()
    return ok, fail, errors, wall, c1 - c0 + cpu, relay, method


def test_handshakes(target, parallel, max_ops, max_seconds):
    """New tunnels per second: TLS + WebSocket handshake + one 64-byte echo
    + close, ``max_ops`` in all or until ``max_seconds``.  parallel == 1: in
    this process; else ``parallel`` worker processes (one client process is
    held to about one core by the GIL), sharing the budget and deadline."""
    target.settle()
    if parallel > 1:
        r0 = target.cpu() if target.relay else None
        ok, fail, errors, wall, ccpu, rcpu, method = _hs_processes(target, parallel, max_ops,
                                                                   max_seconds)
    else:
        left = [max_ops]

        def take():
            left[0] -= 1
            return left[0] >= 0

        r0 = target.cpu() if target.relay else None
        c0 = client_cpu()
        t0 = time.perf_counter()
        method = "in-process"
        ok, fail, errors = _hs_ops(lambda: target.open("echo", timeout=10), take,
                                   time.monotonic() + max_seconds, os.urandom(64))
        wall = time.perf_counter() - t0
        ccpu = client_cpu() - c0
        rcpu = target.cpu() - r0 if r0 is not None else None
    wall = max(wall, 1e-6)
    res = {"rate": ok / wall, "ok": ok, "fail": fail, "seconds": wall, "workers": parallel,
           "worker_start": method, "client_cpu_frac": ccpu / wall}
    if errors:
        res["errors"] = dict(errors.most_common(3))
    if r0 is not None:
        res["relay_cpu_frac"] = rcpu / wall
        target.settle(10)
        res["relay_cpu_ms"] = (target.cpu() - r0) * 1000.0 / max(ok, 1)
    return res


class Sampler(threading.Thread):
    """Samples RSS / threads / processes of a relay's process tree."""

    def __init__(self, pid, period=0.5):
        super().__init__(daemon=True)
        self.pid = pid
        self.period = period
        self.stop_evt = threading.Event()
        self.peak = (0.0, 0, 0)
        self.samples = 0

    def sample(self):
        rss, threads, nprocs = tree_mem(self.pid)
        self.peak = (max(self.peak[0], rss), max(self.peak[1], threads), max(self.peak[2], nprocs))
        self.samples += 1

    def run(self):
        while not self.stop_evt.wait(self.period):
            self.sample()


def test_concurrent(target, n, hold, open_parallel=32):
    target.settle(30)
    log_pos = target.log_size()
    sampler = Sampler(target.pid)
    sampler.sample()
    sampler.start()
    errors = collections.Counter()
    info = {}

    async def run():
        sem = asyncio.Semaphore(open_parallel)
        path = target.path("echo")

        async def open_one():
            async with sem:
                return await bl.async_open_ws(target.port, path, target.ctx, 30)

        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(open_one()) for _ in range(n)]
        _, pending = await asyncio.wait(tasks, timeout=max(60.0, n * 0.1))
        for p in pending:
            p.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        info["open_seconds"] = time.perf_counter() - t0
        conns = []
        for tk in tasks:
            if tk.cancelled():
                errors["open: timed out (phase deadline)"] += 1
            elif tk.exception() is not None:
                e = tk.exception()
                errors[f"open: {type(e).__name__}: {str(e)[:60]}"] += 1
            else:
                conns.append(tk.result())
        info["opened"] = len(conns)
        payload = os.urandom(64)
        loop = asyncio.get_running_loop()

        async def hold_one(reader, writer):
            await asyncio.sleep(random.random())
            for _ in range(hold):
                t = loop.time()
                await bl.async_echo(reader, writer, payload, 10)
                await asyncio.sleep(max(0.0, t + 1.0 - loop.time()))

        async def mid_pss():
            await asyncio.sleep(hold / 2.0)
            info["pss_mib"] = await loop.run_in_executor(None, tree_pss, target.pid)
            await loop.run_in_executor(None, sampler.sample)

        pss_task = asyncio.ensure_future(mid_pss())
        h0 = (time.perf_counter(), client_cpu(), target.cpu())
        results = await asyncio.gather(*(hold_one(r, w) for r, w in conns), return_exceptions=True)
        await pss_task
        wall = max(time.perf_counter() - h0[0], 1e-6)
        info["hold_client_cores"] = (client_cpu() - h0[1]) / wall
        info["hold_relay_cores"] = (target.cpu() - h0[2]) / wall
        ok = 0
        for res in results:
            if isinstance(res, BaseException):
                errors[f"echo: {type(res).__name__}: {str(res)[:60]}"] += 1
            else:
                ok += 1
        info["ok"] = ok
        await asyncio.gather(*(bl.async_close(w) for _, w in conns), return_exceptions=True)

    try:
        asyncio.run(asyncio.wait_for(run(), max(120.0, n * 0.2) + hold + 60))
    finally:
        sampler.stop_evt.set()
        sampler.join(5)
    rss, threads, nprocs = sampler.peak
    res = {"ok": info.get("ok", 0), "n": n, "opened": info.get("opened", 0),
           "open_seconds": info.get("open_seconds"), "rss_mib": rss, "threads": threads,
           "procs": nprocs, "pss_mib": info.get("pss_mib"),
           "hold_client_cores": info.get("hold_client_cores"),
           "hold_relay_cores": info.get("hold_relay_cores")}
    if errors:
        res["errors"] = dict(errors.most_common(4))
    target.settle(30)
    problems = target.log_problems(log_pos)
    if problems:
        res["relay_log"] = problems
    return res


# ------------------------------------------------------------ client choice

def websockets_transfer(target, mode, size, timeout):
    """The same downlink/uplink with the `websockets` asyncio client."""
    from websockets.asyncio.client import connect

    async def run():
        kind = "source" if mode == "down" else "sink"
        uri = f"wss://127.0.0.1:{target.port}{target.path(kind)}"
        async with connect(uri, ssl=target.ctx, subprotocols=["binary"], compression=None,
                           max_size=None, ping_interval=None, proxy=None,
                           open_timeout=10, close_timeout=2) as ws:
            c0 = client_cpu()
            t0 = time.perf_counter()
            if mode == "down":
                await ws.send(bl.HDR.pack(bl.MAGIC, size, 0))
                got = 0
                while got < size:
                    got += len(await ws.recv())
            else:
                await ws.send(bl.HDR.pack(bl.MAGIC, size, 0))
                for mv in bl.pattern_chunks(size, CHUNK):
                    await ws.send(mv)
                reply = b""
                while len(reply) < bl.SINK_REPLY.size:
                    reply += await ws.recv()
            return time.perf_counter() - t0, client_cpu() - c0

    wall, cpu = asyncio.run(asyncio.wait_for(run(), timeout))
    return {"mbps": size / wall / 1e6, "client_cpu_per_gib": cpu / (size / GIB),
            "client_ceiling_mbps": size / max(cpu, 1e-3) / 1e6,
            "client_cpu_frac": cpu / wall}


def compare_clients(relays, size, timeout, rounds):
    """Each client, interleaved, ``rounds`` times; medians."""
    clients = [c for c in ("raw/mask=c", "raw/mask=int", "websockets")
               if c != "raw/mask=c" or "c" in bl.MASK_IMPLS]
    runs = collections.defaultdict(list)
    for _ in range(rounds):
        for t in relays:
            if not t.alive():
                continue
            for mode in ("down", "up"):
                for client in clients:
                    saved = bl.MASK_NAME
                    try:
                        if client == "websockets":
                            r = websockets_transfer(t, mode, size, timeout)
                        else:
                            bl.set_mask_impl(client.split("=")[1])
                            r = test_throughput(t, mode, size, timeout)
                    except Exception as e:  # noqa: BLE001 - reported, the run goes on
                        r = {"error": f"{type(e).__name__}: {e}"}
                    finally:
                        bl.set_mask_impl(saved)
                    runs[(client, t.name, mode)].append(r)
    rows = []
    for (client, tname, mode), rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows.append((client, tname, mode, rs[0]))
            continue
        rows.append((client, tname, mode, {
            k: median_of(ok, k) for k in ("mbps", "client_cpu_frac", "client_cpu_per_gib",
                                          "client_ceiling_mbps")}))
    rows.sort(key=lambda x: (x[1], x[2], clients.index(x[0])))
    return rows


# ---------------------------------------------------------------- reporting

def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "nan"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def median_of(rounds, field):
    vals = [r[field] for r in rounds
            if isinstance(r, dict) and isinstance(r.get(field), (int, float))]
    if not vals:
        return None
    return statistics.median(vals)


ROWS = [
    # label, test, field, higher_is_better
    ("downlink MB/s", "down", "mbps"),
    ("uplink MB/s", "up", "mbps"),
    ("both ways at once MB/s each way (sha256 ok)", "bidi", "mbps"),
    ("relay CPU s/GiB downlink", "down", "relay_cpu_per_gib"),
    ("relay CPU s/GiB uplink", "up", "relay_cpu_per_gib"),
    ("relay CPU s/GiB both ways", "bidi", "relay_cpu_per_gib"),
    ("client ceiling MB/s downlink (1 core)", "down", "client_ceiling_mbps"),
    ("client ceiling MB/s uplink (1 core)", "up", "client_ceiling_mbps"),
    ("64 B round trip p50 us", "rtt", "p50_us"),
    ("64 B round trip p99 us", "rtt", "p99_us"),
    ("new tunnels/s sequential", "hs_seq", "rate"),
    ("new tunnels/s 8 parallel", "hs_par", "rate"),
    ("relay CPU ms per new tunnel (seq)", "hs_seq", "relay_cpu_ms"),
    ("client CPU cores, new tunnels sequential", "hs_seq", "client_cpu_frac"),
    ("client CPU cores, new tunnels 8 parallel", "hs_par", "client_cpu_frac"),
    ("{n} tunnels: ok (echo 1/s for {hold} s)", "conc", "ok"),
    ("{n} tunnels: open phase s", "conc", "open_seconds"),
    ("{n} tunnels: peak RSS MiB (tree sum)", "conc", "rss_mib"),
    ("{n} tunnels: PSS MiB mid-hold (tree sum)", "conc", "pss_mib"),
    ("{n} tunnels: peak threads (tree sum)", "conc", "threads"),
    ("{n} tunnels: peak processes", "conc", "procs"),
]


def evaluate(med, n, have_gw, have_ws, ran=None):
    """Target checks -> {(test, field): (text, PASS/FAIL/n/a)}; only for the
    tests in ``ran`` (default: every test that has results in ``med``)."""
    if ran is None:
        ran = set(med)
    checks = {}

    def get(test, field, tname):
        return med.get(test, {}).get(tname, {}).get(field)

    def ratio_check(test, field, op, limit, text):
        g, w = get(test, field, "gateway"), get(test, field, "websockify")
        if not (have_gw and have_ws) or g is None or w is None or w == 0:
            checks[(test, field)] = (text, "n/a")
            return
        r = g / w
        ok = r <= limit if op == "<=" else r >= limit
        checks[(test, field)] = (text, "PASS" if ok else "FAIL")

    ratio_check("down", "relay_cpu_per_gib", "<=", 0.5, "<= 0.5x websockify")
    ratio_check("up", "relay_cpu_per_gib", "<=", 0.5, "<= 0.5x websockify")
    ratio_check("rtt", "p50_us", "<=", 1.0, "<= websockify")
    ratio_check("hs_seq", "rate", ">=", 4.0, ">= 4x websockify")
    ratio_check("hs_par", "rate", ">=", 4.0, ">= 4x websockify")

    g, d = get("down", "mbps", "gateway"), get("down", "mbps", "direct-tls")
    if have_gw and g is not None and d:
        checks[("down", "mbps")] = (f">= 0.6x direct TLS ({g / d:.2f}x)",
                                    "PASS" if g >= 0.6 * d else "FAIL")
    else:
        checks[("down", "mbps")] = (">= 0.6x direct TLS", "n/a")
    p50, p99 = get("rtt", "p50_us", "gateway"), get("rtt", "p99_us", "gateway")
    if have_gw and p50 and p99 is not None:
        checks[("rtt", "p99_us")] = (f"gw <= 2x gw p50 ({p99 / p50:.2f}x)",
                                     "PASS" if p99 <= 2 * p50 else "FAIL")
    else:
        checks[("rtt", "p99_us")] = ("gw <= 2x gw p50", "n/a")
    note = "" if n >= 1000 else " [target is for 1000]"
    ok, rss, thr = (get("conc", f, "gateway") for f in ("ok", "rss_mib", "threads"))
    if have_gw and ok is not None:
        checks[("conc", "ok")] = (f"gw all {n} ok{note}", "PASS" if ok >= n else "FAIL")
    else:
        checks[("conc", "ok")] = ("gw all ok", "n/a")
    if have_gw and rss is not None:
        checks[("conc", "rss_mib")] = (f"gw < {RSS_LIMIT_MIB} MiB{note}",
                                       "PASS" if rss < RSS_LIMIT_MIB else "FAIL")
    else:
        checks[("conc", "rss_mib")] = (f"gw < {RSS_LIMIT_MIB} MiB", "n/a")
    if have_gw and thr is not None:
        lim = 2 * n + THREADS_CONSTANT
        checks[("conc", "threads")] = (f"gw <= 2/tunnel+{THREADS_CONSTANT} ({lim})",
                                       "PASS" if thr <= lim else "FAIL")
    else:
        checks[("conc", "threads")] = (f"gw <= 2/tunnel+{THREADS_CONSTANT}", "n/a")
    return {k: v for k, v in checks.items() if k[0] in ran}


def print_table(med, cols, checks, n, hold):
    header = ["metric"] + cols + ["gw/ws", "target", "check"]
    lines = []
    for label, test, field in ROWS:
        label = label.format(n=n, hold=hold)
        row = [label]
        for c in cols:
            row.append(fmt(med.get(test, {}).get(c, {}).get(field)))
        g = med.get(test, {}).get("gateway", {}).get(field)
        w = med.get(test, {}).get("websockify", {}).get(field)
        row.append("%.2f" % (g / w) if g is not None and w else "-")
        text, verdict = checks.get((test, field), ("", ""))
        row += [text, verdict]
        if any(x != "-" for x in row[1:1 + len(cols)]):
            lines.append(row)
    if not lines:
        print("(no results for the comparison table)")
        return
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    out = []
    for j, r in enumerate([header] + lines):
        cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, len(cols) + 2)]
        cells += [r[-2].ljust(widths[-2]), r[-1]]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("-" * len(out[0]))
    print("\n".join(out))


# -------------------------------------------------------------------- scale

def scale_failed(res):
    return "error" in res or res.get("ok", 0) < res.get("n", 0) or bool(res.get("errors"))


def run_scale(relays, steps, hold, notes):
    """How far each relay goes: test_concurrent with each step's number of
    tunnels (one round), interleaved between relays; a relay stops at its
    first step with any failure.  -> {relay name: [result per step]}."""
    out = {t.name: [] for t in relays}
    active = [t for t in relays if t.available]
    for n in steps:
        for t in list(active):
            if not t.alive():
                notes.append(f"{t.name}: exited during the scale test (before {n} tunnels)")
                t.fail(f"process exited (code {t.proc.poll()})")
                active.remove(t)
                continue
            t0 = time.monotonic()
            try:
                res = test_concurrent(t, n, hold)
            except Exception as e:  # noqa: BLE001 - reported, the run goes on
                res = {"error": f"{type(e).__name__}: {e}"}
            res["n"] = n
            res["elapsed"] = time.monotonic() - t0
            out[t.name].append(res)
            log(f"scale {n:6} {t.name:10} {_brief(res)}")
            if scale_failed(res):
                active.remove(t)
    return out


def print_scale(scale, steps, hold, nofile):
    print(f"how far it goes: concurrent tunnels, each echoing 64 B once a second for {hold} s, "
          "one round per step, a relay stops at its first step with a failure; "
          f"fd limit {nofile[0]} (soft) / {nofile[1]} (hard)")
    header = ["relay", "tunnels", "opened", "ok", "open s", "peak RSS MiB", "peak threads",
              "peak procs", "client cores", "relay cores", "first errors"]
    lines = []
    for tname, rs in scale.items():
        for r in rs:
            errs = r.get("error") or "; ".join(f"{k} x{v}" for k, v in
                                              list(r.get("errors", {}).items())[:2])
            lines.append([tname, str(r["n"]), fmt(r.get("opened")), fmt(r.get("ok")),
                          fmt(r.get("open_seconds")), fmt(r.get("rss_mib")),
                          fmt(r.get("threads")), fmt(r.get("procs")),
                          fmt(r.get("hold_client_cores")), fmt(r.get("hold_relay_cores")),
                          errs[:110]])
    if lines:
        widths = [max(len(x[i]) for x in [header] + lines) for i in range(len(header))]
        out = []
        for j, row in enumerate([header] + lines):
            cells = [row[0].ljust(widths[0])]
            cells += [row[i].rjust(widths[i]) for i in range(1, len(header) - 1)]
            cells.append(row[-1])
            out.append("  ".join(cells).rstrip())
            if j == 0:
                out.append("-" * len(out[0]))
        print("\n".join(out))
    for tname, rs in scale.items():
        good = [r["n"] for r in rs if not scale_failed(r)]
        bad = [r["n"] for r in rs if scale_failed(r)]
        if not rs:
            verdict = "not run"
        elif bad:
            verdict = (f"all ok up to {max(good)}" if good else "no step fully ok") + \
                f"; first failure at {bad[0]}"
        else:
            verdict = f"all ok up to {max(good)}"
            if max(good) < steps[-1]:
                verdict += " (later steps not run)"
        print(f"  {tname}: {verdict}")
    print("  (client / relay cores: CPU used during the echo phase, per second; "
          f"{os.cpu_count()} CPUs)")


# --------------------------------------------------------------------- main

def make_cert(work):
    cert = os.path.join(work, "cert.pem")
    key = os.path.join(work, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
    return cert, key


def start_fakes(procs, args, work, cert, key):
    argv = [args.python, os.path.join(HERE, "fakes.py"), "--cert", cert, "--key", key,
            "--max-seconds", "7200"]
    logp = os.path.join(work, "fakes.log")
    p = procs.start("fakes", argv, logp, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    with selectors.DefaultSelector() as sel:  # epoll: no FD_SETSIZE limit
        sel.register(p.stdout, selectors.EVENT_READ)
        ready = sel.select(20)
    line = p.stdout.readline() if ready else b""
    if not line:
        raise RuntimeError(f"fake backends did not start:\n{tail(logp)}")
    return json.loads(line)


STANDARD_TESTS = ("down", "up", "bidi", "rtt", "hs_seq", "hs_par", "conc")
ALL_TESTS = STANDARD_TESTS + ("scale",)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=os.path.dirname(HERE),
                    help="repository root holding flexvdi_gateway (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick: 1)")
    ap.add_argument("--size-mb", type=int, default=None,
                    help="MiB per throughput transfer (default 256; --quick: 16)")
    ap.add_argument("--concurrent", type=int, default=None,
                    help="concurrent tunnels (default 1000; --quick: 200)")
    ap.add_argument("--hold", type=int, default=None,
                    help="seconds the concurrent tunnels echo once a second "
                         "(default 5; --quick: 3)")
    ap.add_argument("--rtt-iters", type=int, default=None,
                    help="64-byte round trips (default 2000; --quick: 300)")
    ap.add_argument("--quick", action="store_true", help="small smoke test, well under a minute")
    ap.add_argument("--tests", metavar="NAME[,NAME...]",
                    help="run only these tests: " + ", ".join(ALL_TESTS) + " (default: all "
                         "but scale)")
    ap.add_argument("--scale", action="store_true",
                    help="also run the scale test (concurrent tunnels in steps, see "
                         "--scale-steps)")
    ap.add_argument("--scale-steps", metavar="N[,N...]", default="1000,2000,3000,5000",
                    help="tunnel counts of the scale test (default: %(default)s)")
    ap.add_argument("--only", choices=("gateway", "websockify"), help="run one relay only")
    ap.add_argument("--baseline-repo", metavar="DIR",
                    help="also run the gateway found in DIR (e.g. a worktree of the commit "
                         "before a change) as column gateway-base, interleaved with the rest")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--resume", action="store_true",
                    help="clients resume TLS sessions (each reuses the last ticket it got "
                         "from the same port); default: a full handshake every time")
    ap.add_argument("--client-mask", choices=("auto", "c", "int"), default="auto",
                    help="client masking: c = websockets.speedups.apply_mask, int = Python "
                         "int.from_bytes XOR (default: c when available)")
    ap.add_argument("--compare-clients", action="store_true",
                    help="also measure the client itself: raw client (both masks) vs websockets")
    ap.add_argument("--no-direct", action="store_true", help="skip the direct TCP/TLS baselines")
    ap.add_argument("--workdir", help="keep certificate, configs and logs here "
                    "(default: a temporary directory, removed at the end)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the relays")
    args = ap.parse_args()
    if args.tests:
        names = [x.strip() for x in args.tests.split(",") if x.strip()]
        bad = [x for x in names if x not in ALL_TESTS]
        if bad or not names:
            ap.error(f"--tests: unknown test(s) {', '.join(bad) or '(none given)'}; "
                     f"known: {', '.join(ALL_TESTS)}")
    else:
        names = list(STANDARD_TESTS)
    if args.scale:
        names.append("scale")
    args.tests = [x for x in ALL_TESTS if x in names]
    try:
        steps = sorted({int(x) for x in args.scale_steps.split(",") if x.strip()})
    except ValueError:
        steps = []
    if not steps or steps[0] < 1:
        ap.error("--scale-steps: positive integers separated by commas, e.g. 1000,2000,5000")
    args.scale_steps = steps
    q = args.quick
    defaults = {"rounds": (3, 1), "size_mb": (256, 16), "concurrent": (1000, 200),
                "hold": (5, 3), "rtt_iters": (2000, 300)}
    for k, (full, quick) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if q else full)
    args.hs_seq = (40, 3.0) if q else (300, 10.0)
    args.hs_par = (80, 3.0) if q else (800, 10.0)
    args.rounds = max(1, args.rounds)
    return args


def run(args, procs, work):
    bl.set_mask_impl(args.client_mask)
    bl.RESUME = args.resume
    cert, key = make_cert(work)
    ports = start_fakes(procs, args, work, cert, key)
    log(f"fakes: manager on {ports['manager']}, backends {ports['plain']}")
    targets = []
    if not args.no_direct:
        targets.append(Direct("direct-tcp", ports["plain"], None))
        targets.append(Direct("direct-tls", ports["tls"], bl.client_context()))
        if set(args.tests) & set(SocatTls.only):
            socat = start_socat(procs, work, cert, key, ports["plain"])
            if socat.available:
                targets.append(socat)
            else:
                print(f"{socat.name}: NOT RUN: {socat.why}", flush=True)
    relays = []
    if args.only != "gateway":
        relays.append(start_websockify(procs, args, work, cert, key, ports["plain"]))
    if args.only != "websockify":
        if args.baseline_repo:
            relays.append(start_gateway(procs, args, work, cert, key, ports["manager"],
                                        "gateway-base", args.baseline_repo))
        relays.append(start_gateway(procs, args, work, cert, key, ports["manager"]))
    notes = []
    for t in relays:
        if t.available:
            log(f"{t.name}: listening on 127.0.0.1:{t.port} (pid {t.pid})")
        else:
            msg = f"{t.name}: NOT RUN: {t.why}"
            print(msg, flush=True)
            notes.append(msg.splitlines()[0])
    targets += relays
    size = args.size_mb << 20
    tput_timeout = max(120.0, size / 2e6)
    all_tests = [
        ("down", lambda t: test_throughput(t, "down", size, tput_timeout), False),
        ("up", lambda t: test_throughput(t, "up", size, tput_timeout), False),
        ("bidi", lambda t: test_throughput(t, "bidi", size, tput_timeout), False),
        ("rtt", lambda t: test_rtt(t, args.rtt_iters, 60.0), False),
        ("hs_seq", lambda t: test_handshakes(t, 1, *args.hs_seq), False),
        ("hs_par", lambda t: test_handshakes(t, 8, *args.hs_par), False),
        ("conc", lambda t: test_concurrent(t, args.concurrent, args.hold), True),
    ]
    tests = [x for x in all_tests if x[0] in args.tests]
    results = {name: {t.name: [] for t in targets
                      if (t.relay or not relay_only) and (t.only is None or name in t.only)}
               for name, _, relay_only in tests}
    t_start = time.monotonic()
    for rnd in range(args.rounds):
        for name, fn, relay_only in tests:
            for t in targets:
                if relay_only and not t.relay:
                    continue
                if t.only is not None and name not in t.only:
                    continue
                if t.relay and t.available and not t.alive():
                    t.fail("process exited (code {}); log:\n{}".format(
                        t.proc.poll(), tail(os.path.join(work, t.name + ".log"))))
                    notes.append(f"{t.name}: exited during the run "
                                 f"(round {rnd + 1}, before {name})")
                    print(f"{t.name}: process exited during the run:\n{t.why}", flush=True)
                if not t.available:
                    continue
                t0 = time.monotonic()
                busy0 = machine_busy()
                try:
                    res = fn(t)
                except Exception as e:  # noqa: BLE001 - reported, the run goes on
                    res = {"error": f"{type(e).__name__}: {e}"}
                res["elapsed"] = time.monotonic() - t0
                res["other_cpu"] = other_cpu(busy0, machine_busy())
                results[name][t.name].append(res)
                log(f"round {rnd + 1} {name:6} {t.name:10} {_brief(res)}")
    scale = {}
    if "scale" in args.tests:
        need = 2 * args.scale_steps[-1] + 100
        if args.nofile[0] < need:
            notes.append(f"RLIMIT_NOFILE is {args.nofile[0]} (hard {args.nofile[1]}): the "
                         f"gateway needs about {need} descriptors for {args.scale_steps[-1]} "
                         "tunnels (2 per tunnel); expect 'Too many open files' failures")
        scale = run_scale(relays, args.scale_steps, args.hold, notes)
    elapsed = time.monotonic() - t_start

    med = {}
    for name, per_t in results.items():
        for tname, rounds in per_t.items():
            fields = {k for r in rounds for k, v in r.items() if isinstance(v, (int, float))}
            med.setdefault(name, {})[tname] = {f: median_of(rounds, f) for f in fields}
    cols = [t.name for t in targets]
    have = {t.name: any("error" not in r for rs in results.values() for r in rs.get(t.name, []))
            for t in relays}
    checks = evaluate(med, args.concurrent, have.get("gateway", False),
                      have.get("websockify", False), {name for name, _, _ in tests})

    print()
    if tests:
        print(f"flexvdi-gateway benchmark: {args.rounds} round(s), {args.size_mb} MiB per "
              f"transfer, {args.concurrent} concurrent tunnels, medians; MB = 10^6 bytes; "
              f"{elapsed:.0f} s")
    else:
        print(f"flexvdi-gateway benchmark: scale test only; {elapsed:.0f} s")
    print(f"tests: {', '.join(args.tests)}")
    print("client: raw RFC 6455 client over ssl (bench/benchlib.py), 64 KiB masked messages, "
          f"mask={bl.MASK_NAME}; {os.cpu_count()} CPUs; Python {platform.python_version()}; "
          f"{ssl.OPENSSL_VERSION}")
    print("websockify: defaults (one forked process per connection); CPU = process tree incl. "
          "reaped children (cutime/cstime)")
    if tests:
        print()
        print_table(med, cols, checks, args.concurrent, args.hold)
    print()
    if scale:
        print_scale(scale, args.scale_steps, args.hold, args.nofile)
        print()
        for tname, rs in scale.items():
            for r in rs:
                if r.get("errors") and len(r["errors"]) > 2:
                    notes.append(f"{tname} scale {r['n']}: failures {r['errors']}")
                if r.get("relay_log"):
                    notes.append(f"{tname} scale {r['n']}: relay log: {r['relay_log']}")
    for name, per_t in results.items():
        for tname, rounds in per_t.items():
            for i, r in enumerate(rounds):
                if "error" in r:
                    notes.append(f"{tname} {name} round {i + 1}: {r['error'][:200]}")
                if r.get("relay_log"):
                    notes.append(f"{tname} {name} round {i + 1}: relay log: {r['relay_log']}")
                if r.get("errors"):
                    notes.append(f"{tname} {name} round {i + 1}: failures {r['errors']}")
                mf = r.get("max_server_frame", 0)
                if mf > 65536:
                    notes.append(f"{tname} {name}: server frame of {mf} bytes (> 64 KiB)")
    for name in ("down", "up", "bidi"):
        for tname, rounds in results.get(name, {}).items():
            busy = [r["client_cpu_frac"] for r in rounds if r.get("client_cpu_frac", 0) > 0.9]
            if busy:
                notes.append(f"{tname} {name}: client above 90% of a core in {len(busy)}/"
                             f"{len(rounds)} round(s) (max {100 * max(busy):.0f}%): "
                             "this figure may be client-bound")
    runs = [(r["other_cpu"], r["elapsed"], name, tname) for name, per_t in results.items()
            for tname, rs in per_t.items() for r in rs if "other_cpu" in r]
    total_wall = sum(x[1] for x in runs)
    if total_wall > 0:
        mean = sum(x[0] for x in runs) / total_wall
        long_runs = [(min(x[0] / x[1], os.cpu_count() or 1), x[2], x[3])
                     for x in runs if x[1] >= 2.0]
        worst = max(long_runs) if long_runs else None
        if mean > 0.1 or (worst and worst[0] > 0.25):
            upto = f" (up to {worst[0]:.2f} during {worst[2]} {worst[1]})" if worst else ""
            notes.append(f"other processes on this machine used {mean:.2f} cores on average"
                         f"{upto}: the figures are noisier than on an idle machine")
    cc = [r.get("client_cpu_frac") for n_ in ("down", "up", "bidi")
          for rs in results.get(n_, {}).values() for r in rs
          if r.get("client_cpu_frac") is not None]
    if cc:
        notes.append(f"client CPU during throughput runs: max {100 * max(cc):.0f}% of a core "
                     "(flagged above 90%)")
    notes += handshake_notes(results)
    rows = []
    if args.compare_clients:
        rows = compare_clients([t for t in relays if t.available], size, tput_timeout,
                               args.rounds)
        print(f"client comparison (medians of {args.rounds} run(s); ceiling = bytes per "
              "client CPU second):")
        for client, tname, mode, r in rows:
            if "error" in r:
                print(f"  {client:13} {tname:10} {mode:4} ERROR {r['error'][:100]}")
            else:
                print(f"  {client:13} {tname:10} {mode:4} {fmt(r['mbps']):>8} MB/s  client "
                      f"{100 * r['client_cpu_frac']:3.0f}% of a core  "
                      f"{fmt(r['client_cpu_per_gib']):>6} s/GiB  "
                      f"ceiling {fmt(r['client_ceiling_mbps']):>6} MB/s")
        print()
    if notes:
        print("notes:")
        for n_ in notes:
            print("  - " + n_)
    if args.json:
        out = {"params": {k: v for k, v in vars(args).items() if k != "json"},
               "client": {"impl": "raw", "mask": bl.MASK_NAME, "cpus": os.cpu_count(),
                          "python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION},
               "rounds": results, "medians": med,
               "checks": {f"{k[0]}.{k[1]}": {"target": v[0], "result": v[1]}
                          for k, v in checks.items()},
               "client_comparison": [{"client": c, "target": t, "mode": m, **r}
                                     for c, t, m, r in rows],
               "scale": scale,
               "notes": notes, "elapsed": elapsed}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"results written to {args.json}")


def handshake_notes(results):
    """Flag new-tunnel runs whose client may have been the limit: sequential
    client above 90% of its one core; or client + relay CPU above 90% of all
    the machine's cores (the machine was saturated)."""
    ncpu = os.cpu_count() or 1
    notes = []
    for name in ("hs_seq", "hs_par"):
        for tname, rounds in results.get(name, {}).items():
            rs = [r for r in rounds if r.get("client_cpu_frac") is not None]
            if not rs:
                continue
            if name == "hs_seq":
                busy = [r["client_cpu_frac"] for r in rs if r["client_cpu_frac"] > 0.9]
                if busy:
                    notes.append(f"{tname} {name}: client above 90% of a core in {len(busy)}/"
                                 f"{len(rounds)} round(s) (max {100 * max(busy):.0f}%): this "
                                 "figure may be client-bound")
            sat = [(r["client_cpu_frac"], r.get("relay_cpu_frac") or 0.0) for r in rs
                   if r["client_cpu_frac"] + (r.get("relay_cpu_frac") or 0.0) > 0.9 * ncpu]
            if sat:
                c, rl = max(sat, key=sum)
                notes.append(f"{tname} {name}: client {c:.2f} + relay {rl:.2f} cores = "
                             f"{100 * (c + rl) / ncpu:.0f}% of the {ncpu} cores in {len(sat)}/"
                             f"{len(rounds)} round(s): the machine was saturated, this figure "
                             "may be client-bound")
    return notes


def _brief(res):
    if "error" in res:
        return "ERROR " + res["error"][:120]
    keys = ("mbps", "relay_cpu_per_gib", "client_cpu_frac", "relay_cpu_frac", "p50_us",
            "p99_us", "rate", "fail", "relay_cpu_ms", "opened", "ok", "rss_mib", "threads",
            "procs")
    return " ".join(f"{k}={fmt(res[k])}" for k in keys if k in res and res[k] is not None)


def main():
    args = parse_args()
    # Before any process starts: the fakes and the relays inherit it.
    args.nofile = raise_nofile()
    procs = Procs()
    work = args.workdir or tempfile.mkdtemp(prefix="flexvdi-bench-")
    os.makedirs(work, exist_ok=True)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    rc = 0
    try:
        run(args, procs, work)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        rc = 130
    finally:
        procs.cleanup()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
