#!/bin/bash
# TCP throughput through the tunnel: intragate-plugin vs openconnect, against
# the same intragate gateway, in the same namespaces, in the same run.
#
#   user ns ──veth── gw ns (intragate) ──veth── internal ns (iperf3 -s)
#
# For each client: log on, iperf3 upload (user → internal) and download (-R),
# ROUNDS rounds of SECS seconds each, alternating the clients so that machine
# noise hits both alike; the median per direction is reported, with the
# client's CPU use. Needs root, iperf3, openconnect, python3; builds release
# binaries unless INTRAGATE_BIN_DIR points at them.
#
# Usage: sudo bench/plugin_iperf.sh [SECS] [ROUNDS]     (default 10 3)
set -euo pipefail

SECS=${1:-10}
ROUNDS=${2:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN_DIR=${INTRAGATE_BIN_DIR:-$ROOT/target/release}
if [ -z "${INTRAGATE_BIN_DIR:-}" ]; then
    (cd "$ROOT" && cargo build --release --bin intragate --bin intragate-plugin >&2)
fi
GW_BIN=$BIN_DIR/intragate
PLUGIN=$BIN_DIR/intragate-plugin
for t in iperf3 openconnect python3 ip; do
    command -v $t >/dev/null || { echo "missing: $t" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }

P=igb$$
GW=$P-gw; IN=$P-in; US=$P-us
DIR=$(mktemp -d /tmp/$P.XXXX)
PIDS=()
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
    for n in $US $IN $GW; do
        ip netns pids $n 2>/dev/null | xargs -r kill -9 2>/dev/null
        ip netns del $n 2>/dev/null
        rm -rf /etc/netns/$n
    done
    rm -rf "$DIR"
}
trap cleanup EXIT

# --- topology (198.18.0.0/15 only) ------------------------------------------
for n in $GW $IN $US; do ip netns add $n; ip -n $n link set lo up; done
ip netns exec $GW sysctl -qw net.ipv4.ip_forward=1
ip -n $GW addr add 198.18.19.1/32 dev lo
ip -n $GW link add vi type veth peer name vg netns $IN
ip -n $GW addr add 198.18.1.1/24 dev vi; ip -n $GW link set vi up
ip -n $IN addr add 198.18.1.2/24 dev vg; ip -n $IN link set vg up
ip -n $IN route add 198.18.64.0/20 via 198.18.1.1
ip -n $GW link add vu0 type veth peer name vg netns $US
ip -n $GW addr add 198.18.20.1/24 dev vu0; ip -n $GW link set vu0 up
ip -n $US addr add 198.18.20.2/24 dev vg; ip -n $US link set vg up
ip -n $US route add 198.18.19.0/24 via 198.18.20.1
mkdir -p /etc/netns/$US && echo "# bench" > /etc/netns/$US/resolv.conf

# --- gateway -----------------------------------------------------------------
mkdir -p "$DIR/state"
cat > "$DIR/intragate.toml" <<EOF
[gateway]
listen = "198.18.19.1:4443"
domain = "corp.example"
state_dir = "$DIR/state"
users_file = "users"
policies_dir = "policies"
tun_name = "igt0"
mtu = 1400

[network]
internal = ["198.18.1.0/24"]

[sessions]
max_per_user = 4
dpd = 30
keepalive = 20

[[pool]]
name = "default"
cidr = "198.18.64.0/24"
EOF
echo 'bench-Secret-1' | "$GW_BIN" user add bench --group staff --password-stdin --config "$DIR/intragate.toml" >/dev/null
PIN=$("$GW_BIN" fingerprint --config "$DIR/intragate.toml" | grep -o 'pin-sha256:[A-Za-z0-9+/=]*' | head -1)
ip netns exec $GW "$GW_BIN" run --config "$DIR/intragate.toml" >"$DIR/gateway.log" 2>&1 &
GW_PID=$!
PIDS+=($GW_PID)
for _ in $(seq 100); do
    ip netns exec $GW ss -Hltn "sport = :4443" | grep -q 4443 && break; sleep 0.1
done

ip netns exec $IN iperf3 -s -B 198.18.1.2 >"$DIR/iperf-server.log" 2>&1 &
PIDS+=($!)
sleep 0.5

# --- clients -----------------------------------------------------------------
cat > "$DIR/vpnc-wrapper.sh" <<'EOF'
#!/bin/sh
# Keep openconnect's vpnc-script away from resolv.conf.
unset INTERNAL_IP4_DNS INTERNAL_IP6_DNS CISCO_DEF_DOMAIN CISCO_SPLIT_DNS
exec /usr/share/vpnc-scripts/vpnc-script "$@"
EOF
chmod +x "$DIR/vpnc-wrapper.sh"

CLIENT_PID=
start_client() { # plugin|openconnect
    case $1 in
    plugin)
        echo 'bench-Secret-1' | ip netns exec $US "$PLUGIN" connect https://198.18.19.1:4443/ \
            --user bench --password-stdin --servercert "$PIN" --interface bench0 \
            --state-dir "$DIR/plugin-state" >"$DIR/plugin.log" 2>&1 &
        CLIENT_PID=$!
        ;;
    openconnect)
        echo 'bench-Secret-1' | ip netns exec $US sh -c \
            'mount -t tmpfs -o size=1m bench-run /run && exec "$@"' sh \
            openconnect --protocol=anyconnect --no-dtls --user=bench --passwd-on-stdin --non-inter \
            --servercert "$PIN" --interface bench0 --script "$DIR/vpnc-wrapper.sh" \
            https://198.18.19.1:4443/ >"$DIR/openconnect.log" 2>&1 &
        CLIENT_PID=$!
        ;;
    esac
    for _ in $(seq 200); do
        ip netns exec $US ip -4 -o addr show dev bench0 2>/dev/null | grep -q inet \
            && ip netns exec $US ip route | grep -q "198.18.1.0/24 dev bench0" && break
        sleep 0.1
    done
    ip netns exec $US ping -c 1 -W 2 198.18.1.2 >/dev/null || { echo "$1: no tunnel" >&2; cat "$DIR/$1.log" >&2; exit 1; }
}

stop_client() {
    kill -TERM "$CLIENT_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$CLIENT_PID" 2>/dev/null || break; sleep 0.1; done
    sleep 0.3
}

machine_ticks() { # "busy total" jiffies of all CPUs
    awk '/^cpu / {b=$2+$3+$4+$7+$8; t=b+$5+$6; print b, t}' /proc/stat
}

cpu_ticks() { # utime+stime of a pid
    awk '{print $14+$15}' /proc/$1/stat 2>/dev/null || echo 0
}

# One measurement: prints "Mbit/s client-cpu% gateway-cpu%" (100 = one core).
measure() { # client direction(up|down)
    local rev=""; [ "$2" = down ] && rev="-R"
    local t0 c0 g0 c1 g1 t1 json
    c0=$(cpu_ticks "$CLIENT_PID"); g0=$(cpu_ticks "$GW_PID"); m0=$(machine_ticks); t0=$(date +%s.%N)
    json=$(ip netns exec $US iperf3 -c 198.18.1.2 -t "$SECS" -O 1 $rev -J)
    c1=$(cpu_ticks "$CLIENT_PID"); g1=$(cpu_ticks "$GW_PID"); m1=$(machine_ticks); t1=$(date +%s.%N)
    python3 - "$json" "$c0" "$c1" "$g0" "$g1" "$t0" "$t1" "$(getconf CLK_TCK)" $m0 $m1 <<'EOF'
import json, sys
j = json.loads(sys.argv[1])
bps = j["end"]["sum_received"]["bits_per_second"]
c0, c1, g0, g1, t0, t1, hz, b0, a0, b1, a1 = map(float, sys.argv[2:13])
secs = t1 - t0
print("%.0f %.0f %.0f %.0f" % (bps / 1e6, 100.0 * (c1 - c0) / hz / secs,
                               100.0 * (g1 - g0) / hz / secs, 100.0 * (b1 - b0) / max(a1 - a0, 1)))
EOF
}

declare -A RES
for r in $(seq "$ROUNDS"); do
    for c in plugin openconnect; do
        start_client $c
        for d in up down; do
            RES[$c-$d]+="$(measure $c $d);"
        done
        stop_client
    done
done

median() { # "a b;c d;..." field -> median of field
    echo "$1" | tr ';' '\n' | grep -v '^$' | awk -v f="$2" '{print $f}' | sort -n |
        awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print int((a[NR/2]+a[NR/2+1])/2)}'
}

echo
echo "TCP through the tunnel, iperf3 ${SECS}s x ${ROUNDS} rounds, median (same gateway, same namespaces)"
echo "client% / gw% = CPU time of the client / the gateway process (100 = one core);"
echo "busy% = the whole machine's CPUs busy (all processes and softirq), during the run"
printf "%-12s %9s %7s %5s %5s %11s %7s %5s %5s\n" client "up Mbit/s" client% gw% busy% "down Mbit/s" client% gw% busy%
for c in plugin openconnect; do
    printf "%-12s %9s %7s %5s %5s %11s %7s %5s %5s\n" "$c" \
        "$(median "${RES[$c-up]}" 1)" "$(median "${RES[$c-up]}" 2)" "$(median "${RES[$c-up]}" 3)" "$(median "${RES[$c-up]}" 4)" \
        "$(median "${RES[$c-down]}" 1)" "$(median "${RES[$c-down]}" 2)" "$(median "${RES[$c-down]}" 3)" "$(median "${RES[$c-down]}" 4)"
done
echo "raw (Mbit/s client% gw% busy%): plugin up [${RES[plugin-up]}] down [${RES[plugin-down]}]"
echo "raw (Mbit/s client% gw% busy%): openconnect up [${RES[openconnect-up]}] down [${RES[openconnect-down]}]"
