"""GPU model-level checks at realistic shapes: a SmolLM2-shaped Llama (9 query / 3 KV heads, head dim 64) in bf16.

Tolerance follows flash-attention's rule at model level: the patched bf16 model's error against an fp32 eager model is
at most twice PyTorch's own bf16 error (plus a small floor for positions where it happens to be exact). For logits
PyTorch's own is eager in bf16; for gradients, which accumulate every layer's backward, it is the larger of eager's
and SDPA's bf16 errors, since the fused SDPA backward shares FlashAttention's recomputation design with ours.
"""

import copy

import pytest
import torch
from test_equivalence import AttentionSpy
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import hf_fastattn
from hf_fastattn._compat import cache_argument, output_cache

pytestmark = pytest.mark.gpu

SMOLLM2_SHAPED = LlamaConfig(
    vocab_size=1024,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
)


def build(implementation: str, dtype: torch.dtype, state_dict=None):
    model = AutoModelForCausalLM.from_config(copy.deepcopy(SMOLLM2_SHAPED), attn_implementation=implementation)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model = model.to("cuda", dtype).eval()
    assert model.config._attn_implementation == implementation
    return model


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    reference = build("eager", torch.float32)
    weights = reference.state_dict()
    return {
        "fp32_eager": reference,
        "bf16_eager": build("eager", torch.bfloat16, weights),
        "bf16_sdpa": build("sdpa", torch.bfloat16, weights),
        "bf16_fastattn": build("fastattn_dense", torch.bfloat16, weights),
    }


def left_padded_batch(length: int, pads=(0, 37, 300)):
    ids = torch.randint(0, SMOLLM2_SHAPED.vocab_size, (len(pads), length), device="cuda")
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("length", [1000, 2049])
def test_bf16_logits_within_twice_eager_error(models, length):
    ids, mask = left_padded_batch(length)
    valid = mask.bool()
    with torch.no_grad():
        reference = models["fp32_eager"](ids, attention_mask=mask).logits[valid]
        eager = models["bf16_eager"](ids, attention_mask=mask).logits[valid].float()
        ours = models["bf16_fastattn"](ids, attention_mask=mask).logits[valid].float()
    ours_error = (ours - reference).abs().max().item()
    eager_error = (eager - reference).abs().max().item()
    assert ours_error <= 2 * eager_error + 1e-3, (ours_error, eager_error)


def test_bf16_gradients_within_twice_eager_error(models):
    ids, mask = left_padded_batch(513)
    # Score only predictions made from real tokens. The last pad position predicts the first real token, but a pad
    # query sees no key: eager gives it a uniform average over every key (real ones included), we give zeros. Both
    # are arbitrary, and scoring them would compare that choice, not the attention.
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    grads = {}
    for name in ("fp32_eager", "bf16_eager", "bf16_sdpa", "bf16_fastattn"):
        model = models[name]
        model.zero_grad(set_to_none=True)
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads[name] = {n: p.grad.float() for n, p in model.named_parameters() if "self_attn" in n}
        model.zero_grad(set_to_none=True)
    for name, reference in grads["fp32_eager"].items():
        pytorch_error = max((grads[bf16][name] - reference).abs().max().item() for bf16 in ("bf16_eager", "bf16_sdpa"))
        ours_error = (grads["bf16_fastattn"][name] - reference).abs().max().item()
        assert ours_error <= 2 * pytorch_error + 1e-6 * reference.abs().max().item(), (name, ours_error, pytorch_error)


def test_cached_decode_matches_full_forward(models):
    """Token-by-token decode with a DynamicCache and left padding equals the uncached forward over the same prefix."""
    model = models["bf16_fastattn"]
    ids, mask = left_padded_batch(1030, pads=(0, 5, 211))
    prompt, steps = 1024, 6
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(ids[:, :prompt], attention_mask=mask[:, :prompt], **cache_argument(model, cache), use_cache=True)
        for step in range(steps):
            end = prompt + step + 1
            out = model(ids[:, end - 1 : end], attention_mask=mask[:, :end], **cache_argument(model, output_cache(out)))
            full = model(ids[:, :end], attention_mask=mask[:, :end]).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1].float(), full.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("method", ["dense", "lean"])
def test_static_cache_generate_matches_full_forward(models, method, monkeypatch):
    """generate() with a StaticCache compiles the decode step on CUDA (CUDA graphs, transformers' default compile
    config). Our decode kernels run inside it, the eager prefill runs our kernels too, and every generated step's
    logits equal one uncached forward over the generated sequence (teacher forcing, so a near-tie token cannot make
    the comparison flaky)."""
    spy = AttentionSpy(monkeypatch)
    model = models["bf16_sdpa"]
    ids, mask = left_padded_batch(700, pads=(0, 9, 130))
    new_tokens = 12
    torch._dynamo.reset()
    with torch.no_grad(), hf_fastattn.use(model, method):
        generated = model.generate(
            input_ids=ids, attention_mask=mask, cache_implementation="static", max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
            output_logits=True,
        )  # fmt: skip
        sequences = generated.sequences
        full_mask = torch.cat([mask, torch.ones_like(sequences[:, ids.shape[1] :])], dim=1)
        full = model(sequences, attention_mask=full_mask).logits[:, ids.shape[1] - 1 : -1]
    assert spy.decode, "the decode kernels never ran"
    assert spy.fallbacks == 0  # the prefill runs the kernels on the filled slots
    stepped = torch.stack(generated.logits, dim=1)
    torch.testing.assert_close(stepped.float(), full.float(), atol=3e-2, rtol=3e-2)
