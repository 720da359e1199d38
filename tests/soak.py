#!/usr/bin/env python3
"""Soak test, run by hand (not collected by pytest):

    python3 tests/soak.py --tunnels 10000 --minutes 3

Starts a fake manager, a fake echo desktop and the gateway (a subprocess, as in the
tests), holds a few long-lived tunnels, and opens and closes --tunnels tunnels spread
over --minutes minutes, each echoing random data (verified) and ending one of four
ways (Close, FIN, RST, Close not awaited). Prints the gateway's RSS, threads and
descriptors before, during (peak) and after, and exits non-zero on any error, on
threads or descriptors not back to their baseline, or on RSS growth over --rss-mib.
Everything is on 127.0.0.1 and bounded in time.
"""

import argparse
import os
import pathlib
import random
import resource
import socket
import struct
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest
import fakes
from hostile_support import WsClient

LOCAL = "127.0.0.1"


def stats(gateway):
    return {"rss_kib": gateway.rss_kib(), "threads": gateway.threads(), "fds": gateway.fds()}


def one_tunnel(gateway, token, i, rng):
    ws = WsClient(LOCAL, gateway.port, f"/?ver=2&token={token}", subprotocols=["binary"],
                  timeout=30)
    try:
        data = rng.randbytes(rng.choice([1, 100, 1500, 20000, 70000]))
        ws.send(data)
        got = ws.recv(len(data), timeout=30)
        if got != data:
            raise AssertionError(f"echo of {len(data)} bytes came back as {len(got)} other bytes")
        way = i % 4
        if way == 0:
            ws.close(1000)
            code = ws.wait_close(10)
            if code != 1000:
                raise AssertionError(f"Close answered with {code}")
        elif way == 2:
            ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif way == 3:
            ws.close(1001)
        return len(data)
    finally:
        ws.abort()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tunnels", type=int, default=10000)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--held", type=int, default=20, help="long-lived tunnels")
    parser.add_argument("--rss-mib", type=float, default=16.0,
                        help="allowed RSS growth after the run")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="flexvdi-soak-"))
    cert = conftest.make_cert(str(tmp / "gateway.pem"), "gateway.test")
    manager_cert = conftest.make_cert(str(tmp / "manager.pem"), "manager.test")
    manager = fakes.FakeManager(manager_cert)
    spice = fakes.FakeSpice(fakes.echo)
    (tmp / "gw").mkdir()
    gateway = conftest.GatewayProcess(tmp / "gw", {
        "ManagerIP": manager.address, "SslPort": conftest.free_port(), "ListenIP": LOCAL,
        "CertFile": cert, "KeyFile": cert, "FirstSpicePort": 1024, "LastSpicePort": 65535,
        "Debug": False, "KeepAlive": 5})
    failures = []
    try:
        tokens = [gateway.desktop_token(manager, spice)["spice_port"] for _ in range(20)]
        rng = random.Random(1)
        for i in range(200):                       # warm-up
            one_tunnel(gateway, tokens[i % 20], i, rng)
        conftest.wait_for(lambda: gateway.threads() <= 4, 15, message="an idle gateway")
        before = stats(gateway)
        held = [WsClient(LOCAL, gateway.port, f"/?ver=2&token={tokens[i % 20]}",
                         subprotocols=["binary"]) for i in range(args.held)]
        for ws in held:
            ws.send(b"hello")
            ws.recv(5)
        with_held = stats(gateway)
        print(f"idle:           {before}", flush=True)
        print(f"{args.held} held open: {with_held}", flush=True)

        peak = dict(before)
        done = [0]
        verified = [0]
        errors = []
        lock = threading.Lock()
        stop = threading.Event()
        started = time.monotonic()
        duration = args.minutes * 60
        interval = duration / max(1, args.tunnels)   # pace: spread over the whole run

        def worker(k):
            wrng = random.Random(100 + k)
            for i in range(k, args.tunnels, args.workers):
                if stop.is_set():
                    return
                due = started + i * interval
                delay = due - time.monotonic()
                if delay > 0:
                    stop.wait(delay)
                try:
                    size = one_tunnel(gateway, tokens[i % 20], i, wrng)
                    with lock:
                        done[0] += 1
                        verified[0] += size
                except Exception as exc:
                    with lock:
                        errors.append(f"tunnel {i}: {exc!r}")

        def sampler():
            last_print = time.monotonic()
            while not stop.wait(0.5):
                now = stats(gateway)
                for key, value in now.items():
                    peak[key] = max(peak[key], value)
                for ws in held:                    # the long-lived ones keep working
                    try:
                        data = os.urandom(64)
                        ws.send(data)
                        if ws.recv(64, timeout=10) != data:
                            raise AssertionError("wrong echo")
                    except Exception as exc:
                        errors.append(f"long-lived tunnel: {exc!r}")
                if time.monotonic() - last_print > 15:
                    last_print = time.monotonic()
                    print(f"{time.monotonic() - started:6.0f} s: {done[0]} tunnels, "
                          f"{len(errors)} errors, {now}", flush=True)

        threads = [threading.Thread(target=worker, args=(k,), daemon=True)
                   for k in range(args.workers)]
        watcher = threading.Thread(target=sampler, daemon=True)
        watcher.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(1.0, started + duration * 2 + 120 - time.monotonic()))
        stop.set()
        watcher.join(15)
        elapsed = time.monotonic() - started
        try:
            conftest.wait_for(lambda: gateway.threads() <= with_held["threads"]
                              and gateway.fds() <= with_held["fds"], 30,
                              message="threads and fds back to where the churn started")
        except AssertionError as exc:
            failures.append(str(exc))
        churned = stats(gateway)
        print(f"after churn:    {churned} (long-lived tunnels still open)")
        for ws in held:
            ws.close(1000)
            if ws.wait_close(10) != 1000:
                failures.append("a long-lived tunnel did not close with 1000")
            ws.abort()
        try:
            conftest.wait_for(lambda: gateway.threads() <= before["threads"]
                              and gateway.fds() <= before["fds"], 30,
                              message="threads and fds back to the baseline")
        except AssertionError as exc:
            failures.append(str(exc))
        after = stats(gateway)
        log = gateway.log_text()
        print(f"all closed:     {after}")
        print(f"peak:           {peak}")
        print(f"{done[0]} of {args.tunnels} tunnels opened, echoed, verified and closed in "
              f"{elapsed:.0f} s ({done[0] / elapsed:.0f}/s), {verified[0]} bytes verified; "
              f"{len(errors)} errors; RSS over the churn {with_held['rss_kib']} -> "
              f"{churned['rss_kib']} KiB "
              f"({(churned['rss_kib'] - with_held['rss_kib']) / 1024:+.1f} MiB), threads "
              f"{before['threads']} -> {after['threads']}, fds {before['fds']} -> "
              f"{after['fds']}; {len(log.splitlines())} log lines")
        failures += errors[:10]
        if done[0] != args.tunnels:
            failures.append(f"only {done[0]} of {args.tunnels} tunnels completed")
        if churned["rss_kib"] - with_held["rss_kib"] > args.rss_mib * 1024:
            failures.append(f"RSS grew by more than {args.rss_mib} MiB")
        if "Traceback" in log:
            failures.append("a traceback in the gateway's log")
    finally:
        gateway.stop()
        manager.stop()
        spice.stop()
    for failure in failures:
        print("FAIL:", failure)
    print("PASS" if not failures else "FAIL")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
