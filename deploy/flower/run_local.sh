#!/usr/bin/env bash
# Every party of a networked lesft run on ONE machine, over loopback:
#   the split server (`lesft server`), a Flower SuperLink, one Flower SuperNode per client, and
#   `flwr run`, which starts the aggregator (ServerApp) and, each round, the clients (ClientApp).
# usage: deploy/flower/run_local.sh [CONFIG (default deploy/flower/run.yaml)] [OUT (default runs/flower)]
# Each client also runs `lesft device`, which keeps its model loaded between Flower rounds (WORKER=0: the
# ClientApp process Flower starts per message trains itself, loading the model each round).
# Needs: lesft installed with the flower extra in the active environment (`make setup` does it).
# Across machines, run the same commands with real addresses and TLS: see docs/deploy.md.
set -euo pipefail
# Nothing may outlive this script: re-run it under lesft's guard, which makes orphans its own children (the
# SuperLink starts flower-superexec in a session of its own, and a PID 1 that reaps slowly or never would
# keep them as zombies), passes Ctrl-C/SIGTERM on, and on exit kills and reaps whatever is left.
if [ -z "${LESFT_GUARDED:-}" ]; then
  export LESFT_GUARDED=1
  exec python -m lesft.deploy.procs -- "$0" "$@"
fi
cd "$(dirname "$0")/../.."
CONFIG=$(realpath "${1:-deploy/flower/run.yaml}")
OUT=$(realpath -m "${2:-runs/flower}")
SPLIT=${SPLIT:-127.0.0.1:50051}      # the split server
LINK_PORT=${LINK_PORT:-39200}        # the Flower SuperLink (SuperNodes and `flwr run` talk to it)
WORKER=${WORKER:-1}                  # 1: a long-lived `lesft device` per client trains; 0: the ClientApp does
N=$(python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['clients'])" "$CONFIG")
mkdir -p "$OUT/logs" "$OUT/flwr_home"
export FLWR_HOME="$OUT/flwr_home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
# the SuperExecs that start the ServerApp and each ClientApp look for work every 0.1 s (Flower's default: 1 s)
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL=${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}
printf '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:%s"\ninsecure = true\n' \
  "$LINK_PORT" > "$FLWR_HOME/config.toml"
pids=()
cleanup() {  # stop every party and wait for it (no zombies); the guard then kills what they left
  trap - EXIT INT TERM
  ((${#pids[@]})) && { kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; }
}
trap cleanup EXIT
trap 'exit 130' INT TERM

lesft server --config "$CONFIG" --listen "$SPLIT" --tokens "$OUT/tokens.json" --out "$OUT/server" \
  > "$OUT/logs/server.log" 2>&1 & pids+=($!)
# --disable-runtime-dependency-installation: use this environment (no `uv sync` from the registry)
flower-superlink --insecure --disable-runtime-dependency-installation --host 127.0.0.1 --port "$LINK_PORT" \
  > "$OUT/logs/superlink.log" 2>&1 & pids+=($!)
names=(server superlink)
for ((i = 0; i < N; i++)); do
  worker=""
  if [ "$WORKER" = 1 ]; then
    lesft device --socket "$OUT/device$i.sock" > "$OUT/logs/device$i.log" 2>&1 & pids+=($!); names+=("device$i")
    worker=" worker=\"$OUT/device$i.sock\""
  fi
  flower-supernode --insecure --superlink "127.0.0.1:$LINK_PORT" --port $((LINK_PORT + 1 + i)) \
    --node-config "config=\"$CONFIG\" server=\"$SPLIT\" client-id=$i token-file=\"$OUT/tokens.json\" out=\"$OUT/client$i\" take-share=true$worker" \
    > "$OUT/logs/supernode$i.log" 2>&1 & pids+=($!); names+=("supernode$i")
done
until grep -q "serving" "$OUT/logs/server.log" 2>/dev/null; do sleep 0.5; kill -0 "${pids[0]}"; done
until curl -sf "http://127.0.0.1:$LINK_PORT/health" > /dev/null; do sleep 0.5; done
(cd deploy/flower && flwr run . local --stream \
  --run-config "config=\"$CONFIG\" out=\"$OUT/aggregator\" clients=$N") 2>&1 | tee "$OUT/logs/flwr_run.log" &
run=$!
while kill -0 "$run" 2>/dev/null; do  # a party that dies ends the run (the EXIT trap stops the others)
  for j in "${!pids[@]}"; do
    if ! kill -0 "${pids[$j]}" 2>/dev/null; then
      echo "run_local.sh: ${names[$j]} died (see $OUT/logs/${names[$j]}.log); stopping every party" >&2
      exit 1
    fi
  done
  sleep 1
done
wait "$run"
if [ ! -f "$OUT/aggregator/aggregated_adapter.safetensors" ]; then  # `flwr run` exits 0 when its ServerApp fails
  echo "run_local.sh: no aggregated adapter was written: the run failed (see $OUT/logs/flwr_run.log)" >&2
  exit 1
fi
echo "aggregated adapter: $OUT/aggregator/aggregated_adapter.safetensors; server state: $OUT/server"
