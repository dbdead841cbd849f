#!/usr/bin/python3
"""Network probe for the e2e tests: TCP/UDP/TLS servers and clients, the
hostile battery against the gateway. Every operation is bounded by an
explicit timeout. Used by tests/common/mod.rs (probe_script, start_server,
probe) and tests/e2e_gateway.rs.

Standard library only (python3 of Debian bookworm)."""
import os, random, select, socket, ssl, struct, sys, time

def out(*a):
    print(*a, flush=True)

def tcp_serve(host, port, count, timeout):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port))); s.listen(16); s.settimeout(float(timeout))
    out("LISTENING")
    for _ in range(int(count)):
        try:
            c, peer = s.accept()
        except socket.timeout:
            out("TIMEOUT"); return
        c.settimeout(5)
        data = b""
        try:
            while not data.endswith(b"\n") and len(data) < 4096:
                d = c.recv(4096)
                if not d: break
                data += d
            line = data.decode(errors="replace").strip()
            out("GOT", peer[0], line)
            c.sendall(("reply from %s to %s: %s\n" % (host, peer[0], line)).encode())
        except Exception as e:
            out("ERR", repr(e))
        c.close()

def tcp_send(host, port, msg, timeout):
    s = socket.create_connection((host, int(port)), timeout=float(timeout))
    s.sendall((msg + "\n").encode())
    data = b""
    while not data.endswith(b"\n"):
        d = s.recv(4096)
        if not d: break
        data += d
    out(data.decode(errors="replace").strip())
    sys.exit(0 if data else 1)

def udp_serve(host, port, timeout):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, int(port)))
    out("LISTENING")
    end = time.time() + float(timeout)
    while time.time() < end:
        s.settimeout(max(0.05, end - time.time()))
        try:
            d, peer = s.recvfrom(65535)
        except socket.timeout:
            break
        out("GOT", peer[0], d.decode(errors="replace"))
        s.sendto(b"reply:" + d, peer)

def udp_send(host, port, msg, timeout):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.5)
    end = time.time() + float(timeout)
    while time.time() < end:
        s.sendto(msg.encode(), (host, int(port)))
        try:
            d, peer = s.recvfrom(65535)
            out(d.decode(errors="replace")); return
        except socket.timeout:
            pass
    sys.exit(1)

def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return (~s) & 0xffff

def raw_udp(src, dst, port, msg):
    # A UDP datagram with a chosen source address (IP_HDRINCL), routed by the
    # kernel by destination: i.e. into the tunnel for tunnel destinations.
    payload = msg.encode()
    udp = struct.pack("!HHHH", 40000, int(port), 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), random.randint(1, 65535), 0,
                     64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.sendto(ip + udp, (dst, 0))
    out("SENT", src, "->", dst, port)

def udp_burst(host, port, count, prefix, gap_ms):
    # `count` datagrams "<prefix>-<n>" (n = 0..count-1), gap_ms apart.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for n in range(int(count)):
        s.sendto(("%s-%d" % (prefix, n)).encode(), (host, int(port)))
        time.sleep(float(gap_ms) / 1000.0)
    out("SENT", count)

# ---------------------------------------------------------------- hostile --
def tls_ctx():
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE
    return c

def tls_connect(host, port, timeout=5):
    raw = socket.create_connection((host, port), timeout=timeout)
    return tls_ctx().wrap_socket(raw, server_hostname=None)

def read_response(s, timeout):
    """Status line + headers (or what arrived) until close/timeout."""
    s.settimeout(timeout)
    data = b""
    end = time.time() + timeout
    try:
        while b"\r\n\r\n" not in data and time.time() < end and len(data) < 65536:
            d = s.recv(65536)
            if not d:
                return data, "closed"
            data += d
    except (socket.timeout, TimeoutError):
        return data, "timeout"
    except (ssl.SSLError, OSError) as e:
        return data, "error:" + e.__class__.__name__
    return data, "response"

def status_of(data):
    try:
        return int(data.split(b" ", 2)[1])
    except Exception:
        return None

def wait_closed(s, timeout):
    s.settimeout(timeout)
    end = time.time() + timeout
    try:
        while time.time() < end:
            d = s.recv(65536)
            if not d:
                return "closed"
    except (socket.timeout, TimeoutError):
        return "open"
    except (ssl.SSLError, OSError) as e:
        return "error:" + e.__class__.__name__
    return "open"

def result(name, ok, detail):
    out("RESULT", name, "ok" if ok else "FAIL", detail)

def send_budget(s, chunks, budget, timeout):
    """Send chunks until budget bytes or the peer stops us. Returns (sent, why)."""
    s.settimeout(timeout)
    sent = 0
    try:
        for c in chunks:
            if sent >= budget:
                return sent, "budget"
            s.sendall(c)
            sent += len(c)
    except (socket.timeout, TimeoutError):
        return sent, "stalled"
    except (ssl.SSLError, OSError) as e:
        return sent, "error:" + e.__class__.__name__
    return sent, "budget"

HDRS = ("X-Aggregate-Auth: 1\r\nX-Transcend-Version: 1\r\nX-Support-HTTP-Auth: true\r\n"
        "User-Agent: e2e-hostile\r\nAccept: */*\r\n")

def h_bad_magic(host, port, cookie):
    try:
        s = tls_connect(host, port)
    except Exception as e:
        result("bad_magic", False, "TLS connect failed: %r" % e); return
    # openconnect 9.01 --authenticate prints the whole Cookie header value
    # ("openconnect_strapkey=...; webvpn=..."); accept a bare token too.
    if "webvpn=" not in cookie:
        cookie = "webvpn=" + cookie
    out("bad_magic: using cookie of %d chars" % len(cookie))
    req = ("CONNECT /CSCOSSLC/tunnel HTTP/1.1\r\nHost: %s\r\nUser-Agent: Open AnyConnect VPN Agent v9.01\r\n"
           "Cookie: %s\r\nX-CSTP-Version: 1\r\nX-CSTP-Hostname: mallory-box\r\n"
           "X-CSTP-Base-MTU: 1500\r\nX-CSTP-MTU: 1400\r\nX-CSTP-Address-Type: IPv4\r\n\r\n") % (host, cookie)
    s.sendall(req.encode())
    data, how = read_response(s, 5)
    st = status_of(data)
    if st != 200:
        result("bad_magic", False, "CONNECT with a valid cookie got %r (%s): %r" % (st, how, data[:300])); return
    # one valid keepalive, then a frame with bad magic
    s.sendall(b"STF\x01\x00\x00\x07\x00")
    s.sendall(b"XXXX\x00\x04\x00\x00abcd")
    t0 = time.time()
    r = wait_closed(s, 8)
    result("bad_magic", r != "open", "after a bad-magic frame the server: %s after %.1fs" % (r, time.time() - t0))

def h_garbage(host, port):
    s = socket.create_connection((host, port), timeout=5)
    try:
        s.sendall(bytes(random.getrandbits(8) for _ in range(4096)))
    except OSError:
        pass
    r = wait_closed(s, 10)
    result("garbage_instead_of_tls", r != "open", "server: %s" % r)

def h_truncated_hello(host, port):
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    s.shutdown(socket.SHUT_WR)
    r = wait_closed(s, 10)
    result("truncated_client_hello", r != "open", "server: %s" % r)

def h_huge_header(host, port):
    s = tls_connect(host, port)
    big = b"A" * (1 << 20)
    chunks = [b"POST / HTTP/1.1\r\nHost: x\r\n" + HDRS.encode() + b"X-Big: "] + \
             [big[i:i + 16384] for i in range(0, len(big), 16384)] + [b"\r\nContent-Length: 0\r\n\r\n"]
    sent, why = send_budget(s, chunks, 1 << 30, 10)
    data, how = read_response(s, 5)
    st = status_of(data)
    ok = st != 200
    result("header_1MB", ok, "sent %d bytes (%s); server answered %r (%s) %r" % (sent, why, st, how, data[:120]))

def h_endless_headers(host, port):
    s = tls_connect(host, port)
    def gen():
        yield b"GET / HTTP/1.1\r\nHost: x\r\n"
        i = 0
        while True:
            yield b"".join(b"X-Endless-%d: %s\r\n" % (i + k, b"v" * 40) for k in range(256))
            i += 256
    budget = 16 << 20
    sent, why = send_budget(s, gen(), budget, 10)
    data, how = read_response(s, 3)
    ok = why != "budget"
    result("endless_headers", ok, "server let us send %d bytes (%s) then %r (%s) %r" % (sent, why, status_of(data), how, data[:120]))

def h_huge_body(host, port):
    s = tls_connect(host, port)
    total = 20 << 20
    head = ("POST / HTTP/1.1\r\nHost: x\r\n" + HDRS + "Content-Type: application/xml\r\n"
            "Content-Length: %d\r\n\r\n" % total).encode()
    body0 = b'<?xml version="1.0" encoding="UTF-8"?>\n<config-auth client="vpn" type="init" aggregate-auth-version="2"><version who="vpn">v9.01</version><x>'
    def gen():
        yield head
        yield body0
        left = total - len(body0)
        pad = b"y" * 65536
        while left > 0:
            n = min(left, len(pad)); left -= n
            yield pad[:n]
    sent, why = send_budget(s, gen(), 1 << 40, 10)
    data, how = read_response(s, 5)
    st = status_of(data)
    ok = why != "budget" or (st is not None and st >= 400)
    result("xml_body_20MB", ok, "sent %d of %d bytes (%s); server answered %r (%s) %r" % (sent, total + len(head), why, st, how, data[:160]))

def h_invalid_xml(host, port):
    s = tls_connect(host, port)
    body = b'<?xml version="1.0"?><config-auth client="vpn" type="init"><<<&&&</version></config-auth'
    s.sendall(("POST / HTTP/1.1\r\nHost: x\r\n" + HDRS + "Content-Length: %d\r\n\r\n" % len(body)).encode() + body)
    data, how = read_response(s, 5)
    st = status_of(data)
    ok = how in ("response", "closed", ) or how.startswith("error")
    ok = ok and not (st == 200 and b"complete" in data)
    result("invalid_xml", ok, "server answered %r (%s) %r" % (st, how, data[:160]))

def h_bogus_cookie(host, port, cookie_header, name):
    s = tls_connect(host, port)
    req = ("CONNECT /CSCOSSLC/tunnel HTTP/1.1\r\nHost: %s\r\n%sX-CSTP-Version: 1\r\n"
           "X-CSTP-Hostname: x\r\nX-CSTP-MTU: 1400\r\nX-CSTP-Address-Type: IPv4\r\n\r\n") % (host, cookie_header)
    s.sendall(req.encode())
    data, how = read_response(s, 5)
    st = status_of(data)
    result(name, st != 200, "server answered %r (%s) %r" % (st, how, data[:160]))

def h_half_open(host, port, n, release_file, hold_max):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 256)), hard))
    socks, pending = [], {}
    for i in range(n):
        s = socket.socket(); s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        except OSError:
            s.close(); continue
        socks.append(s)
    end = time.time() + 10
    connected = set(); failed = 0
    poll = select.poll()
    fdmap = {s.fileno(): s for s in socks}
    for fd in fdmap:
        poll.register(fd, select.POLLOUT)
    while fdmap and len(connected) + failed < len(socks) and time.time() < end:
        for fd, ev in poll.poll(200):
            s = fdmap.pop(fd, None)
            if s is None: continue
            poll.unregister(fd)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0: connected.add(fd)
            else: failed += 1
    out("HALFOPEN-HOLDING connected=%d failed=%d pending=%d" % (len(connected), failed, len(fdmap)))
    hold_end = time.time() + float(hold_max)
    while time.time() < hold_end and not os.path.exists(release_file):
        time.sleep(0.05)
    # how many did the server close on its own meanwhile?
    closed_by_server = 0
    for s in socks:
        try:
            s.setblocking(False)
            if s.recv(1) == b"":
                closed_by_server += 1
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            closed_by_server += 1
    for s in socks:
        s.close()
    result("half_open_1000", True, "connected=%d failed=%d closed_by_server=%d (all closed by us now)" % (len(connected), failed, closed_by_server))

def cstp_frame(ty, payload=b""):
    return b"STF\x01" + len(payload).to_bytes(2, "big") + bytes([ty, 0]) + payload

def tcp_super(payload_len, proto=6):
    """An IPv4 TCP packet of payload_len bytes (a super-packet's shape)."""
    total = 40 + payload_len
    ip = bytes([0x45, 0]) + total.to_bytes(2, "big") + b"\x00\x00\x40\x00\x40" + bytes([proto]) + \
        b"\x00\x00" + bytes([198, 19, 250, 250]) + bytes([198, 18, 1, 2])
    tcp = (40000).to_bytes(2, "big") + (9).to_bytes(2, "big") + b"\x00" * 8 + b"\x50\x18" + b"\x00" * 6
    return ip + tcp + b"x" * payload_len

def h_gso(host, port, cookie):
    """GSO frames (intragate's extension, X-Intragate-GSO): hostile ones on a
    tunnel that negotiated GSO are dropped and the tunnel stays up (a DPD-REQ
    after them is answered); one on a tunnel that did not negotiate it
    closes that tunnel."""
    if "webvpn=" not in cookie:
        cookie = "webvpn=" + cookie
    def connect(gso):
        s = tls_connect(host, port)
        req = ("CONNECT /CSCOSSLC/tunnel HTTP/1.1\r\nHost: %s\r\nUser-Agent: intragate-plugin\r\n"
               "Cookie: %s\r\nX-CSTP-Version: 1\r\nX-CSTP-Hostname: mallory-box\r\n"
               "X-CSTP-Base-MTU: 1500\r\nX-CSTP-MTU: 1400\r\n%s\r\n") % (
                   host, cookie, "X-Intragate-GSO: 1\r\n" if gso else "")
        s.sendall(req.encode())
        data, _how = read_response(s, 5)
        return s, data
    try:
        s, data = connect(True)
    except Exception as e:
        result("gso_hostile", False, "TLS connect failed: %r" % e); return
    if status_of(data) != 200 or b"x-intragate-gso: 1" not in data.lower():
        result("gso_hostile", False, "CONNECT asking for GSO got %r" % data[:600]); return
    hostile = [
        b"\x00\x00\x00\x00" + tcp_super(3000),          # gso_size 0
        b"\x00\x00\x00\x0a" + tcp_super(3000),          # 300 segments
        b"\x00\x00\x05\x00" + tcp_super(3000)[:-1],     # IP length disagrees
        b"\xff\x00\x05\x00" + tcp_super(3000),          # reserved bits
        b"\x00\x00",                                     # truncated
        b"\x00\x00\x05\x00" + tcp_super(3000, 17),      # not TCP
        b"\x00\x00\xff\xff" + tcp_super(3000),          # segments above the MTU
        b"\x00\x00\x05\x00" + b"\x45" + b"\x00" * 30,   # garbage IP
    ]
    for p in hostile:
        s.sendall(cstp_frame(0x40, p))
    s.sendall(cstp_frame(3))
    s.settimeout(5)
    got, end = b"", time.time() + 5
    try:
        while b"STF\x01\x00\x00\x04\x00" not in got and time.time() < end:
            d = s.recv(65536)
            if not d:
                break
            got += d
    except (socket.timeout, TimeoutError, ssl.SSLError, OSError):
        pass
    result("gso_hostile", b"STF\x01\x00\x00\x04\x00" in got,
           "after %d hostile GSO frames the tunnel answered DPD: %s" % (
               len(hostile), b"STF\x01\x00\x00\x04\x00" in got))
    s.close()
    try:
        s, data = connect(False)
    except Exception as e:
        result("gso_unasked", False, "TLS connect failed: %r" % e); return
    if status_of(data) != 200 or b"intragate-gso" in data.lower():
        result("gso_unasked", False, "CONNECT without GSO got %r" % data[:600]); return
    s.sendall(cstp_frame(0x40, b"\x00\x00\x05\x00" + tcp_super(3000)))
    t0 = time.time()
    r = wait_closed(s, 8)
    result("gso_unasked", r != "open", "after a GSO frame that was not negotiated the server: %s after %.1fs"
           % (r, time.time() - t0))

def hostile(host, port, cookie, release_file):
    port = int(port)
    steps = [
        lambda: h_bad_magic(host, port, cookie),
        lambda: h_gso(host, port, cookie),
        lambda: h_garbage(host, port),
        lambda: h_truncated_hello(host, port),
        lambda: h_huge_header(host, port),
        lambda: h_endless_headers(host, port),
        lambda: h_huge_body(host, port),
        lambda: h_invalid_xml(host, port),
        lambda: h_bogus_cookie(host, port, "Cookie: webvpn=bogus0123456789\r\n", "connect_bogus_cookie"),
        lambda: h_bogus_cookie(host, port, "Cookie: webvpn=(null)\r\n", "connect_null_cookie"),
        lambda: h_bogus_cookie(host, port, "", "connect_no_cookie"),
        lambda: h_half_open(host, port, 1000, release_file, 20),
    ]
    for st in steps:
        t0 = time.time()
        try:
            st()
        except Exception as e:
            out("RESULT", "step", "ERROR", repr(e))
        out("STEP-TIME %.2f" % (time.time() - t0))
    out("DONE")

def bulk_data(n):
    return random.Random(n).randbytes(n)

def bulk_serve(host, port, count, timeout):
    """Per connection, a line "GET n" (send n bytes) or "PUT n" (receive n
    bytes); prints what it sent or received with its SHA-256."""
    import hashlib
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port))); s.listen(4); s.settimeout(float(timeout))
    out("LISTENING")
    for _ in range(int(count)):
        try:
            c, peer = s.accept()
        except socket.timeout:
            out("TIMEOUT"); return
        c.settimeout(float(timeout))
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            d = c.recv(1)
            if not d: break
            line += d
        op, n = line.decode().split()
        n = int(n)
        if op == "GET":
            data = bulk_data(n)
            c.sendall(data)
            out("SENT", n, hashlib.sha256(data).hexdigest())
        else:
            h, got = hashlib.sha256(), 0
            while got < n:
                d = c.recv(1 << 16)
                if not d: break
                h.update(d); got += len(d)
            out("RECEIVED", got, h.hexdigest())
            c.sendall(("%d %s\n" % (got, h.hexdigest())).encode())
        c.close()

def bulk_client(host, port, op, n, timeout):
    """GET: prints "GOT n sha256" of what arrived; PUT: sends n bytes and
    prints the server's "n sha256" of what it received, then ours."""
    import hashlib
    n = int(n)
    s = socket.create_connection((host, int(port)), timeout=float(timeout))
    s.settimeout(float(timeout))
    s.sendall(("%s %d\n" % (op, n)).encode())
    if op == "GET":
        h, got = hashlib.sha256(), 0
        while got < n:
            d = s.recv(1 << 16)
            if not d: break
            h.update(d); got += len(d)
        out("GOT", got, h.hexdigest())
    else:
        data = bulk_data(n)
        s.sendall(data)
        reply = b""
        while not reply.endswith(b"\n"):
            d = s.recv(256)
            if not d: break
            reply += d
        out("SERVER", reply.decode().strip())
        out("MINE", n, hashlib.sha256(data).hexdigest())

cmd, args = sys.argv[1], sys.argv[2:]
{"tcp-serve": tcp_serve, "tcp-send": tcp_send, "udp-serve": udp_serve, "udp-send": udp_send,
 "raw-udp": raw_udp, "hostile": hostile, "udp-burst": udp_burst, "bulk-serve": bulk_serve,
 "bulk-client": bulk_client}[cmd](*args)
