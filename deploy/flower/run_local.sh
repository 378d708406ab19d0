#!/usr/bin/env bash
# Every party of a networked lesft run on ONE machine, over loopback:
#   the split server (`lesft server`), a Flower SuperLink, one Flower SuperNode per client, and
#   `flwr run`, which starts the aggregator (ServerApp) and, each round, the clients (ClientApp).
# usage: deploy/flower/run_local.sh [CONFIG (default deploy/flower/run.yaml)] [OUT (default runs/flower)]
# Needs: lesft installed with the flower extra in the active environment (`make setup` does it).
# Across machines, run the same commands with real addresses and TLS: see docs/deploy.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=$(realpath "${1:-deploy/flower/run.yaml}")
OUT=$(realpath -m "${2:-runs/flower}")
SPLIT=${SPLIT:-127.0.0.1:50051}      # the split server
LINK_PORT=${LINK_PORT:-39200}        # the Flower SuperLink (SuperNodes and `flwr run` talk to it)
N=$(python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['clients'])" "$CONFIG")
mkdir -p "$OUT/logs" "$OUT/flwr_home"
export FLWR_HOME="$OUT/flwr_home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
printf '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:%s"\ninsecure = true\n' \
  "$LINK_PORT" > "$FLWR_HOME/config.toml"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT

lesft server --config "$CONFIG" --listen "$SPLIT" --tokens "$OUT/tokens.json" --out "$OUT/server" \
  > "$OUT/logs/server.log" 2>&1 & pids+=($!)
# --disable-runtime-dependency-installation: use this environment (no `uv sync` from the registry)
flower-superlink --insecure --disable-runtime-dependency-installation --host 127.0.0.1 --port "$LINK_PORT" \
  > "$OUT/logs/superlink.log" 2>&1 & pids+=($!)
for ((i = 0; i < N; i++)); do
  flower-supernode --insecure --superlink "127.0.0.1:$LINK_PORT" --port $((LINK_PORT + 1 + i)) \
    --node-config "config=\"$CONFIG\" server=\"$SPLIT\" client-id=$i token-file=\"$OUT/tokens.json\" out=\"$OUT/client$i\" take-share=true" \
    > "$OUT/logs/supernode$i.log" 2>&1 & pids+=($!)
done
until grep -q "serving" "$OUT/logs/server.log" 2>/dev/null; do sleep 0.5; kill -0 "${pids[0]}"; done
until curl -sf "http://127.0.0.1:$LINK_PORT/health" > /dev/null; do sleep 0.5; done
(cd deploy/flower && flwr run . local --stream \
  --run-config "config=\"$CONFIG\" out=\"$OUT/aggregator\" clients=$N") 2>&1 | tee "$OUT/logs/flwr_run.log"
echo "aggregated adapter: $OUT/aggregator/aggregated_adapter.safetensors; server state: $OUT/server"
