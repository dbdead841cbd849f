#!/usr/bin/python3
"""Probe for the NAT tests (tests/e2e_nat.rs), bounded by explicit timeouts
everywhere.

Standard library only (python3 of Debian bookworm)."""
import socket, sys, time

def out(*a):
    print(*a, flush=True)

def serve(host, port, seconds):
    # Accept connections until `seconds` pass; print ACCEPTED <peer>, read
    # one line, answer it.
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port))); s.listen(16)
    out("LISTENING")
    end = time.time() + float(seconds)
    while time.time() < end:
        s.settimeout(max(0.05, end - time.time()))
        try:
            c, peer = s.accept()
        except socket.timeout:
            break
        out("ACCEPTED", peer[0], peer[1])
        c.settimeout(2)
        try:
            data = b""
            while not data.endswith(b"\n") and len(data) < 4096:
                d = c.recv(4096)
                if not d: break
                data += d
            c.sendall(b"pong " + data)
        except Exception as e:
            out("ERR", repr(e))
        c.close()
    out("DONE")

def connect(src, host, port, timeout):
    # TCP from source address `src` ("-": any): CONNECTED <reply> (exit 0),
    # or TIMEOUT / REFUSED / ERROR (exit 1).
    s = socket.socket()
    if src != "-":
        s.bind((src, 0))
    s.settimeout(float(timeout))
    try:
        s.connect((host, int(port)))
        s.sendall(b"ping\n")
        data = b""
        while not data.endswith(b"\n"):
            d = s.recv(4096)
            if not d: break
            data += d
        out("CONNECTED", data.decode(errors="replace").strip())
        sys.exit(0)
    except socket.timeout:
        out("TIMEOUT"); sys.exit(1)
    except ConnectionRefusedError:
        out("REFUSED"); sys.exit(1)
    except OSError as e:
        out("ERROR", repr(e)); sys.exit(1)

def udp_from(src, host, port, timeout):
    # One UDP exchange from source `src` ("-": any), retried every 0.5 s:
    # REPLY <text> (exit 0), REFUSED (an ICMP port unreachable came back)
    # or TIMEOUT (exit 1).
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if src != "-":
        s.bind((src, 0))
    s.connect((host, int(port)))
    s.settimeout(0.5)
    end = time.time() + float(timeout)
    while time.time() < end:
        try:
            s.send(b"udp-ping")
            d = s.recv(65535)
            out("REPLY", d.decode(errors="replace")); sys.exit(0)
        except socket.timeout:
            pass
        except ConnectionRefusedError:
            out("REFUSED"); sys.exit(1)
    out("TIMEOUT"); sys.exit(1)

def hold(host, port, seconds):
    # Open a TCP connection and keep it open `seconds`, then close it.
    s = socket.create_connection((host, int(port)), timeout=5)
    out("HOLDING", s.getsockname()[0], s.getsockname()[1])
    time.sleep(float(seconds))
    s.close()
    out("CLOSED")

class Ftp:
    def __init__(self, host, timeout):
        self.s = socket.create_connection((host, 21), timeout=float(timeout))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
    def reply(self, timeout):
        # One complete reply (multi-line aware) or None on timeout.
        self.s.settimeout(float(timeout))
        end = time.time() + float(timeout)
        try:
            while True:
                lines = self.buf.split(b"\r\n")
                for i, l in enumerate(lines[:-1]):
                    if len(l) >= 4 and l[:3].isdigit() and l[3:4] == b" ":
                        r = b"\r\n".join(lines[:i + 1])
                        self.buf = b"\r\n".join(lines[i + 1:])
                        return r.decode(errors="replace")
                if time.time() >= end:
                    return None
                d = self.s.recv(4096)
                if not d:
                    return "<closed>"
                self.buf += d
        except (socket.timeout, TimeoutError):
            return None
        except OSError as e:
            return "<error %r>" % e
    def send(self, *parts, gap=0.3):
        # Each part is its own write (TCP_NODELAY): its own segment, `gap`
        # seconds apart.
        for i, p in enumerate(parts):
            if i: time.sleep(gap)
            self.s.sendall(p.encode())

def ftp_forge(host, kind, target, tport, split, timeout):
    # Log on anonymously, send PORT/EPRT naming target:tport (split across two
    # segments when split == "split"), then if the server accepted it, LIST.
    f = Ftp(host, timeout)
    out("BANNER", f.reply(timeout))
    f.send("USER anonymous\r\n")
    r = f.reply(timeout); out("USER", r)
    if r and r.startswith("331"):
        f.send("PASS e2e@\r\n"); out("PASS", f.reply(timeout))
    tport = int(tport)
    if kind == "PORT":
        cmd = "PORT %s,%d,%d\r\n" % (target.replace(".", ","), tport >> 8, tport & 255)
    else:
        cmd = "EPRT |1|%s|%d|\r\n" % (target, tport)
    if split == "split":
        k = len(cmd) // 2
        f.send(cmd[:k], cmd[k:])
    else:
        f.send(cmd)
    r = f.reply(timeout)
    out("PORT-REPLY", r if r is not None else "NONE")
    if r and r.startswith("200"):
        f.send("LIST\r\n")
        out("LIST-REPLY", f.reply(timeout))
        out("LIST-END", f.reply(timeout))
    f.s.close()
    out("END")

def ftp_active(host, kind, split, gap, path, rounds, timeout):
    # Active-mode RETR of `path`, `rounds` times on one control connection,
    # each with PORT/EPRT naming our own address (split across two segments
    # `gap` seconds apart when split == "split"). Prints SHA256 <hex> <len>
    # per round.
    import hashlib
    f = Ftp(host, timeout)
    out("BANNER", f.reply(timeout))
    f.send("USER anonymous\r\n")
    r = f.reply(timeout); out("USER", r)
    if r and r.startswith("331"):
        f.send("PASS e2e@\r\n"); out("PASS", f.reply(timeout))
    f.send("TYPE I\r\n"); out("TYPE", f.reply(timeout))
    me = f.s.getsockname()[0]
    for n in range(int(rounds)):
        l = socket.socket(); l.bind((me, 0)); l.listen(1); l.settimeout(float(timeout))
        port = l.getsockname()[1]
        if kind == "PORT":
            cmd = "PORT %s,%d,%d\r\n" % (me.replace(".", ","), port >> 8, port & 255)
        else:
            cmd = "EPRT |1|%s|%d|\r\n" % (me, port)
        if split == "split":
            k = len(cmd) // 2
            f.send(cmd[:k], cmd[k:], gap=float(gap))
        else:
            f.send(cmd)
        r = f.reply(timeout); out("PORT-REPLY", r)
        if not r or not r.startswith("200"):
            sys.exit(1)
        f.send("RETR %s\r\n" % path)
        r = f.reply(timeout); out("RETR-REPLY", r)
        if not r or not r.startswith("150"):
            sys.exit(1)
        try:
            c, peer = l.accept()
        except socket.timeout:
            out("NO-DATA-CONNECTION"); sys.exit(1)
        out("DATA-FROM", peer[0])
        c.settimeout(float(timeout))
        h = hashlib.sha256(); total = 0
        while True:
            d = c.recv(65536)
            if not d: break
            h.update(d); total += len(d)
        c.close(); l.close()
        out("SHA256", h.hexdigest(), total)
        out("DONE-REPLY", f.reply(timeout))
    f.send("QUIT\r\n"); out("QUIT", f.reply(timeout))
    f.s.close()

cmd, args = sys.argv[1], sys.argv[2:]
{"serve": serve, "connect": connect, "hold": hold, "ftp-forge": ftp_forge,
 "ftp-active": ftp_active, "udp-from": udp_from}[cmd](*args)
