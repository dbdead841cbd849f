#!/usr/bin/python3
"""A TLS server playing a gateway that misbehaves as told by the URL path
(`https://127.0.0.1:PORT/MODE`): the init POST goes to `/MODE`, forms post
to `/MODE/auth`, the session token is `MODE`, so CONNECT knows it too.
Modes: `garbage`, `unauth`, `hang`, `noaddr`, `cookie401`, `unknownframe`,
`gsounasked`,
`badmagic`, `disconnect`, `transfer`, `echo` (pings the client through the
tunnel and checks one frame per TLS record), `newaddr` and `gone` (drop the
first tunnel; the reconnect gets another address, or 401), `ok`.
Used by tests/common/plugin.rs (FakeGateway).

Standard library only (python3 of Debian bookworm)."""
import os, socket, ssl, sys, threading, time

host, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
actions = {}
connects = {}

def out(*a):
    print(*a, flush=True)

def read_req(s):
    data = b""
    while b"\r\n\r\n" not in data:
        d = s.recv(65536)
        if not d:
            return None
        data += d
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode(errors="replace").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for l in lines[1:]:
        if ":" in l:
            k, v = l.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        d = s.recv(65536)
        if not d:
            return None
        rest += d
    return method, path, headers, rest[:n].decode(errors="replace")

def send(s, status, reason, headers, body=b""):
    if isinstance(body, str):
        body = body.encode()
    h = "HTTP/1.1 %d %s\r\n" % (status, reason)
    for k, v in headers:
        h += "%s: %s\r\n" % (k, v)
    h += "Content-Length: %d\r\n\r\n" % len(body)
    s.sendall(h.encode() + body)

XML = [("Content-Type", "text/xml"), ("X-Transcend-Version", "1")]

def form(mode):
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<config-auth client="vpn" type="auth-request" aggregate-auth-version="2">'
            '<opaque is-for="sg"><auth-handle>h-%s</auth-handle></opaque>'
            '<auth id="main"><message>Please log on.</message>'
            '<form method="post" action="/%s/auth">'
            '<input type="text" name="username" label="Username:"></input>'
            '<input type="password" name="password" label="Password:"></input>'
            '</form></auth></config-auth>') % (mode, mode)

TRANSFER = ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<config-auth client="vpn" type="auth-request" aggregate-auth-version="2">'
            '<opaque is-for="sg"><auth-handle>h-transfer-2</auth-handle></opaque>'
            '<auth id="transfer"><title>Session transfer</title>'
            '<message>You are already logged on: device old-laptop, intranet IP 198.18.64.9, idle 3 min.</message>'
            '<form method="post" action="/transfer/auth">'
            '<select name="action" label="Action:"><option value="transfer">Transfer</option>'
            '<option value="cancel">Cancel</option></select>'
            '</form></auth></config-auth>')

def complete(token):
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<config-auth client="vpn" type="complete" aggregate-auth-version="2">'
            '<session-token>%s</session-token><auth id="success"><message>ok</message></auth>'
            '</config-auth>') % token

def csum(b):
    if len(b) % 2:
        b += b"\0"
    t = sum(int.from_bytes(b[i:i + 2], "big") for i in range(0, len(b), 2))
    t = (t >> 16) + (t & 0xffff)
    t += t >> 16
    return (~t) & 0xffff

def icmp_echo(src, dst, seq):
    icmp = bytes([8, 0, 0, 0, 0x12, 0x34]) + seq.to_bytes(2, "big") + b"intragate-echo-%d" % seq
    c = csum(icmp)
    icmp = icmp[:2] + c.to_bytes(2, "big") + icmp[4:]
    ip = bytes([0x45, 0]) + (20 + len(icmp)).to_bytes(2, "big") + seq.to_bytes(2, "big") + b"\0\0" + bytes([64, 1, 0, 0])
    ip += socket.inet_aton(src) + socket.inet_aton(dst)
    c = csum(ip)
    ip = ip[:10] + c.to_bytes(2, "big") + ip[12:]
    return ip + icmp

def echo_test(s):
    # Ping the client's tunnel address through the tunnel, ask for a DPD,
    # and check that every TLS record from the client is exactly one frame.
    for seq in range(1, 6):
        s.sendall(frame(0, icmp_echo("198.18.98.5", "198.18.99.2", seq)))
    s.sendall(frame(3))
    replies = dpd = records = bad = 0
    end = time.time() + 4
    s.settimeout(0.5)
    while time.time() < end and not (replies >= 5 and dpd >= 1):
        try:
            d = s.recv(65536)
        except socket.timeout:
            continue
        if not d:
            break
        records += 1
        if len(d) < 8 or d[:4] != b"STF\x01" or int.from_bytes(d[4:6], "big") + 8 != len(d):
            bad += 1
            out("BAD-RECORD", d[:16].hex(), len(d))
            continue
        ty, payload = d[6], d[8:]
        if ty == 4:
            dpd += 1
        elif ty == 0 and len(payload) >= 28 and payload[9] == 1 and payload[20] == 0:
            replies += 1
    reason = "echo: replies=%d dpd=%d records=%d bad_records=%d" % (replies, dpd, records, bad)
    out(reason)
    s.sendall(frame(5, b"\xb0" + reason.encode()))

def frame(ty, payload=b""):
    return b"STF\x01" + len(payload).to_bytes(2, "big") + bytes([ty, 0]) + payload

def do_connect(s, mode):
    out("CONNECT", mode)
    if mode == "noaddr":
        s.sendall(b"HTTP/1.1 200 CONNECTED\r\nX-CSTP-Version: 1\r\nX-CSTP-MTU: 1400\r\n\r\n")
        time.sleep(5)
        return
    if mode == "cookie401":
        send(s, 401, "Unauthorized", [("X-Reason", "Cookie was rejected")])
        return
    n = connects[mode] = connects.get(mode, 0) + 1
    if mode == "gone" and n > 1:
        send(s, 401, "Unauthorized", [("X-Reason", "Session expired")])
        return
    addr = b"198.18.99.3" if mode == "newaddr" and n > 1 else b"198.18.99.2"
    s.sendall(b"HTTP/1.1 200 CONNECTED\r\nX-CSTP-Version: 1\r\n"
              b"X-CSTP-Address: " + addr + b"\r\nX-CSTP-Netmask: 255.255.255.0\r\n"
              b"X-CSTP-Split-Include: 198.18.98.0/255.255.255.0\r\n"
              b"X-CSTP-Default-Domain: hostile.example\r\n"
              b"X-CSTP-DPD: 30\r\nX-CSTP-Keepalive: 20\r\nX-CSTP-MTU: 1400\r\n\r\n")
    time.sleep(1.0)
    if mode == "unknownframe":
        s.sendall(frame(42))
    elif mode == "gsounasked":
        # A GSO frame (intragate's extension) although the reply above did
        # not grant X-Intragate-GSO.
        s.sendall(frame(0x40, b"\x00\x00\x05\x00"))
    elif mode == "badmagic":
        s.sendall(b"XXXX\x00\x04\x00\x00abcd")
    elif mode == "disconnect":
        s.sendall(frame(5, b"\xb0Session transferred to another device"))
    elif mode == "transfer":
        s.sendall(frame(5, ("\xb0test over: action=%s" % actions.get("transfer", "none")).encode("latin-1")))
    elif mode == "echo":
        echo_test(s)
    elif mode in ("newaddr", "gone") and n == 1:
        out("DROPPING", mode)
        s.close()
        return
    elif mode == "ok":
        s.sendall(frame(3))
    s.settimeout(10)
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            out("FROM-CLIENT", len(d))
    except Exception as e:
        out("CLIENT-GONE", repr(e))

def handle(conn):
    try:
        s = ctx.wrap_socket(conn, server_side=True)
    except Exception as e:
        out("TLS-FAILED", repr(e))
        return
    s.settimeout(20)
    try:
        while True:
            req = read_req(s)
            if not req:
                return
            method, path, headers, body = req
            out("REQ", method, path)
            if method == "CONNECT":
                cookie = headers.get("cookie", "")
                mode = cookie.split("webvpn=", 1)[-1].split(";")[0]
                do_connect(s, mode)
                return
            mode = path.strip("/").split("/")[0]
            if mode == "garbage":
                s.sendall(b"\x00\x01\xfe garbage \xff\xff" * 40)
                time.sleep(2)
                return
            if mode == "hang":
                time.sleep(30)
                return
            if mode == "unauth":
                send(s, 401, "Unauthorized", [("X-Reason", "Account locked by the administrator")], "locked\n")
                return
            if 'type="init"' in body:
                send(s, 200, "OK", XML, form(mode))
            elif mode == "transfer" and "<action>" not in body:
                send(s, 200, "OK", XML, TRANSFER)
            elif mode == "transfer" and "<action>cancel</action>" in body:
                actions["transfer"] = "cancel"
                send(s, 401, "Unauthorized", [("X-Reason", "Logon cancelled; the existing session was kept")])
                return
            else:
                if "<action>transfer</action>" in body:
                    actions["transfer"] = "transfer"
                send(s, 200, "OK", XML + [("Set-Cookie", "webvpn=%s; Secure" % mode)], complete(mode))
    except Exception as e:
        out("ERROR", repr(e))
    finally:
        try:
            s.close()
        except Exception:
            pass

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((host, port))
ls.listen(16)
ls.settimeout(1)
out("LISTENING")
end = time.time() + 170
while time.time() < end:
    try:
        c, _ = ls.accept()
    except socket.timeout:
        continue
    threading.Thread(target=handle, args=(c,), daemon=True).start()
