#!/usr/bin/env bash
# Screenshots of the real window under Xvfb (Mesa's software renderer), mid-generation and
# finished, for the README. Usage: scripts/screenshots.sh MODEL_DIR|default OUT_DIR [STEPS] [SIZE]
# ("default": no model chosen, so the app starts with Easel Mini). PROMPT and SAMPLER override
# the prompt and sampler; BATCH makes several images (the gallery); EASEL_BIN the binary
# (default target/release/easel). PNGs already in OUT_DIR/outputs show in the gallery.
# Needs: xvfb, xdotool, imagemagick (import), mesa-vulkan-drivers; a release build.
set -euo pipefail
if [ "$1" = default ]; then model=""; else model=$(readlink -f "$1"); fi
out=$(readlink -f "$2"); steps=${3:-6}; size=${4:-256}
mkdir -p "$out"
data=$(mktemp -d)
mkdir -p "$data/easel"
# Start from a prepared settings store (eframe keeps it in $XDG_DATA_HOME/easel/app.ron).
python3 - "$data/easel/app.ron" "$model" "$out/outputs" "$steps" "$size" \
    "${PROMPT:-a lighthouse on a cliff at dusk, oil painting}" "${SAMPLER:-dpmpp_2m}" "${BATCH:-1}" <<'PY'
import json, sys
path, model, outputs, steps, size, prompt, sampler, batch = sys.argv[1:]
settings = {"model_path": model or None, "outputs_dir": outputs, "prompt": prompt,
            "negative_prompt": "", "steps": int(steps), "guidance": 7.0, "sampler": sampler,
            "seed": 1234, "random_seed": False, "width": int(size), "height": int(size), "batch_count": int(batch)}
open(path, "w").write('{"easel-settings": %s}' % json.dumps(json.dumps(settings)))
PY
export DISPLAY=:97
Xvfb "$DISPLAY" -screen 0 1280x820x24 >/dev/null 2>&1 &
xvfb=$!
trap 'kill $app $xvfb 2>/dev/null || true; rm -rf "$data"' EXIT
sleep 1
XDG_DATA_HOME="$data" "${EASEL_BIN:-./target/release/easel}" &
app=$!
sleep "${READY_SECONDS:-25}"   # window up and the model loaded
import -window root "$out/ready.png"
count() { { find "$out/outputs" -maxdepth 1 -name '*.png' 2>/dev/null || true; } | wc -l; }   # 0 before the first
before=$(count)
window=$(xdotool search --name '^Easel' | head -1)
xdotool windowfocus --sync "$window" key ctrl+Return
sleep "${MID_SECONDS:-20}"
import -window root "$out/generating.png"
for _ in $(seq 1 240); do
  [ "$(count)" -ge "$((before + ${BATCH:-1}))" ] && break
  sleep 2
done
sleep 3
import -window root "$out/finished.png"
echo "screenshots in $out"
