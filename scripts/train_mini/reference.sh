#!/usr/bin/env bash
# diffusers' picture from the shipped Easel Mini, for crates/engine/tests/easel_mini.rs.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-/work/pyref/bin/python}
out=crates/engine/tests/fixtures/easel-mini
mkdir -p "$out"
"$py" scripts/diffusers_generate.py --model assets/models/easel-mini --prompt "a red circle above a blue square" \
    --steps 20 --guidance 6 --seed 1 --width 128 --height 128 --sampler dpmpp_2m --out "$out/diffusers.png"
"$py" -c "import sys; sys.path.insert(0, 'scripts/train_mini'); import grammar; grammar.draw_heldout('$out/heldout-drawn.png')"
