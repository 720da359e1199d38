"""Load, bounded for CI (tests/soak.py is the long version to run by hand).

- 500 concurrent tunnels (50 desktops' tokens, 10 channels each), each echoing and
  verifying its own data in order, while 200 idle or half-open connections sit on the
  port the whole time (re-opened as the gateway drops them at its 10 s head deadline);
  then threads and descriptors back to their baseline.
- Tunnel churn: FLEXVDI_CHURN (default 3000) tunnels opened and closed in every way a
  client closes; memory, threads and descriptors do not grow.
"""

import os
import random
import resource
import select
import socket
import struct
import threading
import time

import fakes
import pytest
from conftest import wait_for
from hostile_support import (
    LOCAL,
    WANT_IO,
    WsClient,
    assert_clean_log,
    open_socket,
    quiet_counts,
    real_client_hello,
    settle,
)

TUNNELS = int(os.environ.get("FLEXVDI_LOAD_TUNNELS", "500"))
IDLE = int(os.environ.get("FLEXVDI_LOAD_IDLE", "200"))
CHURN = int(os.environ.get("FLEXVDI_CHURN", "3000"))


@pytest.fixture(autouse=True)
def enough_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 8192))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted < 3 * TUNNELS + IDLE + 200:
        pytest.skip(f"RLIMIT_NOFILE {wanted} is too low for this test")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Sampler(threading.Thread):
    """Samples the gateway's RSS, threads and descriptors every 0.2 s."""

    def __init__(self, gateway):
        super().__init__(daemon=True)
        self.gateway = gateway
        self.peak = {"rss_kib": 0, "threads": 0, "fds": 0}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.2):
            try:
                now = {"rss_kib": self.gateway.rss_kib(), "threads": self.gateway.threads(),
                       "fds": self.gateway.fds()}
            except (OSError, AssertionError):
                return
            for key, value in now.items():
                self.peak[key] = max(self.peak[key], value)


class IdlePool(threading.Thread):
    """Keeps `count` idle or half-open connections on the port: a third silent, a third
    with half a TLS ClientHello, a third with TLS done and half a request head. The
    gateway drops each at its 10 s deadline; the pool opens a new one in its place."""

    def __init__(self, port, count):
        super().__init__(daemon=True)
        self.port = port
        self.count = count
        self.hello = real_client_hello()
        self.sockets = {}
        self.opened = 0
        self.dropped = 0
        self.stop = threading.Event()
        self.errors = []

    def _open(self, kind):
        if kind == 0:
            sock = socket.create_connection((LOCAL, self.port), timeout=10)
        elif kind == 1:
            sock = socket.create_connection((LOCAL, self.port), timeout=10)
            sock.sendall(self.hello[:len(self.hello) // 2])
        else:
            sock = open_socket(self.port)[0]
            sock.sendall(b"POST /vdi/authmode HTTP/1.1\r\nHost: gw.test\r\nContent-")
        self.opened += 1
        return sock

    def fill(self):
        for i in range(self.count):
            self.sockets[i] = self._open(i % 3)

    def run(self):
        while not self.stop.is_set():
            by_fd = {s.fileno(): i for i, s in self.sockets.items()}
            poller = select.poll()      # not select(): this process has over 1024 fds
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            gone = []
            for fd, _ in poller.poll(200):
                i = by_fd[fd]
                sock = self.sockets[i]
                sock.setblocking(False)
                try:
                    data = sock.recv(4096)
                except WANT_IO:
                    continue            # a TLS session ticket, not data: still waiting
                except OSError:
                    data = b""
                if data:
                    self.errors.append(f"idle connection {i} got {data[:60]!r}")
                sock.close()
                gone.append(i)
            for i in gone:              # after the loop: a new socket may reuse an fd
                self.dropped += 1
                try:
                    self.sockets[i] = self._open(i % 3)
                except OSError as exc:
                    self.errors.append(f"re-opening idle connection {i}: {exc}")
                    del self.sockets[i]

    def close(self):
        self.stop.set()
        self.join(10)
        for sock in self.sockets.values():
            sock.close()


def message(tunnel, round_, rng):
    size = rng.choice([1, 100, 1500, 4096, 16384, 65536, 70000])
    head = struct.pack("!HHI", tunnel, round_, size)
    return (head + rng.randbytes(size))[:max(size, 8)]


def test_500_tunnels_with_200_idle_connections_on_the_port(gateway_factory, manager,
                                                            spice_factory):
    gateway = gateway_factory(Debug=False)
    spice = spice_factory(fakes.echo)
    tokens = [gateway.desktop_token(manager, spice)["spice_port"] for _ in range(50)]
    with WsClient(LOCAL, gateway.port, f"/?ver=2&token={tokens[0]}",
                  subprotocols=["binary"]) as warm:
        warm.send(b"warm")
        assert warm.recv(4) == b"warm"
        warm.close()
        warm.wait_close()
    threads, fds = quiet_counts(gateway)
    rss = gateway.rss_kib()
    sampler = Sampler(gateway)
    sampler.start()
    pool = IdlePool(gateway.port, IDLE)
    started = time.monotonic()
    pool.fill()
    pool.start()
    clients = [None] * TUNNELS
    errors = []
    verified = [0] * TUNNELS
    lock = threading.Lock()

    def opener(indices):
        for i in indices:
            try:
                clients[i] = WsClient(LOCAL, gateway.port, f"/?ver=2&token={tokens[i % 50]}",
                                      subprotocols=["binary"], timeout=30)
            except Exception as exc:
                with lock:
                    errors.append(f"tunnel {i}: open: {exc!r}")

    def worker(indices, until):
        rng = random.Random(indices[0])
        try:
            round_ = 0
            while round_ < 4 or not until():
                round_ += 1
                sent = {}
                for i in indices:           # every tunnel of this worker has data in flight
                    sent[i] = message(i, round_, rng)
                    clients[i].send(sent[i])
                for i in indices:
                    got = clients[i].recv(len(sent[i]), timeout=60)
                    if got != sent[i]:
                        raise AssertionError(f"tunnel {i} round {round_}: {len(got)} bytes "
                                             f"back, not the {len(sent[i])} sent")
                    verified[i] += len(got)
        except Exception as exc:
            with lock:
                errors.append(f"worker {indices[0]}: {exc!r}")

    openers = [threading.Thread(target=opener, args=(range(k, TUNNELS, 8),)) for k in range(8)]
    for thread in openers:
        thread.start()
    for thread in openers:
        thread.join(120)
    opened_in = time.monotonic() - started
    assert not errors, errors[:5]
    held = gateway.threads()
    wait_for(lambda: spice.connections == TUNNELS + 1, 10,
             message=f"{TUNNELS + 1} desktop connections (now {spice.connections})")
    # Long enough for the gateway to drop the idle connections at their deadline (and
    # the pool to put new ones in their place) while every tunnel is busy.
    def until():
        return pool.dropped >= IDLE or time.monotonic() > started + 30
    workers = [threading.Thread(target=worker, args=(list(range(k, TUNNELS, 25)), until))
               for k in range(25)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(180)
    exchanged_in = time.monotonic() - started - opened_in
    assert not errors, errors[:5]
    assert all(v > 0 for v in verified)
    assert pool.dropped >= IDLE, "the idle connections did not cycle during the test"
    idle_on_port = len(pool.sockets)
    pool.close()
    assert not pool.errors, pool.errors[:5]
    assert idle_on_port == IDLE
    for i, ws in enumerate(clients):
        if i % 2:
            ws.close(1000)
    for i, ws in enumerate(clients):
        if i % 2:
            assert ws.wait_close(20) == 1000, f"tunnel {i}"
        ws.abort()
    settle(gateway, threads, fds, timeout=60)
    closed_in = time.monotonic() - started - opened_in - exchanged_in
    sampler.stop.set()
    sampler.join(5)
    total = time.monotonic() - started
    assert_clean_log(gateway)
    # Two threads per tunnel and one per waiting connection, nothing more.
    assert sampler.peak["threads"] <= threads + 2 * TUNNELS + IDLE + 50, sampler.peak
    print(f"\n{TUNNELS} tunnels held with {IDLE} idle/half-open connections on the port "
          f"({pool.opened} opened, {pool.dropped} dropped by the gateway at its deadline); "
          f"{sum(verified)} bytes echoed and verified each way; opened in {opened_in:.1f} s, "
          f"exchanged in {exchanged_in:.1f} s, closed and settled in {closed_in:.1f} s, "
          f"{total:.1f} s in all; gateway threads "
          f"{threads} -> {held} with all tunnels open (peak {sampler.peak['threads']}) -> "
          f"{gateway.threads()}, fds {fds} -> peak {sampler.peak['fds']} -> {gateway.fds()}, "
          f"RSS {rss} -> peak {sampler.peak['rss_kib']} KiB")


def churn(gateway, token, count, workers=4):
    """Opens and closes `count` tunnels, each ending a different way."""
    errors = []

    def run(k):
        rng = random.Random(k)
        for i in range(k, count, workers):
            try:
                ws = WsClient(LOCAL, gateway.port, f"/?ver=2&token={token}",
                              subprotocols=["binary"], timeout=30)
                data = rng.randbytes(rng.choice([1, 1000, 20000]))
                ws.send(data)
                assert ws.recv(len(data)) == data
                way = i % 4
                if way == 0:                      # a clean Close
                    ws.close(1000)
                    assert ws.wait_close(10) == 1000
                elif way == 1:                    # FIN without a Close
                    pass
                elif way == 2:                    # RST
                    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
                else:                             # Close sent, answer not awaited
                    ws.close(1001)
                ws.abort()
            except Exception as exc:
                errors.append(f"tunnel {i}: {exc!r}")
    threads = [threading.Thread(target=run, args=(k,)) for k in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return errors


def test_tunnel_churn_leaks_nothing(gateway_factory, manager, spice_factory):
    gateway = gateway_factory(Debug=False)
    spice = spice_factory(fakes.echo)
    token = gateway.desktop_token(manager, spice)["spice_port"]
    assert churn(gateway, token, 200) == []          # warm-up: allocator pools, caches
    threads, fds = quiet_counts(gateway)
    rss = gateway.rss_kib()
    sampler = Sampler(gateway)
    sampler.start()
    started = time.monotonic()
    errors = churn(gateway, token, CHURN)
    elapsed = time.monotonic() - started
    assert errors == [], errors[:5]
    settle(gateway, threads, fds, timeout=30)
    sampler.stop.set()
    sampler.join(5)
    after = gateway.rss_kib()
    wait_for(lambda: spice.connections == 200 + CHURN, 10, message="every desktop connection")
    assert after - rss < 8 * 1024, f"RSS grew from {rss} to {after} KiB"
    assert_clean_log(gateway)
    ended = gateway.log_text().count("tunnel ended")
    assert ended == 200 + CHURN, ended
    print(f"\n{CHURN} tunnels opened and closed in {elapsed:.1f} s "
          f"({CHURN / elapsed:.0f}/s): RSS {rss} -> {after} KiB (peak "
          f"{sampler.peak['rss_kib']}), threads {threads} -> {gateway.threads()} (peak "
          f"{sampler.peak['threads']}), fds {fds} -> {gateway.fds()} (peak "
          f"{sampler.peak['fds']})")


def burst_then_idle(size):
    """Sends `size` bytes at once, then stays connected and quiet."""
    def behaviour(sock, record):
        sock.sendall(fakes.pattern(size, seed=21))
        record["sent"] = size
        fakes.hold(sock, record)
    return behaviour


@pytest.mark.slow
def test_buffers_go_back_to_idle_size_after_a_burst(gateway_factory, manager, spice_factory):
    """1,000 tunnels each carry one 1 MiB burst and then idle: every tunnel's read
    buffer goes back to its small size, and the whole gateway holds < 150 MiB."""
    count = 1000
    gateway = gateway_factory(Debug=False)
    spice = spice_factory(burst_then_idle(1 << 20))
    token = gateway.desktop_token(manager, spice)["spice_port"]
    rss_before = gateway.rss_kib()
    sampler = Sampler(gateway)
    sampler.start()
    clients = [None] * count
    errors = []

    def opener(indices):
        for i in indices:
            try:
                ws = WsClient(LOCAL, gateway.port, f"/?ver=2&token={token}",
                              subprotocols=["binary"], timeout=60)
                clients[i] = ws
                if len(ws.recv(1 << 20, timeout=60)) != 1 << 20:
                    errors.append(f"tunnel {i}: burst cut short")
            except Exception as exc:
                errors.append(f"tunnel {i}: {exc!r}")

    threads = [threading.Thread(target=opener, args=(range(k, count, 8),)) for k in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        assert not errors, errors[:5]
        # Idle now: each desktop buffer shrinks after BUFFER_IDLE_S of quiet.
        wait_for(lambda: gateway.rss_kib() < 150 * 1024, 20, interval=0.5,
                 message=f"RSS under 150 MiB (now {gateway.rss_kib()} KiB)")
        time.sleep(2)   # and it stays there, not only at one sample
        rss_idle = gateway.rss_kib()
        assert rss_idle < 150 * 1024, rss_idle
    finally:
        sampler.stop.set()
        for ws in clients:
            if ws is not None:
                ws.abort()
    print(f"\n{count} tunnels after a 1 MiB burst each, idle: RSS {rss_before} -> "
          f"{rss_idle} KiB (peak {sampler.peak['rss_kib']} KiB)")
