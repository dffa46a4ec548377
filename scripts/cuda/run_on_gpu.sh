#!/bin/bash
# Checks and measures Easel's CUDA build on a GPU machine with no network, against diffusers.
#
# Here (with nvcc and a libcudnn.so to link against; CUDA_COMPUTE_CAP=90 for an H100):
#   cargo build --release --features cudnn
#   cargo test --release --features cudnn -p easel-engine --lib --no-run   # prints the test binary
#   mkdir -p .gpu/run && strip -o .gpu/run/easel target/release/easel
#   strip -o .gpu/run/engine-tests target/release/deps/easel_engine-<hash>
#   xz .gpu/run/easel .gpu/run/engine-tests
#   (and a diffusers wheel in .gpu/run/whl if the machine lacks it: pip download diffusers==0.42.1)
# There, from the repo root:  bash scripts/cuda/run_on_gpu.sh .gpu/run
#
# Runs the CUDA kernel tests, renders one SD 1.5 image with Easel's CUDA kernels switched on and
# one without (PSNR between them), `easel bench` both ways, diffusers' bench, an Nsight Compute
# kernel-time profile, then SDXL. Writes everything under $OUT (or /tmp/out).
set -u
D=${1:?folder with easel.xz, engine-tests.xz and whl/}
O=${OUT:-/tmp/out}; mkdir -p "$O"; L=$O/log.txt
S=$(dirname "$0")
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$L"; }
T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$L"
if ls "$D"/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$D"/whl/*.whl >>"$L" 2>&1 || say "pip install failed"
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
# cudarc links cuBLAS, cuRAND, NVRTC, the runtime and cuDNN dynamically: use the copies PyTorch ships.
LIBDIRS=$(find /opt /usr \( -name 'libcublas.so.1*' -o -name 'libcurand.so.1*' -o -name 'libnvrtc.so.1*' -o -name 'libcudart.so.1*' -o -name 'libcublasLt.so.1*' -o -name 'libcudnn.so.9*' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH=${LIBDIRS}${LD_LIBRARY_PATH:-}
for b in easel engine-tests; do xz -dc "$D/$b.xz" > /tmp/$b && chmod +x /tmp/$b; done
ldd /tmp/easel | grep -E 'cudnn|not found' | tee -a "$L"

say "== CUDA kernel tests"
timeout 180 /tmp/engine-tests cuda_ --test-threads 1 2>&1 | tee -a "$L" | tail -20

gpumem() {  # runs a command while sampling nvidia-smi's memory.used; logs the peak
  local f=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$f.mem" 2>/dev/null & local m=$!
  "$@"; local rc=$?
  kill $m 2>/dev/null; wait $m 2>/dev/null
  say "rc=$rc; peak GPU memory.used (nvidia-smi) $(sort -n "$f.mem" | tail -1) MiB"
}
easel_bench() {  # label size model [VAR=value]
  say "== easel bench $1"
  gpumem /tmp/m-$1 env ${4:-EASEL_CUDA_KERNELS=} timeout 200 /tmp/easel bench --model /tmp/$3 --device cuda --width $2 --height $2 --steps 20 --runs 3 --json "$O/easel-$1.json" 2>&1 | tee -a "$L" | grep -E "U-Net|VAE|end to end|text"
}
diffusers_bench() {  # model size
  say "== diffusers $1"
  gpumem /tmp/d-$1 timeout 200 python3 "$S/bench_diffusers_gpu.py" --model /tmp/$1 --width $2 --height $2 --steps 20 --runs 3 --json "$O/diffusers-$1.json" 2>>"$L" | tail -1 | tee -a "$L"
}
generate() {  # output [VAR=value]
  env ${2:-EASEL_CUDA_KERNELS=} timeout 120 /tmp/easel generate --model /tmp/sd15 --device cuda --prompt 'a lighthouse on a cliff at dusk' \
    --seed 7 --steps 20 --width 512 --height 512 --overwrite --output "$1" 2>&1 | tail -2 | tee -a "$L"
}

say "== SD 1.5 model (random weights, f16)"
timeout 240 python3 scripts/make_random_model.py --family sd15 --dtype float16 --out /tmp/sd15 >>"$L" 2>&1
generate "$O/sd15-kernels.png" EASEL_CUDA_KERNELS=all
generate "$O/sd15-candle.png"
python3 - "$O/sd15-kernels.png" "$O/sd15-candle.png" <<'PY' 2>&1 | tee -a "$L"
import sys, numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(p).convert("RGB")).astype(np.float64) for p in sys.argv[1:3])
mse = ((a - b) ** 2).mean()
print(f"PSNR Easel's CUDA kernels vs candle's path: {10 * np.log10(255 ** 2 / max(mse, 1e-12)):.2f} dB "
      f"(means {a.mean():.1f} / {b.mean():.1f}, std {a.std():.1f} / {b.std():.1f})")
PY
easel_bench sd15-kernels 512 sd15 EASEL_CUDA_KERNELS=all
easel_bench sd15-candle 512 sd15
diffusers_bench sd15 512
say "== Nsight Compute: kernel times of one 512x512 step (kernels on)"
EASEL_CUDA_KERNELS=all timeout 240 ncu --csv --print-units base --metrics gpu__time_duration.sum --launch-count 6000 \
  /tmp/easel generate --model /tmp/sd15 --device cuda --prompt "a cat" --steps 1 --width 512 --height 512 \
  --output /tmp/ncu.png --overwrite > /tmp/ncu.csv 2>>"$L"; say "ncu rc=$?"
python3 "$S/ncu_summary.py" /tmp/ncu.csv > "$O/profile-easel-sd15.txt"; head -25 "$O/profile-easel-sd15.txt"

say "== SDXL model (random weights, f16)"
timeout 240 python3 scripts/make_random_model.py --family sdxl --dtype float16 --out /tmp/sdxl >>"$L" 2>&1
easel_bench sdxl-kernels 1024 sdxl EASEL_CUDA_KERNELS=all
easel_bench sdxl-candle 1024 sdxl
diffusers_bench sdxl 1024
say done
