#!/usr/bin/env bash
# The CUDA path on one GPU machine, self-contained, in a few minutes: the GPU tests (pytest -m gpu: the Triton MLA
# kernel compiled, the grouped MoE without host syncs and inside a CUDA graph, captured decode graphs against eager
# and CPU), then decode at batch 1/16/64 (eager and CUDA graphs) and one prefill chunk on the full-size
# DeepSeek-V2-Lite shape built on the GPU with random bf16 weights (31 GB; no checkpoint is written or read), with
# the HBM bandwidth each decode step achieves and the MLA kernel's GB/s (benchmarks/gpu/decode_bench.py).
# Results: gpu_bench.json, gpu_bench.md and gpu_tests.log in OUT_DIR.
#
#   bash benchmarks/gpu/run.sh [OUT_DIR]      # from anywhere; OUT_DIR default $OUT, else benchmarks/results/gpu
#   LAYERS=4 bash benchmarks/gpu/run.sh       # same widths, 4 of the 27 layers: a quick look
#
# Needs torch with CUDA, triton, numpy, safetensors, tokenizers, jinja2 and pytest in $PYTHON (default python3);
# dsv2 runs from this checkout's src/ (nothing is installed).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-${OUT:-benchmarks/results/gpu}}
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"

$py - <<'PY' || exit 2
import importlib, sys
missing = [m for m in ("torch", "triton", "numpy", "safetensors", "tokenizers", "jinja2", "pytest")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"run.sh: missing Python packages in {sys.executable}: {missing}")
import torch
if not torch.cuda.is_available():
    sys.exit(f"run.sh: torch {torch.__version__} sees no CUDA device")
print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
      f"triton {importlib.import_module('triton').__version__}, "
      f"{torch.cuda.mem_get_info()[0] / 2**30:.0f} GiB free")
PY
if ! grep -q "block_tables" src/dsv2/model/mla.py; then
  echo "run.sh: model/mla.py has no block-table decode; apply the wiring patch (notes/wiring-cuda.patch) first" >&2
  exit 2
fi

echo "== pytest -m gpu"
timeout 300 $py -m pytest -q -m gpu -p no:cacheprovider tests/test_triton_mla.py tests/test_moe_grouped.py \
  tests/test_cuda_graphs.py 2>&1 | tee "$out/gpu_tests.log" | tail -20
tests=${PIPESTATUS[0]}

echo "== decode and prefill, V2-Lite shape"
timeout 420 $py benchmarks/gpu/decode_bench.py --out "$out" ${LAYERS:+--layers $LAYERS}
bench=$?
echo "gpu tests exit $tests, bench exit $bench; results in $out"
exit $(( tests || bench ))
