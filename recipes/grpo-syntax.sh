#!/usr/bin/env bash
# GRPO on the model dsv2 ships: finish a line of Python so that it parses (recipes/grpo_syntax.py has the task).
#   bash recipes/grpo-syntax.sh [WORK_DIR]      (default: runs/grpo-syntax; 70 s on an idle 2-core CPU, 49 s of
#   them GRPO steps; on cores shared with other work it took 36 minutes: see OMP_WAIT_POLICY in the README)
# From dsv2-tiny-stdlib (src/dsv2/assets), 2000 training prompts cut from one-line statements of the stdlib files
# it was trained on, 200 held-out prompts from the files held out from its pretraining. Before and after: one
# greedy completion per held-out prompt, the fraction that parses. Then the reward curve (plots/reward.png).
set -euo pipefail
WORK=${1:-runs/grpo-syntax}
DSV2=${DSV2:-dsv2}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
REWARD="$HERE/grpo_syntax.py:parses"
mkdir -p "$WORK"
$PYTHON "$HERE/grpo_syntax.py" "$WORK/task" --train 2000 --held-out 200
$DSV2 grpo --evaluate --prompts "$WORK/task/held_out.jsonl" --reward "$REWARD" --max-tokens 24 --stop $'\n' \
    --quiet > "$WORK/before.json"
$DSV2 grpo --prompts "$WORK/task/train.jsonl" --reward "$REWARD" --out "$WORK/run" --steps 60 \
    --batch-size 8 --group-size 8 --max-tokens 24 --stop $'\n' --temperature 1.0 --lr 3e-5 --beta 0.04 \
    --save-every 20 --seed 0
$DSV2 export "$WORK/run" "$WORK/model"
$DSV2 grpo --evaluate --model "$WORK/model" --prompts "$WORK/task/held_out.jsonl" --reward "$REWARD" \
    --max-tokens 24 --stop $'\n' --quiet > "$WORK/after.json"
$DSV2 grpo --plot "$WORK/run"
$PYTHON - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
before, after = (json.load(open(f"{work}/{name}.json")) for name in ("before", "after"))
print(f"held-out prompts that parse (greedy): before {before['reward_mean']:.3f}, after {after['reward_mean']:.3f} "
      f"({before['prompts']} prompts)")
PY
