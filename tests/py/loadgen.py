#!/usr/bin/python3
"""The load generator: logs on over raw TLS (form POST, then CONNECT on the
same connection) and holds the tunnels. Prints one line per refusal
(`REFUSED status reason`) or failure, then summaries:
`FILLED ok= refused= fail=`, `RESUMED ok= refused=`, `AFTER status reason`,
`PROBE ok= of=`, `HOLDING`, and `DONE` once released.
Used by tests/e2e_limits.rs.

Standard library only (python3 of Debian bookworm)."""
import os, resource, socket, ssl, sys, time

def out(*a):
    print(*a, flush=True)

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

CTX = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE
HDRS = "X-Aggregate-Auth: 1\r\nX-Transcend-Version: 1\r\nUser-Agent: e2e-limits\r\n"

def tls(host, port):
    raw = socket.create_connection((host, port), timeout=10)
    return CTX.wrap_socket(raw, server_hostname=None)

def read_head(s):
    s.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        d = s.recv(65536)
        if not d:
            raise EOFError("closed after %r" % data[:200])
        data += d
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    hdrs = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        hdrs.setdefault(k.strip().lower(), []).append(v.strip())
    n = int(hdrs.get("content-length", ["0"])[0])
    while len(rest) < n:
        d = s.recv(65536)
        if not d:
            break
        rest += d
    return status, hdrs

def reason(h):
    return h.get("x-reason", [""])[0]

def logon(s, host, user, pw):
    body = ("username=%s&password=%s" % (user, pw)).encode()
    s.sendall(("POST /auth HTTP/1.1\r\nHost: %s\r\n%sContent-Type: application/x-www-form-urlencoded\r\n"
               "Content-Length: %d\r\n\r\n" % (host, HDRS, len(body))).encode() + body)
    st, h = read_head(s)
    if st != 200:
        return st, reason(h)
    for c in h.get("set-cookie", []):
        if c.startswith("webvpn="):
            return 200, c.split(";")[0]
    return 0, "no cookie"

def connect(s, host, cookie):
    s.sendall(("CONNECT /CSCOSSLC/tunnel HTTP/1.1\r\nHost: %s\r\nCookie: %s\r\nX-CSTP-Version: 1\r\n"
               "X-CSTP-Hostname: load\r\nX-CSTP-MTU: 1400\r\nX-CSTP-Address-Type: IPv4\r\n\r\n"
               % (host, cookie)).encode())
    st, h = read_head(s)
    return st, reason(h)

def attempt(host, port, user, pw):
    """("OK", sock) | ("REFUSED", status, reason) | ("FAIL", why)"""
    try:
        s = tls(host, port)
        st, r = logon(s, host, user, pw)
        if st != 200:
            s.close()
            return ("REFUSED", st, r) if st else ("FAIL", r)
        st, r = connect(s, host, r)
        if st != 200:
            s.close()
            return ("REFUSED", st, r)
        return ("OK", s)
    except Exception as e:
        return ("FAIL", repr(e))

def dpd(s):
    try:
        s.settimeout(3)
        s.sendall(b"STF\x01\x00\x00\x03\x00")
        buf = b""
        end = time.time() + 3
        while time.time() < end:
            d = s.recv(65536)
            if not d:
                return False
            buf += d
            while len(buf) >= 8:
                n = int.from_bytes(buf[4:6], "big")
                if len(buf) < 8 + n:
                    break
                if buf[6] == 4:
                    return True
                buf = buf[8 + n:]
        return False
    except Exception:
        return False

host, port, user, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
pending_n, max_attempts, extra = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
release, hold_max = sys.argv[8], float(sys.argv[9])

# Sessions authenticated now, their tunnels brought up at the limit.
pending = []
for _ in range(pending_n):
    s = tls(host, port)
    st, cookie = logon(s, host, user, pw)
    s.close()
    assert st == 200, (st, cookie)
    pending.append(cookie)
out("PENDING", len(pending))

tunnels, refused, failed, after = [], 0, 0, 0
for i in range(max_attempts):
    r = attempt(host, port, user, pw)
    if r[0] == "OK":
        tunnels.append(r[1])
    elif r[0] == "REFUSED":
        refused += 1
        out("REFUSED", r[1], r[2])
    else:
        failed += 1
        out("FAIL", r[1])
    if refused or failed:
        after += 1
        if after > extra:
            break
out("FILLED ok=%d refused=%d fail=%d" % (len(tunnels), refused, failed))

resumed, resume_refused = 0, 0
for cookie in pending:
    try:
        s = tls(host, port)
        st, r = connect(s, host, cookie)
        if st == 200:
            tunnels.append(s)
            resumed += 1
        else:
            resume_refused += 1
            out("RESUME-REFUSED", st, r)
            s.close()
    except Exception as e:
        resume_refused += 1
        out("RESUME-FAIL", repr(e))
out("RESUMED ok=%d refused=%d" % (resumed, resume_refused))

r = attempt(host, port, user, pw)
if r[0] == "OK":
    tunnels.append(r[1])
    out("AFTER 200 accepted")
else:
    out("AFTER", *r[1:])

sample = [tunnels[0], tunnels[len(tunnels) // 2], tunnels[-1]] if tunnels else []
out("PROBE ok=%d of=%d" % (sum(1 for s in sample if dpd(s)), len(sample)))

out("HOLDING")
end = time.time() + hold_max
while time.time() < end and not os.path.exists(release):
    time.sleep(0.1)
for s in tunnels:
    s.close()
out("DONE")
