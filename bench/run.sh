#!/usr/bin/env bash
# intragate vs ocserv benchmark (issue 8). One command, as root:
#
#   sudo bench/run.sh            # full run (~20 min): prints the table,
#                                # writes bench/results/<time>.json and latest.md
#   sudo bench/run.sh --smoke    # every code path, tiny and fast (< 2 min);
#                                # exits non-zero only if the harness breaks
#   sudo BENCH_PROFILE=debug bench/run.sh --smoke   # the same with the debug
#                                # build `cargo test` made (CI: no release build)
#
# Builds intragate (release) and the load generator (bench/loadgen), installs
# missing Debian packages (iperf3, dnsperf, ocserv, dnsmasq, gnutls-bin,
# openconnect, vpnc-scripts), then runs bench/bench.py. Network namespaces are
# named igb<pid>-*, addresses come from 198.18.0.0/15 only, and everything is
# removed on exit, whatever happens (trap).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
[ "$(id -u)" = 0 ] || { echo "bench: run as root (sudo bench/run.sh)" >&2; exit 2; }

PREFIX="igb$$"
WORK=$(mktemp -d "/tmp/$PREFIX.XXXXXX")
chmod 755 "$WORK"
BENCH_PID=
cleanup() {
    set +e
    [ -n "$BENCH_PID" ] && kill -TERM "$BENCH_PID" 2>/dev/null && sleep 1
    for n in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$PREFIX-"); do
        for p in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
        ip netns del "$n" 2>/dev/null
        rm -rf "/etc/netns/$n"
    done
    rmdir /etc/netns 2>/dev/null
    if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "bench: keeping $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Namespaces left by an earlier run that died (its pid is gone).
for n in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^igb[0-9]+-' || true); do
    pid=${n#igb}; pid=${pid%%-*}
    if ! kill -0 "$pid" 2>/dev/null; then
        for p in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
        ip netns del "$n" 2>/dev/null || true
        rm -rf "/etc/netns/$n"
    fi
done

need=()
for pair in iperf3:iperf3 dnsperf:dnsperf ocserv:ocserv ocpasswd:ocserv dnsmasq:dnsmasq-base \
            certtool:gnutls-bin openconnect:openconnect prlimit:util-linux \
            slapd:slapd slapadd:slapd freeradius:freeradius radclient:freeradius-utils; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
[ -x /usr/share/vpnc-scripts/vpnc-script ] || need+=(vpnc-scripts)
if [ ${#need[@]} -gt 0 ]; then
    echo "bench: installing ${need[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
# ocserv's package starts a system service on install; this benchmark runs its own.
if systemctl is-active --quiet ocserv 2>/dev/null; then systemctl stop ocserv || true; fi
# So do slapd and freeradius (the auth block starts its own in the internal namespace).
for s in slapd freeradius; do service "$s" stop >/dev/null 2>&1 || true; done

# BENCH_PROFILE=debug uses (and builds) the debug binaries instead: for a
# smoke run in CI after `cargo test`, which has built them already.
# BENCH_PROFILE=profiling: the release build with line tables
# ([profile.profiling] in Cargo.toml; the release profile has no debug info),
# the default with --perf so that perf can name functions.
default_profile=release
for a in "$@"; do [ "$a" = --perf ] && default_profile=profiling; done
PROFILE=${BENCH_PROFILE:-$default_profile}
case $PROFILE in release|profiling|debug) ;; *) echo "bench: BENCH_PROFILE is release, profiling or debug" >&2; exit 2;; esac
if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    if [ "$PROFILE" != debug ]; then
        echo "bench: cargo build --profile $PROFILE" >&2
        cargo build --profile "$PROFILE" --bins >&2
    else
        echo "bench: cargo build --bins (debug)" >&2
        cargo build --bins >&2
    fi
    # loadgen is its own workspace; bench.py runs it from bench/loadgen/target
    # whatever CARGO_TARGET_DIR says for the gateway.
    (cd bench/loadgen && CARGO_TARGET_DIR=target cargo build --release >&2)
fi
export BENCH_PROFILE="$PROFILE"

export BENCH_NS_PREFIX="$PREFIX"
/usr/bin/python3 bench/bench.py --workdir "$WORK" "$@" &
BENCH_PID=$!
set +e
wait "$BENCH_PID"
rc=$?
BENCH_PID=
exit $rc
