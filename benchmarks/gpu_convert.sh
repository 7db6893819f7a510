#!/usr/bin/env bash
# `lm2vec convert` of the built-in model on a device lent for minutes (the Training issue's GPU rows), from the kit
# `make device-kit` packs: unpacks it (unpack_kit.sh: the GGUF joined and checked, the wheels installed), converts
# with RECIPE under a time limit and copies the results and stage logs into $OUT. Run it again in the next call to go
# on from the last checkpoint (--resume).
#
#   bash benchmarks/gpu_convert.sh small [SECONDS] [convert options...]
set -euo pipefail
recipe=${1:?usage: gpu_convert.sh RECIPE [SECONDS] [convert options...]}
limit=${2:-540}
shift $(($# < 2 ? $# : 2))
root=$(cd "$(dirname "$0")/.." && pwd)
device=${DEVICE_KIT:-$root/.device}
kit=${KIT:-/tmp/kit}
out=${OUT:?OUT: the folder whose files come back}
mkdir -p "$kit" "$out"

bash "$root/benchmarks/unpack_kit.sh"
nvidia-smi -L 2> /dev/null || echo "no nvidia-smi"
python -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__,
"peft", peft.__version__, "cuda", torch.cuda.is_available())'

name=$(basename "$recipe" .json)
status=0
PYTHONPATH="$root/src:$kit/site" LM2VEC_CACHE="$kit/cache" timeout "$limit" python -m lm2vec.cli convert \
  "$kit/smollm2.gguf" --recipe "$recipe" -o "$kit/$name" --data "$device/data" --resume "$@" 2>&1 |
  grep -v '%|' || status=$?
cp "$kit/$name"/results.* "$out"/ 2> /dev/null || true
for stage in "$kit/$name"/*-*/; do
  if [ -f "$stage/log.jsonl" ]; then cp "$stage/log.jsonl" "$out/$name-$(basename "$stage").jsonl"; fi
done
echo "gpu_convert: exit status $status (124: stopped at $limit s; run again to go on)"
exit "$status"
