#!/usr/bin/env bash
# The GPU check: every figure the project needs from a GPU, in one run of under 8 minutes.
#
#   python bench/gpu_payload.py --out .gpu-payload     # here: wheels, fp16 weights, images
#   bash bench/gpu_check.sh                            # there, with .gpu-payload carried
#   bash bench/gpu_check.sh --device cpu --dry-run     # every step in miniature, on CPU
#                                                      # (this machine's packages, not the wheels)
#
# Steps: the CUDA tests; training throughput (loop against model alone) with the MiniLM and the
# MPNet text tower; a short real `convirt train --config gpu` whose loss must fall under bf16;
# index build throughput. Text towers are random-initialised (speed does not depend on values).
# Each step prints one JSON line; with $OUT set they are also written to $OUT/gpu_check.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda dry_run=0 payload=.gpu-payload
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --payload) payload=$2; shift 2 ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ ! -d "$payload/data" ]; then
  echo "gpu_check: no payload at $payload: run python bench/gpu_payload.py --out $payload" >&2
  exit 2
fi
payload=$(cd "$payload" && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d)
# the heavy parts go on exit (a dry run in every `make test` left ~800 MB in /tmp); results and
# logs stay
trap 'rm -rf "$work/cache" "$work/run" "$work/text" "$work/site"' EXIT
results=${OUT:-$work}/gpu_check.jsonl
: >"$results"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export CONVIRT_DATA_ROOT=$payload/data CONVIRT_CACHE_DIR=$work/cache
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ -d "$payload/wheels" ] && [ "$dry_run" = 0 ]; then  # what the GPU machine's Python lacks
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$work/site" "$payload"/wheels/*.whl
  export PYTHONPATH=$PYTHONPATH:$work/site
fi
"$python" bench/gpu_payload.py random-text "$payload/text" "$work/text"
export CONVIRT_TEST_TEXT_ENCODER=$work/text/minilm
export CONVIRT_TEST_IMAGE_WEIGHTS=$payload/weights/efficientnet-lite0-fp16.pt

record() {  # record STEP: stdin is the step's JSON, kept on one line
  "$python" -c 'import json, sys; print(json.dumps({"step": sys.argv[1], **json.load(sys.stdin)}))' "$1" |
    tee -a "$results"
}

weights=(--set "model.image_weights=$CONVIRT_TEST_IMAGE_WEIGHTS")
steps=12 rounds=2 epochs=4 workers=(--num-workers 12) tiny=() limit=0
if [ "$dry_run" = 1 ]; then
  steps=1 rounds=1 epochs=1 workers=(--num-workers 1) limit=24
  tiny=(--set model.image_size=64 --set batch_size=8 --set model.max_text_tokens=32)
fi

echo "== 1/5 CUDA tests" >&2
status=0
"$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py >"$work/pytest.log" 2>&1 || status=$?
tail -n 25 "$work/pytest.log" >&2
"$python" -c 'import json, sys; print(json.dumps({"exit_status": int(sys.argv[1]),
    "summary": open(sys.argv[2]).read().strip().splitlines()[-1]}))' "$status" "$work/pytest.log" |
  record cuda-tests

for tower in minilm mpnet; do
  echo "== $([ $tower = minilm ] && echo 2 || echo 3)/5 training throughput, $tower text tower" >&2
  "$python" bench/train_throughput.py --config gpu --device "$device" "${workers[@]}" \
    --steps "$steps" --rounds "$rounds" "${weights[@]}" "${tiny[@]}" \
    --set "model.text_encoder=$work/text/$tower" | record "throughput-$tower"
done

echo "== 4/5 a short real convirt train --config gpu (bf16)" >&2
"$python" -m convirt.cli train --config gpu --out "$work/run" --device "$device" \
  --epochs "$epochs" "${workers[@]}" "${weights[@]}" "${tiny[@]}" \
  --set "model.text_encoder=$work/text/minilm" --no-progress >/dev/null
"$python" - "$work/run/metrics.csv" <<'PY' | record train
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1])))
losses = [float(r["train_loss"]) for r in rows]
print(json.dumps({"train_loss": losses, "val_loss": [float(r["val_loss"]) for r in rows],
                  "pairs_per_s": [float(r["pairs_per_s"]) for r in rows],
                  "loss_fell": len(losses) > 1 and losses[-1] < losses[0]}))
PY

echo "== 5/5 index build throughput" >&2
"$python" bench/index_throughput.py --model "$work/run/bundle" --device "$device" \
  --limit "$limit" --workers "$([ "$dry_run" = 1 ] && echo 2 || echo 14)" | record index

echo "gpu_check: done; results in $results" >&2
