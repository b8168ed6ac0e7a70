#!/usr/bin/env bash
# `make demo`: prepare the archive, train (or reuse) the model, score it, index the archive, serve.
#
# Every step is skipped when its output is already up to date, so a second run serves in seconds:
#   - training: `convirt train --resume` on a finished run only checks the settings and data;
#   - evaluation: rerun only when the bundle is newer than the tables;
#   - index: rebuilt only when the model fingerprint or the archive manifest changed.
#
# Settings (environment):
#   CONVIRT_DATA_ROOT   datasets folder holding covid-cxr/, covid-ct/, medpix/ and roco/
#                       (default ../shared/datasets)
#   CONVIRT_CONFIG      training config: cpu or gpu (default: gpu when CUDA is available, else cpu)
#   CONVIRT_DEMO_DIR    where runs, the archive and the index go (default: runs)
#   CONVIRT_PORT        port of the service (default 8000); CONVIRT_HOST (default 127.0.0.1)
#   CONVIRT_DEMO_LIMIT  index only the first N images of each dataset (default: all)
#   CONVIRT_DEMO_TRAIN_ARGS  extra `convirt train` flags, e.g. "--max-steps 20"
#   CONVIRT_DEMO_EVAL   0 to skip the evaluation tables
#   CONVIRT_QUANTIZE    query text encoder served: int8 (default: the bundle's int8 ONNX Runtime
#                       copy, written by `convirt export --int8`: text queries at 0.4x the latency
#                       and 2.3x the requests/s on CPU, top-10 overlap with fp32 0.97;
#                       docs/benchmarks.md) or none (fp32)
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_ROOT="${CONVIRT_DATA_ROOT:-$(cd .. && pwd)/shared/datasets}"
export CONVIRT_DATA_ROOT="$DATA_ROOT"
for dataset in covid-cxr covid-ct medpix roco; do
  if [ ! -f "$DATA_ROOT/$dataset/manifest.csv" ]; then
    echo "demo: no $dataset dataset under $DATA_ROOT; set CONVIRT_DATA_ROOT to the folder holding" \
         "covid-cxr/, covid-ct/, medpix/ and roco/" >&2
    exit 2
  fi
done
OUT="${CONVIRT_DEMO_DIR:-runs}"
HOST="${CONVIRT_HOST:-127.0.0.1}"
PORT="${CONVIRT_PORT:-8000}"
if ! python -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
s.bind((sys.argv[1], int(sys.argv[2])))' "$HOST" "$PORT" 2>/dev/null; then
  echo "demo: port $PORT on $HOST is taken (another demo still running?); set CONVIRT_PORT" >&2
  exit 2
fi

CONFIG="${CONVIRT_CONFIG:-}"
if [ -z "$CONFIG" ]; then
  if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    CONFIG=gpu
  else
    CONFIG=cpu
  fi
fi
RUN="$OUT/demo-$CONFIG"
ARCHIVE="$OUT/demo-archive"
INDEX="$OUT/demo-index-$CONFIG"

step() { printf '\n== %s\n' "$*"; }

step "1/5 archive: the shared datasets as one manifest, in $ARCHIVE"
python scripts/prepare_archive.py --out "$ARCHIVE" ${CONVIRT_DEMO_LIMIT:+--limit "$CONVIRT_DEMO_LIMIT"}

step "2/5 model: $CONFIG config into $RUN (a finished run is reused)"
# shellcheck disable=SC2086  # extra flags are meant to split
convirt train --config "$CONFIG" --out "$RUN" --resume ${CONVIRT_DEMO_TRAIN_ARGS:-}

step "3/5 evaluation on the dev splits"
if [ "${CONVIRT_DEMO_EVAL:-1}" = 0 ]; then
  echo "skipped (CONVIRT_DEMO_EVAL=0)"
else
  for dataset in medpix:location_category covid-cxr:finding roco:modality_keyword; do
    name="${dataset%%:*}"
    label="${dataset##*:}"
    table="$RUN/eval-$name.txt"
    if [ -s "$table" ] && [ "$table" -nt "$RUN/bundle/bundle.json" ]; then
      echo "-- $name (up to date: $table)"
    else
      echo "-- $name (labels: $label)"
      convirt eval --model "$RUN/bundle" --manifest "$DATA_ROOT/$name/manifest.csv" --split dev \
        --label-column "$label" --baseline imagenet --no-progress --format table \
        --output "$RUN/eval-$name.json" > "$table.tmp"
      mv "$table.tmp" "$table"
    fi
    cat "$table"
  done
fi

step "4/5 index: $ARCHIVE/manifest.csv into $INDEX"
stamp="$INDEX/.demo-source"
wanted="$(python -c 'import hashlib, json, sys
print(json.load(open(sys.argv[1]))["fingerprint"], hashlib.sha256(open(sys.argv[2], "rb").read()).hexdigest())' \
  "$RUN/bundle/bundle.json" "$ARCHIVE/manifest.csv")"
if [ -f "$INDEX/CURRENT" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  echo "up to date (same model and manifest): $(convirt index info --root "$INDEX" --json |
    python -c 'import json, sys; d = json.load(sys.stdin); print(d["images"], "images, version", d["version"])')"
else
  convirt index build --manifest "$ARCHIVE/manifest.csv" --model "$RUN/bundle" --out "$INDEX" \
    --device auto
  echo "$wanted" > "$stamp"
fi

QUANTIZE="${CONVIRT_QUANTIZE:-int8}"
step "5/5 service: http://$HOST:$PORT/ (query encoder: $([ "$QUANTIZE" = int8 ] && echo int8 || echo fp32))"
if [ "$QUANTIZE" = int8 ]; then
  if python -c 'import sys
from convirt.bundle import read_bundle_info
from convirt.quantize import check_int8
sys.exit(0 if check_int8(sys.argv[1], read_bundle_info(sys.argv[1])["fingerprint"]) else 1)' \
      "$RUN/bundle" 2>/dev/null; then
    echo "int8 query encoder: up to date ($RUN/bundle/int8)"
  else
    convirt export --int8 "$RUN/bundle"
  fi
fi
export CONVIRT_MODEL="$RUN/bundle" CONVIRT_INDEX_ROOT="$INDEX" CONVIRT_HOST="$HOST" CONVIRT_PORT="$PORT"
export CONVIRT_QUANTIZE="$QUANTIZE"
convirt serve &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null' EXIT INT TERM
until python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "http://$HOST:$PORT/readyz" 2>/dev/null; do
  if ! kill -0 "$server" 2>/dev/null; then
    echo "demo: the service exited during startup (see its log above)" >&2
    exit 1
  fi
  sleep 1
done
query='{"text": "bilateral ground-glass opacities in the lower lobes", "k": 3}'
encoder="$(python -c 'import json, sys, urllib.request
print(json.load(urllib.request.urlopen(sys.argv[1], timeout=10)).get("query_encoder"))' \
  "http://$HOST:$PORT/readyz")"
cat <<EOF

Query texts are embedded by the $encoder encoder (CONVIRT_QUANTIZE=$QUANTIZE; none: fp32, int8: int8-onnx).

The service is up. Open the page:   http://$HOST:$PORT/
API docs:                           http://$HOST:$PORT/docs
Try a text query:
  curl -s http://$HOST:$PORT/v1/search/text -H 'Content-Type: application/json' \\
    -d '$query'
EOF
python - "http://$HOST:$PORT/v1/search/text" "$query" <<'EOF'
import json, sys, urllib.request
request = urllib.request.Request(sys.argv[1], sys.argv[2].encode(), {"Content-Type": "application/json"})
answer = json.load(urllib.request.urlopen(request, timeout=60))
print(f"Its answer ({answer['took_ms']:.0f} ms, index version {answer['index_version']}):")
for hit in answer["results"]:  # ids and scores only: reports and paths stay out of logs
    print(f"  {hit['score']:.3f}  id {hit['id']}")
EOF
echo
echo "Serving until Ctrl-C."
wait "$server"
