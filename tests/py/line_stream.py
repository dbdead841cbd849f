#!/usr/bin/python3
"""Counts the lines a TCP peer sends (`serve HOST PORT`, in the user's
namespace) while a client (`send HOST PORT`, on the internal host) sends one
every 100 ms: an open connection, like an RDP session from the help desk.
Used by tests/e2e_access.rs.

Standard library only (python3 of Debian bookworm)."""
import socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "serve":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(1); s.settimeout(30)
    print("LISTENING", flush=True)
    c, _ = s.accept(); c.settimeout(60)
    buf = b""
    while True:
        try:
            d = c.recv(4096)
        except Exception as e:
            print("ERR", e, flush=True); break
        if not d: print("EOF", flush=True); break
        buf += d
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            print("LINE", line.decode(), flush=True)
else:
    c = socket.create_connection((host, port), timeout=5)
    print("CONNECTED", flush=True)
    for i in range(400):
        try:
            c.sendall(b"%d\n" % i)
        except Exception as e:
            print("ERR", e, flush=True); break
        time.sleep(0.1)
