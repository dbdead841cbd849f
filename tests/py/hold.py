#!/usr/bin/python3
"""`hold-serve HOST PORT`: echo lines of one connection.
`hold-client HOST PORT TRIGGER`: send "before", wait for TRIGGER to exist,
send "after" on the same connection. Used by tests/e2e_plugin.rs.

Standard library only (python3 of Debian bookworm)."""
import os, socket, sys, time

def out(*a):
    print(*a, flush=True)

def serve(host, port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port))); s.listen(1); s.settimeout(60)
    out("LISTENING")
    c, peer = s.accept()
    c.settimeout(90)
    buf = b""
    while True:
        d = c.recv(4096)
        if not d:
            break
        buf += d
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            out("GOT", line.decode())
            c.sendall(b"echo " + line + b"\n")

def client(host, port, trigger):
    s = socket.create_connection((host, int(port)), timeout=10)
    s.settimeout(60)
    def ask(word):
        s.sendall(word.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            d = s.recv(4096)
            if not d:
                raise SystemExit("connection closed")
            data += d
        return data.decode().strip()
    out("BEFORE", ask("before"))
    end = time.time() + 90
    while not os.path.exists(trigger) and time.time() < end:
        time.sleep(0.1)
    out("AFTER", ask("after"))

{"hold-serve": serve, "hold-client": client}[sys.argv[1]](*sys.argv[2:])
