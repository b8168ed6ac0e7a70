#!/bin/bash
# Submit the sharded build (index-array.sbatch, one GPU per shard) and the merge that waits for all
# of it (merge.sbatch, afterok: it runs only when every shard succeeded, else Slurm cancels it).
#
#   deploy/slurm/submit.sh [N]     # from the repository root; N shards, default 4
#
# The paths (CONVIRT_MODEL, INDEX_MANIFEST, INDEX_SHARD_DIR, CONVIRT_INDEX_ROOT) come from your
# environment, with the defaults of the two scripts.
set -euo pipefail

here=$(dirname "$0")
shards=${1:-4}

array=$(sbatch --parsable --array="0-$((shards - 1))" --export="ALL,INDEX_SHARD_COUNT=$shards" \
  "$here/index-array.sbatch")
array=${array%%;*} # --parsable prints ID or ID;CLUSTER
merge=$(sbatch --parsable --dependency="afterok:$array" --kill-on-invalid-dep=yes \
  --export="ALL,INDEX_SHARD_COUNT=$shards" "$here/merge.sbatch")
merge=${merge%%;*}
echo "shards: job $array (array 0-$((shards - 1))); merge: job $merge, after it"
echo "watch them: squeue -j $array,$merge"
