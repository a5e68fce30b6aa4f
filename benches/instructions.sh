#!/usr/bin/env bash
# Instructions per unary call, kvstore-server against the bare tonic fixture, counted by
# callgrind: unlike req/s or CPU time, the count is the same from run to run whatever else the
# machine is doing, so it is the steady figure for "how close to the stack's ceiling".
# Each server runs under valgrind; h2load warms it up, then callgrind counts exactly N calls
# (4 connections x 32 streams, 64-byte values). Loopback only; servers are stopped by PID.
#
#   benches/instructions.sh [N]      # N calls per figure, 10000 by default
#
# Needs: valgrind, h2load (nghttp2-client).
set -euo pipefail
cd "$(dirname "$0")/.."

n=${1:-10000}
work=$(mktemp -d)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --release --quiet -p kvstore -p kvstore-bench --bin kvstore-server --bin kvstore-bench

python3 - "$work" <<'EOF'
import struct, sys
work = sys.argv[1]
def frame(name, message):
    open(f"{work}/{name}", "wb").write(b"\x00" + struct.pack(">I", len(message)) + message)
key, value = b"bench:0000000001", b"v" * 64
field = lambda n, b: bytes([n << 3 | 2, len(b)]) + b
frame("Get.bin", field(1, key))
frame("Set.bin", field(1, key) + field(2, value))
EOF

# count LABEL PORT OP SERVER-COMMAND... -> instructions per call
count() {
  local port=$1 op=$2
  shift 2
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.$op.%p" \
    "$@" >"$work/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.2
  done
  local args=(-c 4 -m 32 -H 'content-type: application/grpc' -H 'te: trailers' -d "$work/$op.bin")
  local url="http://127.0.0.1:$port/kvstore.KeyValueStore/$op"
  h2load -n 2000 "${args[@]}" "$url" >/dev/null
  callgrind_control -i on "$server_pid" >/dev/null 2>&1
  h2load -n "$n" "${args[@]}" "$url" | grep -q "$n succeeded"
  # The dump holds what was counted since instrumentation went on: exactly the N calls.
  callgrind_control -d "$server_pid" >/dev/null 2>&1
  kill "$server_pid"
  wait "$server_pid" 2>/dev/null || true
  local total
  total=$(awk '/^summary:/ {print $2; exit}' "$work/cg.$op.$server_pid.1")
  server_pid=""
  rm -f "$work"/cg."$op".*
  echo $((total / n))
}

echo "# instructions per call, $n calls at 4 x 32 (callgrind), $(date -u +%Y-%m-%dT%H:%MZ)"
echo
echo "| call | kvstore-server | bare tonic fixture | bare / kvstore |"
echo "| --- | --- | --- | --- |"
for op in Get Set; do
  kv=$(count 50561 "$op" target/release/kvstore-server --listen 127.0.0.1:50561 \
    --health-listen "" --log-level warn)
  bare=$(count 50562 "$op" target/release/kvstore-bench bare-server --listen 127.0.0.1:50562)
  echo "| $op | $kv | $bare | $((100 * bare / kv))% |"
done
