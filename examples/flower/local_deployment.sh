#!/usr/bin/env bash
# A real (not simulated) Flower deployment of the Meerkat app on ONE machine: a TLS-secured
# SuperLink and one SuperNode per site, each pointed at its own private data file through its
# node config. On real sites the same commands run on different machines (see README.md).
#
#   bash local_deployment.sh WORKDIR SITE0.csv SITE1.csv [...] [-- extra flwr run args]
#
# e.g. bash local_deployment.sh /tmp/meerkat-deploy a.csv b.csv c.csv -- --run-config "rounds=2"
# Every process it starts is stopped when it exits.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mkdir -p "$1" && cd "$1" && pwd)"; shift
sites=()
while [[ $# -gt 0 && "$1" != "--" ]]; do sites+=("$(realpath "$1")"); shift; done
[[ $# -gt 0 ]] && shift  # drop "--"
[[ ${#sites[@]} -ge 1 ]] || { echo "give at least one site data file" >&2; exit 2; }
port="${MEERKAT_SUPERLINK_PORT:-9093}"
export FLWR_HOME="$work/flwr-home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
mkdir -p "$work/certs" "$work/logs" "$FLWR_HOME"

# 1. TLS: a private CA and a server certificate for the SuperLink's address.
c="$work/certs"
if [[ ! -f "$c/server.pem" ]]; then
  openssl req -x509 -newkey rsa:4096 -nodes -days 30 -subj "/CN=meerkat-ca" -keyout "$c/ca.key" -out "$c/ca.crt" 2>/dev/null
  openssl req -newkey rsa:4096 -nodes -subj "/CN=localhost" -keyout "$c/server.key" -out "$c/server.csr" 2>/dev/null
  printf "subjectAltName=DNS:localhost,IP:127.0.0.1\n" > "$c/san.ext"
  openssl x509 -req -in "$c/server.csr" -CA "$c/ca.crt" -CAkey "$c/ca.key" -CAcreateserial -days 30 \
    -extfile "$c/san.ext" -out "$c/server.pem" 2>/dev/null
fi

# Each Flower process gets its own process group (setsid), so stopping it also stops the
# SuperExec/ServerApp/ClientApp processes it spawned.
pids=()
cleanup() { for p in "${pids[@]}"; do kill -- "-$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# 2. The SuperLink (the coordinator's machine): Fleet, Control and Runtime APIs on one TLS port.
setsid flower-superlink --ssl-ca-certfile "$c/ca.crt" --ssl-certfile "$c/server.pem" --ssl-keyfile "$c/server.key" \
  --host 127.0.0.1 --port "$port" --database "$work/superlink.db" --disable-runtime-dependency-installation \
  > "$work/logs/superlink.log" 2>&1 &
pids+=($!)

# 3. One SuperNode per site: its Meerkat client id and its private data come from --node-config.
for i in "${!sites[@]}"; do
  setsid flower-supernode --superlink "127.0.0.1:$port" --root-certificates "$c/ca.crt" --port $((port + 100 + i)) \
    --node-config "client-id=$i data-files=\"${sites[$i]}\"" > "$work/logs/supernode-$i.log" 2>&1 &
  pids+=($!)
done

# 4. The Flower CLI: a named SuperLink connection, then `flwr run` streams the run's log.
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "meerkat-local"

[superlink.meerkat-local]
address = "127.0.0.1:$port"
root-certificates = "$c/ca.crt"
TOML
for _ in $(seq 60); do grep -q "Fleet HTTP API" "$work/logs/superlink.log" 2>/dev/null && break; sleep 1; done
cd "$here"
flwr run . meerkat-local --stream "$@" --run-config "num-clients=${#sites[@]} output-dir='$work/run'"
