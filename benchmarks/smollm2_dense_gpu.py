"""Dense SmolLM2-135M on the GPU: essay perplexity at 2k/4k/8k, whole-model 8k prefill, needle grid 1k-8k; sdpa and
fastattn_dense on the same model, same seeds. Writes ``$OUT/smollm2_dense_h100.json`` and two heatmaps.

The GPU image has no ``gguf``/``needlehaystack``: their wheels travel with the call and the GGUF file is reassembled in
``$SMOLLM2_GGUF_DIR`` (it is converted once into the hf_fastattn cache there). Run on 2026-11-24 as
``.scratch/gpu_smollm2.py``, this file's content before the GGUF folder became an environment variable.
"""

import os
import pathlib
import sys
import time

sys.path.insert(0, ".")
os.environ["HF_FASTATTN_CACHE"] = "/root/hfcache"
import torch
import triton

from hf_fastattn.assets import models as M
from hf_fastattn.assets.cache import asset_dir
from hf_fastattn.assets.data import load_text
from hf_fastattn.evaluation.perplexity import perplexity
from hf_fastattn.evaluation.plots import save_heatmap
from hf_fastattn.evaluation.records import environment, write_json
from hf_fastattn.evaluation.retrieval import needle_grid

out_dir = pathlib.Path(os.environ["OUT"])
cache = asset_dir("smollm2", "0.1.2")
if not cache.exists():
    t = time.time()
    M._convert_smollm2(
        pathlib.Path(os.environ.get("SMOLLM2_GGUF_DIR", "/root/smol")), "SmolLM2-135M-Instruct.Q4_1.gguf", cache
    )
    print(f"converted in {time.time() - t:.1f}s", flush=True)
model, tok = M.load_model("smollm2", dtype=torch.bfloat16, device="cuda")
text = load_text("essays", "eval")
record = {"environment": environment(), "perplexity": [], "prefill_8192_ms": {}, "needle": {}}
ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:8192]], device="cuda")
for impl in ("sdpa", "fastattn_dense"):
    model.set_attn_implementation(impl)
    assert model.config._attn_implementation == impl
    for ctx in (2048, 4096, 8192):
        r = perplexity(model, tok, text, context_length=ctx, progress=False)
        record["perplexity"].append(r)
        print(f"{impl} ppl@{ctx}: {r['perplexity']:.3f} ({r['scored_tokens']} tokens, {r['seconds']:.1f}s)", flush=True)
    with torch.no_grad():
        ms = triton.testing.do_bench(
            lambda: model(ids, use_cache=False, logits_to_keep=1), warmup=25, rep=100, return_mode="median"
        )
    record["prefill_8192_ms"][impl] = ms
    print(f"{impl} prefill 8192: {ms:.2f} ms", flush=True)
    ng = needle_grid(
        model,
        tok,
        text,
        context_lengths=[1024, 2048, 4096, 6144, 8000],
        depth_percents=[0, 25, 50, 75, 100],
        needles_per_cell=2,
        seed=0,
        progress=False,
    )
    record["needle"][impl] = ng
    print(f"{impl} needle mean {ng['mean_score']:.3f} ({ng['seconds']:.1f}s)", flush=True)
    save_heatmap(ng, out_dir / f"needle_smollm2_{impl}.png")
write_json(out_dir / "smollm2_dense_h100.json", record)
same = all(
    a["responses"] == b["responses"]
    for a, b in zip(record["needle"]["sdpa"]["cells"], record["needle"]["fastattn_dense"]["cells"])
)
print("identical needle responses:", same)
