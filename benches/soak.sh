#!/usr/bin/env bash
# Soak: one kvstore-server on loopback under 10,000 held subscribers with writers, a
# well-behaved unary client and every kind of hostile client of `kvstore-bench hostile` in
# turn (never-reading subscribers, silent connections, a flooder past its rate limit, and the
# kinds of issues #20 and #21: body-less calls, zero windows, snapshot and replay churn,
# control-frame floods, partial health messages, one source's connections, log floods,
# subscription hogs, prefix lengths; and issue #13's Batch and List calls asking for
# answers far over limits.max_response_bytes) for MINUTES minutes. Prints the server's RSS
# and open subscriptions and connections every 10 s, the load tool's reports, the metrics
# counters at the end, and the RSS once every client has left. Every process it starts is
# stopped by its PID.
#
#   benches/soak.sh [MINUTES] [SUBSCRIBERS]       # defaults: 5 minutes, 10000 subscribers
#
# The server runs with a rate limit of 5,000 calls/s per client address (burst 10,000) and
# a 2 s handshake timeout; each load runs from its own 127.x address, so each is one client.
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=${1:-5}
subscribers=${2:-10000}
[[ $minutes =~ ^[0-9]+$ && $minutes -ge 1 ]] || { echo "MINUTES must be a whole number >= 1" >&2; exit 2; }
[[ $subscribers =~ ^[0-9]+$ && $subscribers -ge 1 ]] || { echo "SUBSCRIBERS must be a whole number >= 1" >&2; exit 2; }
seconds=$((minutes * 60))
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

KVSTORE_RATE_LIMIT__PER_CLIENT=5000 KVSTORE_RATE_LIMIT__BURST=10000 \
  KVSTORE_SERVER__HANDSHAKE_TIMEOUT=2s KVSTORE_SUBSCRIPTIONS__MAX=$((subscribers + 1000)) \
  KVSTORE_SUBSCRIPTIONS__MAX_PER_CLIENT=$((subscribers + 1000)) \
  "$server" --listen 127.0.0.1:0 --health-listen 127.0.0.1:0 >"$work/server.log" 2>&1 &
server_pid=$!
pids+=("$server_pid")

# The ports the server chose, from its start-up log.
listening() { grep -o "\"listener\":\"$1\",\"addr\":\"[^\"]*\"" "$work/server.log" | sed 's/.*"addr":"\(.*\)"/\1/'; }
for _ in $(seq 100); do
  [ -n "$(listening main)" ] && [ -n "$(listening health)" ] && break
  sleep 0.1
done
main=$(listening main)
health=$(listening health)
[ -n "$main" ] && [ -n "$health" ] || { echo "the server did not start:" >&2; cat "$work/server.log" >&2; exit 1; }
echo "kvstore-server PID $server_pid on $main (metrics on $health), $minutes min, $subscribers subscribers"

# GET /metrics over HTTP/1.0, in bash alone; a loopback Host, which server.allowed_hosts always lets in.
metrics() {
  local host=${health%:*} port=${health##*:}
  exec 3<>"/dev/tcp/$host/$port"
  printf 'GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
  sed '1,/^\r$/d' <&3
  exec 3<&-
}
sample() { metrics | awk -v name="$1" '$1 == name { print $2 }'; }
rss_mib() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$server_pid/status"; }
report() {
  printf '%6ss  RSS %8s MiB  subscriptions %6s  connections %5s\n' "$1" "$(rss_mib)" \
    "$(sample kvstore_subscriptions_open)" "$(sample 'kvstore_connections_open{listener="main"}')"
}
report 0

# Subscribers and their writers for the whole soak, then they leave.
"$bench" subscribers --server "$main" --server-pid "$server_pid" --source 127.0.0.3 \
  --subscribers "$subscribers" --hold 5s --rate 200 --writers 2 --duration "${seconds}s" \
  --settle 5s >"$work/subscribers.txt" 2>/dev/null &
subscribers_pid=$!
pids+=("$subscribers_pid")
for _ in $(seq 600); do
  [ "$(sample kvstore_subscriptions_open)" = "$subscribers" ] && break
  sleep 0.1
done

# The well-behaved client in rounds without and with each kind of hostile client: two
# rounds of 15 s per kind and pair, so as many pairs as fit in the soak (at least one).
kinds=never-reading,silent,flood,all,body-less,zero-window,snapshot-churn,control-flood
kinds+=,partial-health,one-source,log-flood,subscription-hog,replay-churn,prefix-lengths
kinds+=,big-answers
repeat=$(((seconds - 10) / (15 * 30)))
((repeat >= 1)) || repeat=1
"$bench" hostile --server "$main" --server-pid "$server_pid" --server-log "$work/server.log" \
  --source 127.0.0.1 --hostile-source 127.0.0.2 --hostile "$kinds" \
  --rate 3000 --connections 2 --concurrency 16 --duration 15s --repeat "$repeat" --preload \
  >"$work/hostile.txt" 2>/dev/null &
hostile_pid=$!
pids+=("$hostile_pid")

started=$SECONDS
while kill -0 "$subscribers_pid" 2>/dev/null || kill -0 "$hostile_pid" 2>/dev/null; do
  sleep 10
  report $((SECONDS - started))
done
wait "$subscribers_pid" || echo "kvstore-bench subscribers failed" >&2
wait "$hostile_pid" || echo "kvstore-bench hostile failed" >&2

echo
echo "== subscribers"
cat "$work/subscribers.txt"
echo
echo "== hostile (the well-behaved client's rounds, then with/without ratios per kind)"
cat "$work/hostile.txt"
echo
echo "== metrics counters at the end (non-zero)"
metrics | grep -E '^kvstore_(grpc_requests_total|events_|subscribers_lagged|limit_refusals|connections_open|subscriptions_open)' | grep -v ' 0$'
echo
report "end"
kill -TERM "$server_pid"
wait "$server_pid" && echo "kvstore-server exited 0" || echo "kvstore-server exited $?"
