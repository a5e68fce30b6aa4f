#!/usr/bin/env bash
# Side-by-side figures for the performance table in docs/performance.md, measured in one run on this
# machine: kvstore against the bare tonic fixture (the ceiling of the stack), etcd and Redis,
# with the same load generator for the gRPC servers (h2load) and server CPU per request
# read from /proc. Loopback only; every server it starts is stopped by its PID.
#
#   benches/compare.sh [quick]      # quick: shorter runs, for a smoke test
#
# Needs: h2load (nghttp2-client); optional etcd (etcd-server), redis-server and
# redis-benchmark (redis-tools): the rows of a missing one say "not installed".
set -euo pipefail
cd "$(dirname "$0")/.."

requests=${REQUESTS:-400000}
warmup=20000
[ "${1:-}" = quick ] && requests=50000 && warmup=5000
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --release --quiet -p kvstore -p kvstore-bench --bin kvstore-server --bin kvstore-bench
server=target/release/kvstore-server
bench=target/release/kvstore-bench

# gRPC request bodies: a 5-byte frame header, then the protobuf message.
python3 - "$work" <<'EOF'
import struct, sys
work = sys.argv[1]
def frame(name, message):
    open(f"{work}/{name}", "wb").write(b"\x00" + struct.pack(">I", len(message)) + message)
key, value = b"bench:0000000001", b"v" * 64
field = lambda n, b: bytes([n << 3 | 2, len(b)]) + b
frame("get.bin", field(1, key))                          # GetRequest / RangeRequest key
frame("set.bin", field(1, key) + field(2, value))        # SetRequest / PutRequest
frame("range.bin", field(1, key) + b"\x38\x01")          # RangeRequest, serializable = true
EOF

wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  return 1
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# h2load PID PORT PATH BODY CONNECTIONS STREAMS -> "req/s cpu_us_per_req p50_ms"
h2() {
  local pid=$1 port=$2 path=$3 body=$4 c=$5 m=$6 n=$requests
  [ "$c" = 1 ] && [ "$m" = 1 ] && n=$((requests / 8))
  local args=(-c "$c" -m "$m" -H 'content-type: application/grpc' -H 'te: trailers' -d "$work/$body")
  h2load -n "$warmup" "${args[@]}" "http://127.0.0.1:$port$path" >/dev/null
  local t0 t1 out
  t0=$(cpu_ticks "$pid")
  out=$(h2load -n "$n" "${args[@]}" "http://127.0.0.1:$port$path")
  t1=$(cpu_ticks "$pid")
  if ! grep -q "$n succeeded" <<<"$out"; then
    echo "h2load did not succeed on $path:" >&2
    grep -E "requests:|status codes" <<<"$out" >&2
  fi
  local rps p50
  rps=$(grep -oP 'finished in [0-9.]+m?s, \K[0-9.]+' <<<"$out")
  p50=$(grep -P '^time for request:' <<<"$out" | awk '{print $6}')
  python3 -c "print(f'{$rps:.0f} {($t1-$t0)/$(getconf CLK_TCK)*1e6/$n:.1f} $p50')"
}

# start VAR PORT COMMAND...: runs COMMAND in the background, waits for PORT, and sets VAR to
# its PID. Not a $(...) subshell, so the PID is recorded here for the cleanup trap.
start() {
  local var=$1 port=$2
  shift 2
  "$@" >"$work/$port.log" 2>&1 &
  pids+=($!)
  printf -v "$var" '%s' "$!"
  wait_port "$port"
}

row() { printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4"; }

echo "# kvstore-compare $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, $(uname -r)"
echo
echo "| what | req/s | server CPU µs/req | mean latency |"
echo "| --- | --- | --- | --- |"

start kv 50551 "$server" --listen 127.0.0.1:50551 --health-listen "" --log-level info --log-format json
start bare 50552 "$bench" bare-server --listen 127.0.0.1:50552
for target in "kvstore $kv 50551" "bare tonic $bare 50552"; do
  read -r name pid port <<<"${target/bare tonic/bare_tonic}"
  for rpc in Get Set; do
    body=$([ $rpc = Get ] && echo get.bin || echo set.bin)
    read -r rps cpu p50 < <(h2 "$pid" "$port" "/kvstore.KeyValueStore/$rpc" "$body" 4 32)
    row "${name/_/ } $rpc, 4 conns x 32 streams" "$rps" "$cpu" "$p50"
  done
  read -r rps cpu p50 < <(h2 "$pid" "$port" /kvstore.KeyValueStore/Get get.bin 1 1)
  row "${name/_/ } Get, 1 conn x 1 stream" "$rps" "$cpu" "$p50"
done

if command -v etcd >/dev/null; then
  start etcd_pid 52379 etcd --data-dir "$work/etcd" --name bench \
    --listen-client-urls http://127.0.0.1:52379 --advertise-client-urls http://127.0.0.1:52379 \
    --listen-peer-urls http://127.0.0.1:52380 --initial-advertise-peer-urls http://127.0.0.1:52380 \
    --initial-cluster bench=http://127.0.0.1:52380 --log-level error
  h2 "$etcd_pid" 52379 /etcdserverpb.KV/Put set.bin 4 32 >/dev/null # the key must exist
  read -r rps cpu p50 < <(h2 "$etcd_pid" 52379 /etcdserverpb.KV/Range range.bin 4 32)
  row "etcd $(etcd --version | head -1 | awk '{print $3}') serializable Range, 4 x 32" "$rps" "$cpu" "$p50"
  read -r rps cpu p50 < <(h2 "$etcd_pid" 52379 /etcdserverpb.KV/Put set.bin 4 32)
  row "etcd Put, 4 x 32" "$rps" "$cpu" "$p50"
else
  row "etcd" "not installed" "" ""
fi

if command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null; then
  start redis_pid 56390 redis-server --port 56390 --bind 127.0.0.1 --save "" --appendonly no
  for pipeline in 1 16; do
    out=$(redis-benchmark -p 56390 -t get,set -n "$((requests * 2))" -c 128 -P "$pipeline" -d 64 -q 2>/dev/null | tr '\r' '\n')
    for op in GET SET; do
      rps=$(grep -oP "^$op: \K[0-9.]+" <<<"$out" | tail -1)
      row "redis-benchmark $op, 128 clients, pipeline $pipeline" "$rps" "" ""
    done
  done
else
  row "redis" "not installed" "" ""
fi

echo
echo "Batch path (kvstore-bench batch, 100 ops per call, 90% gets, every key set first):"
"$bench" batch --server "127.0.0.1:50551" --preload --batch-size 100 --get-ratio 0.9 --connections 4 \
  --concurrency 8 --duration "$([ "${1:-}" = quick ] && echo 3s || echo 10s)" 2>/dev/null | sed 's/^/    /'

echo
echo "Memory: 1,000,000 keys of 16 bytes with 64-byte values (RSS settled after loading, default settings):"
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# RSS once it has settled: both servers return freed memory to the system a little after a
# load (kvstore's allocator purges over about a second), so read every half second until the
# RSS has held within 1% for 2 s, longer than that, for at most 15 s.
settled_rss_kib() {
  local held now steady=0
  held=$(rss_kib "$1")
  for _ in $(seq 30); do
    sleep 0.5
    now=$(rss_kib "$1")
    if [ $(( (held > now ? held - now : now - held) * 100 )) -le "$now" ]; then
      steady=$((steady + 1))
      [ "$steady" -ge 4 ] && break
    else
      held=$now
      steady=0
    fi
  done
  echo "$now"
}
start mem 50553 "$server" --listen 127.0.0.1:50553 --health-listen "" --log-level warn
before=$(rss_kib "$mem")
"$bench" load-keys --server 127.0.0.1:50553 --keys 1000000 --key-size 16 --value-size 64 >/dev/null 2>&1
after=$(settled_rss_kib "$mem")
echo "    kvstore: $((after / 1024)) MiB RSS ($(( (after - before) * 1024 / 1000000 )) bytes per key above the empty server's $((before / 1024)) MiB)"
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
  start redis_mem 56391 redis-server --port 56391 --bind 127.0.0.1 --save "" --appendonly no
  before=$(rss_kib "$redis_mem")
  python3 -c '
import sys
out = sys.stdout.buffer
value = b"v" * 64
for i in range(1_000_000):
    key = b"key:%012d" % i
    out.write(b"*3\r\n$3\r\nSET\r\n$16\r\n" + key + b"\r\n$64\r\n" + value + b"\r\n")
' | redis-cli -p 56391 --pipe >/dev/null
  after=$(settled_rss_kib "$redis_mem")
  echo "    redis $(redis-server --version | grep -oP 'v=\K[0-9.]+'): $((after / 1024)) MiB RSS ($(( (after - before) * 1024 / 1000000 )) bytes per key above its empty $((before / 1024)) MiB)"
fi
