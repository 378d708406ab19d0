#!/usr/bin/env bash
# A whole deployment on this Linux machine, every party on its own network-namespace host (its own IP on a bridge):
# the split server, the Flower aggregator (SuperLink + ServerApp) and one host per device (SuperNode, `lesft device`,
# its own rows, token and keys); TLS and authentication everywhere; each device's link shaped by a profile.
# usage (as root): deploy/netns/run.sh [CONFIG (default deploy/flower/run.yaml)] [OUT (default runs/hosts)] [--link 4g ...]
# Every party's log goes to OUT/logs/, its files to OUT/hosts/<host>/, the outcome to OUT/report.json; every process
# and namespace is gone when it returns (success, a party's failure, Ctrl-C). See docs/deploy.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${1:-deploy/flower/run.yaml}
OUT=${2:-runs/hosts}
shift $(( $# < 2 ? $# : 2 ))
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" -m lesft.deploy.hosts run "$CONFIG" --out "$OUT" "$@"
