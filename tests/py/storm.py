#!/usr/bin/python3
"""`storm HOST:PORT RATE SECS`: plain TCP connections at RATE per second,
each closed after 0.2 s. `silent METRICS_ADDR CTL_SOCKET N SECS`: N
connections to each, saying nothing, held SECS seconds.
Used by tests/e2e_limits.rs.

Standard library only (python3 of Debian bookworm)."""
import socket, sys, time

def addr(a):
    h, p = a.rsplit(":", 1)
    return h, int(p)

cmd = sys.argv[1]
if cmd == "storm":
    target, rate, secs = addr(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    end, live = time.time() + secs, []
    while time.time() < end:
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(target)
        except (BlockingIOError, OSError):
            pass
        live.append((time.time(), s))
        while live and live[0][0] < time.time() - 0.2:
            live.pop(0)[1].close()
        time.sleep(1.0 / rate)
else:
    metrics, ctl, n, secs = addr(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    held = []
    for _ in range(n):
        for fam, a in ((socket.AF_INET, metrics), (socket.AF_UNIX, ctl)):
            s = socket.socket(fam)
            s.setblocking(False)
            try:
                s.connect(a)
            except (BlockingIOError, OSError):
                pass
            held.append(s)
    time.sleep(secs)
