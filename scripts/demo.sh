#!/usr/bin/env bash
# `make demo`: train the demo model on the shared data (or reuse a finished run), then score it.
# A second run reuses runs/demo-<config>/bundle: `convirt train --resume` on a finished run only
# checks that the settings and data are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_ROOT="${CONVIRT_DATA_ROOT:-$(cd .. && pwd)/shared/datasets}"
export CONVIRT_DATA_ROOT="$DATA_ROOT"
if [ ! -f "$DATA_ROOT/medpix/manifest.csv" ] || [ ! -f "$DATA_ROOT/covid-cxr/manifest.csv" ]; then
  echo "demo: no datasets under $DATA_ROOT; set CONVIRT_DATA_ROOT to the folder holding" \
       "covid-cxr/ and medpix/" >&2
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
RUN="runs/demo-$CONFIG"
echo "== training ($CONFIG config) into $RUN"
convirt train --config "$CONFIG" --out "$RUN" --resume

for dataset in medpix:location_category covid-cxr:finding; do
  name="${dataset%%:*}"
  label="${dataset##*:}"
  echo
  echo "== $name dev split (labels: $label)"
  convirt eval --model "$RUN/bundle" --manifest "$DATA_ROOT/$name/manifest.csv" --split dev \
    --label-column "$label" --baseline imagenet --no-progress --format table \
    --output "$RUN/eval-$name.json"
done
