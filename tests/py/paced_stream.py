#!/usr/bin/python3
"""Long, paced TCP transfers for the failover e2e tests (tests/e2e_failover.rs):
a transfer lasts tens of seconds, so that a node dies, drains or is cut off
while it runs, and the client checks every byte at the end.

  serve HOST PORT TIMEOUT
      Threaded server. Each connection sends one line "SEED BYTES RATE" and
      gets BYTES bytes of data(SEED), paced at RATE bytes/s, then the server
      closes. Logs "LISTENING", then per connection "SERVED peer seed bytes
      secs" or "ERR peer seed sent error". Exits after TIMEOUT seconds.

  fetch HOST PORT SEED BYTES RATE COUNT STOPFILE TIMEOUT
      Transfers one after the other, number i with seed SEED*1000+i, until
      COUNT are done (COUNT > 0) or, with COUNT = 0, until STOPFILE exists
      (the transfer under way when it appears is completed). Each received
      stream is compared (length and SHA-256) with data(seed), generated
      here from the same seed. Prints "START i", "RECV i" at the first
      bytes, then "OK i bytes secs
      sha256" or "FAIL i why" per transfer, and "DONE ok=N fail=M" at the end.
      Exits 0 when every transfer was OK. A transfer may stall up to TIMEOUT
      seconds without data (a failover) before it counts as failed.

data(seed) is random.Random(seed).randbytes(BYTES): deterministic, the same
on both sides. Standard library only (python3 of Debian bookworm).
"""
import hashlib, os, random, socket, sys, threading, time

CHUNK = 4096


def out(*a):
    print(*a, flush=True)


def data(seed, n):
    return random.Random(seed).randbytes(n)


def serve_one(c, peer):
    seed, sent = "?", 0
    try:
        c.settimeout(120)
        line = b""
        while not line.endswith(b"\n") and len(line) < 200:
            d = c.recv(200)
            if not d:
                break
            line += d
        seed_s, n_s, rate_s = line.decode().split()
        seed, n, rate = int(seed_s), int(n_s), max(1, int(rate_s))
        buf = data(seed, n)
        t0 = time.monotonic()
        while sent < n:
            c.sendall(buf[sent:sent + CHUNK])
            sent = min(n, sent + CHUNK)
            # Pace: the bytes sent so far are due at t0 + sent / rate.
            due = t0 + sent / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
        c.shutdown(socket.SHUT_WR)
        # Wait for the client's close, so that the last bytes are not reset.
        c.settimeout(120)
        while c.recv(CHUNK):
            pass
        out("SERVED", peer[0], seed, n, "%.1f" % (time.monotonic() - t0))
    except Exception as e:  # noqa: BLE001 (any failure is reported)
        out("ERR", peer[0], seed, sent, repr(e))
    finally:
        c.close()


def serve(host, port, timeout):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    s.listen(128)
    s.settimeout(1.0)
    out("LISTENING")
    end = time.monotonic() + float(timeout)
    while time.monotonic() < end:
        try:
            c, peer = s.accept()
        except socket.timeout:
            continue
        threading.Thread(target=serve_one, args=(c, peer), daemon=True).start()
    out("TIMEOUT")


def fetch_one(i, host, port, seed, n, rate, stall):
    """None when the stream arrived whole and right, else why not."""
    want = hashlib.sha256(data(seed, n)).hexdigest()
    try:
        s = socket.create_connection((host, int(port)), timeout=10)
    except OSError as e:
        return "connect: %r" % (e,), None
    h, got = hashlib.sha256(), 0
    try:
        s.settimeout(stall)
        s.sendall(("%d %d %d\n" % (seed, n, rate)).encode())
        while True:
            try:
                d = s.recv(65536)
            except socket.timeout:
                return "stalled %.0f s after %d of %d bytes" % (stall, got, n), None
            if not d:
                break
            if got == 0:
                out("RECV", i)
            h.update(d)
            got += len(d)
    except OSError as e:
        return "after %d of %d bytes: %r" % (got, n, e), None
    finally:
        s.close()
    digest = h.hexdigest()
    if got != n:
        return "closed after %d of %d bytes" % (got, n), None
    if digest != want:
        return "sha256 %s, expected %s" % (digest, want), None
    return None, digest


def fetch(host, port, seed, n, rate, count, stopfile, timeout):
    seed, n, rate, count = int(seed), int(n), int(rate), int(count)
    stall = float(timeout)
    ok = fail = i = 0
    while True:
        if count > 0 and i >= count:
            break
        if count == 0 and os.path.exists(stopfile):
            break
        out("START", i)
        t0 = time.monotonic()
        why, digest = fetch_one(i, host, port, seed * 1000 + i, n, rate, stall)
        if why is None:
            ok += 1
            out("OK", i, n, "%.1f" % (time.monotonic() - t0), digest)
        else:
            fail += 1
            out("FAIL", i, why)
            time.sleep(1)
        i += 1
    out("DONE ok=%d fail=%d" % (ok, fail))
    sys.exit(0 if fail == 0 and ok > 0 else 1)


cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "serve":
    serve(*args)
elif cmd == "fetch":
    fetch(*args)
else:
    sys.exit("unknown command %r" % cmd)
