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
import os
import platform
import random
import re
import select
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

def _child_setup():
    # Die with the benchmark even if it is killed with SIGKILL.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


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

    def __init__(self, name):
        self.name = name

    def open(self, kind, timeout=10.0):
        raise NotImplementedError

    def alive(self):
        return self.available

    def settle(self, timeout=5.0):
        pass


class Direct(Target):
    def __init__(self, name, ports, tls_ctx):
        super().__init__(name)
        self.ports = ports
        self.tls_ctx = tls_ctx

    def open(self, kind, timeout=10.0):
        return bl.open_direct(self.ports[kind], self.tls_ctx, timeout)


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

    def fail(self, why):
        self.available = False
        self.why = why


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


def start_gateway(procs, args, work, cert, key, manager_port):
    t = Relay("gateway")
    repo = os.path.abspath(args.repo)
    if not (os.path.exists(os.path.join(repo, "flexvdi_gateway.py"))
            or os.path.isdir(os.path.join(repo, "flexvdi_gateway"))):
        t.fail(f"flexvdi_gateway not found in {repo}")
        return t
    t.port = free_port()
    conf = os.path.join(work, "gateway.conf")
    with open(conf, "w") as f:
        json.dump({"ManagerIP": f"127.0.0.1:{manager_port}", "SslPort": t.port,
                   "ListenIP": "127.0.0.1", "CertFile": cert, "KeyFile": key,
                   "FirstSpicePort": 1, "LastSpicePort": 65535,
                   "PublicAddress": "127.0.0.1", "KeepAlive": 0}, f, indent=1)
    logp = os.path.join(work, "gateway.log")
    argv = [args.python, "-m", "flexvdi_gateway", "-c", conf, "--stderr"]
    t.log_path = logp
    t.proc = procs.start("gateway", argv, logp, cwd=repo)
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


def test_handshakes(target, parallel, max_ops, max_seconds):
    """New tunnels per second: TLS + WebSocket handshake + one 64-byte echo."""
    target.settle()
    r0 = target.cpu() if target.relay else None
    lock = threading.Lock()
    st = {"started": 0, "ok": 0, "fail": 0}
    errors = collections.Counter()
    payload = os.urandom(64)
    c0 = client_cpu()
    t0 = time.perf_counter()
    end = time.monotonic() + max_seconds

    def worker():
        while time.monotonic() < end:
            with lock:
                if st["started"] >= max_ops:
                    return
                st["started"] += 1
            try:
                conn = target.open("echo", timeout=10)
                try:
                    conn.roundtrip(payload, time.monotonic() + 10)
                finally:
                    conn.close()
                with lock:
                    st["ok"] += 1
            except (OSError, bl.BenchError) as e:
                with lock:
                    st["fail"] += 1
                    errors[type(e).__name__ + ": " + str(e)[:60]] += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(parallel)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(max_seconds + 30)
    wall = time.perf_counter() - t0
    c1 = client_cpu()
    res = {"rate": st["ok"] / wall, "ok": st["ok"], "fail": st["fail"],
           "client_cpu_frac": (c1 - c0) / wall}
    if errors:
        res["errors"] = dict(errors.most_common(3))
    if r0 is not None:
        target.settle(10)
        res["relay_cpu_ms"] = (target.cpu() - r0) * 1000.0 / max(st["ok"], 1)
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
        results = await asyncio.gather(*(hold_one(r, w) for r, w in conns), return_exceptions=True)
        await pss_task
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
           "procs": nprocs, "pss_mib": info.get("pss_mib")}
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
    ("{n} tunnels: ok (echo 1/s for {hold} s)", "conc", "ok"),
    ("{n} tunnels: open phase s", "conc", "open_seconds"),
    ("{n} tunnels: peak RSS MiB (tree sum)", "conc", "rss_mib"),
    ("{n} tunnels: PSS MiB mid-hold (tree sum)", "conc", "pss_mib"),
    ("{n} tunnels: peak threads (tree sum)", "conc", "threads"),
    ("{n} tunnels: peak processes", "conc", "procs"),
]


def evaluate(med, n, have_gw, have_ws):
    """Target checks -> {(test, field): (text, PASS/FAIL/n/a)}."""
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
    return checks


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
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    out = []
    for j, r in enumerate([header] + lines):
        cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, len(cols) + 2)]
        cells += [r[-2].ljust(widths[-2]), r[-1]]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("-" * len(out[0]))
    print("\n".join(out))


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
    ready, _, _ = select.select([p.stdout], [], [], 20)
    line = p.stdout.readline() if ready else b""
    if not line:
        raise RuntimeError(f"fake backends did not start:\n{tail(logp)}")
    return json.loads(line)


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
    ap.add_argument("--only", choices=("gateway", "websockify"), help="run one relay only")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
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
    cert, key = make_cert(work)
    ports = start_fakes(procs, args, work, cert, key)
    log(f"fakes: manager on {ports['manager']}, backends {ports['plain']}")
    targets = []
    if not args.no_direct:
        targets.append(Direct("direct-tcp", ports["plain"], None))
        targets.append(Direct("direct-tls", ports["tls"], bl.client_context()))
    relays = []
    if args.only != "gateway":
        relays.append(start_websockify(procs, args, work, cert, key, ports["plain"]))
    if args.only != "websockify":
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
    tests = [
        ("down", lambda t: test_throughput(t, "down", size, tput_timeout), False),
        ("up", lambda t: test_throughput(t, "up", size, tput_timeout), False),
        ("bidi", lambda t: test_throughput(t, "bidi", size, tput_timeout), False),
        ("rtt", lambda t: test_rtt(t, args.rtt_iters, 60.0), False),
        ("hs_seq", lambda t: test_handshakes(t, 1, *args.hs_seq), False),
        ("hs_par", lambda t: test_handshakes(t, 8, *args.hs_par), False),
        ("conc", lambda t: test_concurrent(t, args.concurrent, args.hold), True),
    ]
    results = {name: {t.name: [] for t in targets} for name, _, _ in tests}
    t_start = time.monotonic()
    for rnd in range(args.rounds):
        for name, fn, relay_only in tests:
            for t in targets:
                if relay_only and not t.relay:
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
                      have.get("websockify", False))

    print()
    print(f"flexvdi-gateway benchmark: {args.rounds} round(s), {args.size_mb} MiB per transfer, "
          f"{args.concurrent} concurrent tunnels, medians; MB = 10^6 bytes; {elapsed:.0f} s")
    print("client: raw RFC 6455 client over ssl (bench/benchlib.py), 64 KiB masked messages, "
          f"mask={bl.MASK_NAME}; {os.cpu_count()} CPUs; Python {platform.python_version()}; "
          f"{ssl.OPENSSL_VERSION}")
    print("websockify: defaults (one forked process per connection); CPU = process tree incl. "
          "reaped children (cutime/cstime)")
    print()
    print_table(med, cols, checks, args.concurrent, args.hold)
    print()
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
        for tname, rounds in results[name].items():
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
        worst = max(long_runs) if long_runs else (mean, "", "")
        if mean > 0.1 or worst[0] > 0.25:
            notes.append(f"other processes on this machine used {mean:.2f} cores on average "
                         f"(up to {worst[0]:.2f} during {worst[2]} {worst[1]}): the figures "
                         "are noisier than on an idle machine")
    cc = [r.get("client_cpu_frac") for n_ in ("down", "up", "bidi")
          for rs in results[n_].values() for r in rs if r.get("client_cpu_frac") is not None]
    if cc:
        notes.append(f"client CPU during throughput runs: max {100 * max(cc):.0f}% of a core "
                     "(flagged above 90%)")
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
               "notes": notes, "elapsed": elapsed}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"results written to {args.json}")


def _brief(res):
    if "error" in res:
        return "ERROR " + res["error"][:120]
    keys = ("mbps", "relay_cpu_per_gib", "client_cpu_frac", "p50_us", "p99_us", "rate", "fail",
            "relay_cpu_ms", "ok", "rss_mib", "threads", "procs")
    return " ".join(f"{k}={fmt(res[k])}" for k in keys if k in res and res[k] is not None)


def main():
    args = parse_args()
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
