# kvstore tasks. `just` lists them; `just NAME` runs one. Install just with
# `pip install rust-just` or `cargo install just`.

set shell := ["bash", "-euo", "pipefail", "-c"]

# podman or docker, whichever is installed (podman first); override: CONTAINER_ENGINE=docker
engine := env("CONTAINER_ENGINE", `command -v podman >/dev/null && echo podman || echo docker`)
compose := if engine == "podman" { "podman-compose" } else { engine + " compose" }
# podman's default OCI format has no HEALTHCHECK; the docker format keeps it.
image_format := if engine == "podman" { "--format docker" } else { "" }
server_image := env("KVSTORE_IMAGE", "localhost/kvstore-server:latest")
client_image := env("KVSTORE_CLIENT_IMAGE", "localhost/kvstore-client:latest")
version := `sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1`

# List the recipes
default:
    @just --list --unsorted

# Build the server (release)
build:
    cargo build --release --locked -p kvstore --bin kvstore-server

# Build the client (release)
build-client:
    cargo build --release --locked -p kvstore --bin kvstore-client

# Build both, and copy them to ./bin/ (./bin/kvstore-server, ./bin/kvstore-client)
build-all:
    cargo build --release --locked -p kvstore --bins
    mkdir -p bin
    cp target/release/kvstore-server target/release/kvstore-client bin/

# Run every test, the load tool's (benches/kvstore-bench) too
test *args:
    cargo test --locked --workspace {{ args }}

# Check formatting and lints, as CI does
lint:
    cargo fmt --all --check
    cargo clippy --locked --workspace --all-targets -- -D warnings

# Check that proto/kvstore.proto compiles, and list its services and their methods
proto:
    @# build.rs compiles the proto on every build (protox: no protoc, no generated files).
    cargo check --locked --lib --quiet
    @if command -v grpcurl >/dev/null; then \
        for service in $(grpcurl -import-path proto -proto kvstore.proto list); do \
            echo "$service"; \
            grpcurl -import-path proto -proto kvstore.proto list "$service" | sed 's/^/  /'; \
        done; \
    else \
        grep -E '^\s*(service|rpc) ' proto/kvstore.proto; \
    fi

# Run one server with config/kvstore.toml (gRPC + HTTP on 50051, health on 8080)
run *args:
    cargo run --release --locked -p kvstore --bin kvstore-server -- --config config/kvstore.toml {{ args }}

# Run two independent servers (50051/8080 and 50052/8081) as local processes; Ctrl-C stops both
run-pair: build
    #!/usr/bin/env bash
    set -euo pipefail
    # Job control puts each server in its own process group: Ctrl-C reaches only this
    # script, which sends each server one SIGTERM (a second signal would skip the drain).
    set -m
    server=target/release/kvstore-server
    "$server" --config config/kvstore.toml --listen 0.0.0.0:50051 --health-listen 0.0.0.0:8080 &
    first=$!
    "$server" --config config/kvstore.toml --listen 0.0.0.0:50052 --health-listen 0.0.0.0:8081 &
    second=$!
    stopped=""
    stop() {
        [[ -n $stopped ]] && return
        stopped=1
        kill -TERM "$first" "$second" 2>/dev/null || true
    }
    trap stop INT TERM
    # Until either server exits or Ctrl-C; then both stop.
    wait -n "$first" "$second" || true
    stop
    wait

# Build the load tool (release): target/release/kvstore-bench
build-bench:
    cargo build --release --locked -p kvstore-bench

# Remove build outputs and ./bin/
clean:
    cargo clean
    rm -rf bin

# Build the server and client images (podman or docker)
image:
    {{ engine }} build {{ image_format }} --file Containerfile --target server \
        --build-arg VERSION={{ version }} -t {{ server_image }} .
    {{ engine }} build {{ image_format }} --file Containerfile --target client \
        --build-arg VERSION={{ version }} -t {{ client_image }} .

# Run the server image in the background (localhost:50051 and :8080), named kvstore
image-run:
    {{ engine }} run --detach --name kvstore -p 127.0.0.1:50051:50051 -p 127.0.0.1:8080:8080 {{ server_image }}

# Stop (SIGTERM; it drains) and remove the container that image-run started
image-stop:
    {{ engine }} stop kvstore
    {{ engine }} rm kvstore

# Start compose.yaml in the background: `just compose-up`, or `just compose-up proxy` for nginx
compose-up profile="":
    {{ compose }} {{ if profile != "" { "--profile " + profile } else { "" } }} up --detach

# Stop and remove what compose-up started (also the proxy profile, and its certificate volume)
compose-down:
    {{ compose }} --profile proxy down --volumes

# Follow the compose services' logs
compose-logs *args:
    {{ compose }} --profile proxy logs --follow {{ args }}

# A self-signed EC P-256 certificate for localhost in certs/ (server.pem, server.key): EC keys
# cost the server ~385 µs a TLS handshake, RSA-2048 ~1,250 µs, RSA-4096 ~5,650 µs (docs/operations.md, TLS)
certs dir="certs":
    mkdir -p {{ dir }}
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -keyout {{ dir }}/server.key -out {{ dir }}/server.pem -subj /CN=localhost \
        -addext subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1 \
        -addext basicConstraints=critical,CA:FALSE
    chmod 600 {{ dir }}/server.key
    @echo "KVSTORE_TLS__CERT={{ dir }}/server.pem KVSTORE_TLS__KEY={{ dir }}/server.key just run"
    @echo "kvstore-client --server localhost:50051 --ca-cert {{ dir }}/server.pem health"

# Side-by-side figures vs bare tonic, etcd and Redis (docs/performance.md); `just bench quick`
bench *args:
    bash benches/compare.sh {{ args }}

# Instructions per unary call, kvstore-server vs the bare fixture, by callgrind: `just bench-instructions 10000`
bench-instructions *args:
    bash benches/instructions.sh {{ args }}

# The store's criterion micro-benchmarks (contention, idle subscribers, prefix listing)
bench-store:
    cargo bench --locked --bench store
