#!/usr/bin/env bash
# Per-layer transcoders for every MLP of SmolLM2-135M, trained with interplab's own commands, for
# `python benchmarks/attribution.py --transcoders DIR/transcoders`. Not a benchmark: its output is an input.
#
#   bash benchmarks/smollm2_transcoders.sh [DIR] [TOKENS] [INIT]      (defaults: ~/.cache/interplab/bench/smollm2-plt,
#                                                                      65536, fitted)
#
# One harvest pass writes all 60 hooks (each MLP's input and output, float16) to DIR/pairs; then one BatchTopK
# transcoder (k = 32, 4,608 latents) per layer is trained on its pair, 64 steps of 1,024 tokens, and saved in
# DIR/transcoders/layer_{l} (SAELens transcoder layout; BatchTopK is the JumpReLU circuit-tracer reads). Both
# steps resume: run it again after an interruption.
set -euo pipefail
DIR=${1:-$HOME/.cache/interplab/bench/smollm2-plt}
TOKENS=${2:-65536}
INIT=${3:-fitted}
HOOKS=$(python -c "print(','.join(f'blocks.{l}.mlp.hook_in,blocks.{l}.hook_mlp_out' for l in range(30)))")
mkdir -p "$DIR/transcoders"
if [ ! -f "$DIR/pairs/manifest.json" ] || ! grep -q '"complete": true' "$DIR/pairs/manifest.json"; then
  interplab harvest --model smollm2-135m --corpus python-docs --hooks "$HOOKS" --tokens "$TOKENS" \
    --dtype float16 --out "$DIR/pairs" --resume
fi
for l in $(seq 0 29); do
  run="$DIR/runs/layer_$l"
  if [ ! -f "$run/metrics.json" ]; then
    interplab sae train --store "$DIR/pairs" --hook "blocks.$l.mlp.hook_in" --target "blocks.$l.hook_mlp_out" \
      --arch batchtopk --k 32 --expansion 8 --batch-size 1024 --tokens "$TOKENS" --lr 1e-3 \
      --transcoder-init "$INIT" --checkpoint-every 16 --out "$run" --resume
  fi
  rm -rf "$DIR/transcoders/layer_$l"
  cp -r "$run"/batchtopk-* "$DIR/transcoders/layer_$l"
done
python - "$DIR" <<'PY'
import json, sys, pathlib
runs = sorted(pathlib.Path(sys.argv[1], "runs").glob("layer_*"), key=lambda p: int(p.name.split("_")[1]))
fvu = [next(iter(json.loads((r / "metrics.json").read_text())["saes"].values()))["fvu"] for r in runs]
print(json.dumps({"layers": len(fvu), "fvu": [round(f, 3) for f in fvu]}))
PY
