#!/usr/bin/env bash
# The multi-device path on a GPU machine, self-contained (a few minutes on 8 GPUs): the distributed tests with NCCL
# (one GPU per rank), then decode and prefill speed at tensor_parallel_size 1, 2, 4, 8 (as many as there are GPUs)
# on a DeepSeek-V2-Lite-shaped model with random weights (its real widths: 16 heads, 64 experts, vocab 102,400; 4
# of its 27 layers, so it builds in a minute). JSON lines and a markdown table go to OUT_DIR.
#
#   bash benchmarks/gpu_tp.sh [OUT_DIR]          # from the repository root, with a CUDA build of torch installed
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/dsv2-gpu-tp}
mkdir -p "$out"
py=${PYTHON:-python}
gpus=$($py -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $gpus ($($py -c "import torch; print(torch.cuda.get_device_name(0))"))" | tee "$out/summary.md"

echo "== distributed tests with NCCL" | tee -a "$out/summary.md"
DSV2_TEST_DEVICE=cuda $py -m pytest -q -m distributed tests/test_parallel.py tests/test_engine_parallel.py 2>&1 | tail -3 | tee -a "$out/summary.md"

model="$out/v2-lite-4layers"
if [[ ! -f "$model/config.json" ]]; then
  echo "== building $model"
  $py - "$model" <<'PY'
import sys, torch, dsv2
from dsv2.config import ModelConfig
from dsv2.model import build_model
cfg = ModelConfig.from_pretrained("benchmarks/configs/DeepSeek-V2-Lite.json").replace(num_hidden_layers=4)
dsv2.save_model(build_model(cfg, dtype=torch.bfloat16, device="cuda", seed=0), sys.argv[1])
PY
fi

echo "== dsv2 bench, bf16 (tok/s)" | tee -a "$out/summary.md"
echo "| tensor_parallel_size | batch | context | prefill tok/s | decode tok/s |" | tee -a "$out/summary.md"
echo "|---|---|---|---|---|" | tee -a "$out/summary.md"
for tp in 1 2 4 8; do
  (( tp <= gpus )) || continue
  for batch in 1 32; do
    line=$($py -m dsv2.cli bench --model "$model" --device cuda --tensor-parallel-size "$tp" --batch "$batch" \
           --context 1024 --new 64 --repeat 2 --json | tail -1)
    echo "$line" >> "$out/bench.jsonl"
    $py -c "import json,sys; d=json.loads(sys.argv[1]); print(f\"| $tp | $batch | 1024 | {d['prefill_tokens_per_s']:.0f} | {d['decode_tokens_per_s']:.1f} |\")" "$line" | tee -a "$out/summary.md"
  done
done
echo "results in $out (summary.md, bench.jsonl)"
