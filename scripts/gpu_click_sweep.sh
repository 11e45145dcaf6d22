#!/usr/bin/env bash
# Click-model variants trained and evaluated side by side on a lent GPU (exploration only: the
# shipped checkpoint is trained on CPU with the command in adclick_core/weights/README.md).
# usage: scripts/gpu_click_sweep.sh DATA OUTDIR "name:train-click args" ...
set -u
data=$1; out=$2; shift 2
mkdir -p "$out"
python3 -m adclick_core build-bank "$data" --out "$out/bank.safetensors" > "$out/bank.json" 2>/dev/null || exit 1
export OMP_NUM_THREADS=${SWEEP_THREADS:-3} PYTHONUNBUFFERED=1
names=()
for spec in "$@"; do
  name=${spec%%:*}; args=${spec#*:}; names+=("$name")
  ( /usr/bin/time -f "%e s %M KB" python3 -m adclick_core train-click --data "$data" --bank "$out/bank.safetensors" \
      --out "$out/$name.pt" --k 10 --radius 2 $args > "$out/$name.train.json" 2> "$out/$name.train.err"
    python3 -m adclick_core eval-click --data "$data" --bank "$out/bank.safetensors" --checkpoint "$out/$name.pt" \
      --clicks 1,3,5 --methods adclick --json "$out/$name.eval.json" > /dev/null 2> "$out/$name.eval.err" ) &
done
wait
for name in "${names[@]}"; do
  python3 - "$out" "$name" <<'PY'
import json, sys
out, name = sys.argv[1:]
try:
    d = json.load(open(f"{out}/{name}.eval.json"))["methods"]["adclick"]
    t = open(f"{out}/{name}.train.err").read().strip().splitlines()[-1]
    print(name, " ".join(f"AP@{k}={d[k]['ap']:.3f} mIoU@{k}={d[k]['miou']:.3f}" for k in ("1", "3", "5")),
          f"NoC50={d['5']['noc50']:.1f}", "|", t)
except Exception as exc:
    print(name, "failed:", exc)
PY
done
