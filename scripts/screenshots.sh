#!/usr/bin/env bash
# Screenshots of the real window under Xvfb (Mesa's software renderer), mid-generation and
# finished, for the README. Usage: scripts/screenshots.sh MODEL_DIR OUT_DIR [STEPS] [SIZE]
# Needs: xvfb, xdotool, imagemagick (import), mesa-vulkan-drivers; a release build.
set -euo pipefail
model=$(readlink -f "$1"); out=$(readlink -f "$2"); steps=${3:-6}; size=${4:-256}
mkdir -p "$out"
data=$(mktemp -d)
mkdir -p "$data/easel"
# Start from a prepared settings store (eframe keeps it in $XDG_DATA_HOME/easel/app.ron).
python3 - "$data/easel/app.ron" "$model" "$out/outputs" "$steps" "$size" <<'PY'
import json, sys
path, model, outputs, steps, size = sys.argv[1:]
settings = {"model_path": model, "outputs_dir": outputs, "prompt": "a lighthouse on a cliff at dusk, oil painting",
            "negative_prompt": "blurry, low quality", "steps": int(steps), "guidance": 7.0, "sampler": "dpmpp_2m_karras",
            "seed": 1234, "random_seed": False, "width": int(size), "height": int(size)}
open(path, "w").write('{"easel-settings": %s}' % json.dumps(json.dumps(settings)))
PY
export DISPLAY=:97
Xvfb "$DISPLAY" -screen 0 1280x820x24 >/dev/null 2>&1 &
xvfb=$!
trap 'kill $app $xvfb 2>/dev/null || true; rm -rf "$data"' EXIT
sleep 1
XDG_DATA_HOME="$data" ./target/release/easel &
app=$!
sleep 25   # window up and the model loaded
import -window root "$out/ready.png"
window=$(xdotool search --name '^Easel$' | head -1)
xdotool windowfocus --sync "$window" key ctrl+Return
sleep "${MID_SECONDS:-20}"
import -window root "$out/generating.png"
for _ in $(seq 1 240); do
  ls "$out/outputs"/*.png >/dev/null 2>&1 && break
  sleep 2
done
sleep 3
import -window root "$out/finished.png"
echo "screenshots in $out"
