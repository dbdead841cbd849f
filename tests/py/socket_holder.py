#!/usr/bin/python3
"""`HOST PORT CMD..`: owns the listening socket; runs CMD with it as fd 3 and
`LISTEN_PID`/`LISTEN_FDS` set; SIGUSR1 restarts the command (SIGTERM, wait,
start again); SIGTERM stops both. Used by tests/e2e_restart.rs.

Standard library only (python3 of Debian bookworm)."""
import os, signal, socket, subprocess, sys, time
host, port, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(1024)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
child = None
restart = False
def start():
    global child
    child = subprocess.Popen(["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh"] + cmd, pass_fds=[3])
    print("HOLDER STARTED", child.pid, flush=True)
def on_usr1(*a):
    global restart
    restart = True
def on_term(*a):
    child.terminate()
    try: child.wait(10)
    except Exception: child.kill()
    sys.exit(0)
signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGTERM, on_term)
start()
end = time.time() + 600
while time.time() < end:
    time.sleep(0.02)
    if restart:
        restart = False
        child.terminate(); child.wait(10)
        print("HOLDER RESTARTING", flush=True)
        start()
    elif child.poll() is not None:
        print("HOLDER CHILD EXITED", child.returncode, flush=True)
        sys.exit(1)
