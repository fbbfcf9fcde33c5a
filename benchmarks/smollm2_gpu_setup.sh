# Sourced by the SmolLM2 GPU scripts (bsfa_smollm2_gpu.sh, seer_smollm2_gpu.sh): offline environment, and the
# SmolLM2 GGUF from $SMOLLM2_GGUF_DIR converted once into $HF_FASTATTN_CACHE.
export HF_FASTATTN_CACHE=${HF_FASTATTN_CACHE:-/root/hfcache} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
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
