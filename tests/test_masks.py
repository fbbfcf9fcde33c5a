"""The mask builder registered for every method (``fastattn_mask``) and the classifier of what attention receives."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.masking_utils import (
    and_masks,
    bidirectional_mask_function,
    causal_mask_function,
    create_bidirectional_mask,
    create_causal_mask,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

import hf_fastattn  # noqa: F401  (registers fastattn_dense with transformers)
from hf_fastattn.capabilities import (
    MASK_ADDITIVE_4D,
    MASK_BLOCK_MASK,
    MASK_BOOL_4D,
    MASK_KEY_PADDING,
    MASK_NONE,
    MASK_OTHER,
)
from hf_fastattn.masks import classify_mask, drop_unfilled_cache_slots, fastattn_mask


def padding_mask(batch=2, length=8, left=2, right=3, dtype=torch.bool):
    """Row 0 left-padded by ``left``, row 1 right-padded by ``right`` (True = real token).

    Bool, as transformers hands it to mask builders (``_preprocess_mask_arguments`` converts the tokenizer's mask)."""
    mask = torch.ones(batch, length, dtype=dtype)
    mask[0, :left] = 0
    mask[-1, length - right :] = 0
    return mask


def explicit_causal(batch_mask: torch.Tensor, q_length: int, kv_length: int, q_offset: int, kv_offset: int = 0):
    """(B, 1, S_q, S_kv) bool: query at absolute position q_offset + i sees key kv_offset + j <= it, unless padded."""
    q_pos = torch.arange(q_length)[:, None] + q_offset
    kv_pos = torch.arange(kv_length)[None, :] + kv_offset
    causal = (kv_pos <= q_pos)[None, None]
    return causal & batch_mask.bool()[:, None, None, kv_offset : kv_offset + kv_length]


# --------------------------------------------------------------------------------------------------------------------
# Plain patterns: nothing S_q x S_kv sized
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "q_length, kv_length, q_offset", [(8, 8, 0), (3, 8, 5), (1, 8, 7)], ids=["prefill", "chunk_vs_cache", "decode"]
)
def test_causal_aligned_without_padding_is_none(q_length, kv_length, q_offset):
    assert fastattn_mask(2, q_length, kv_length, q_offset=q_offset, mask_function=causal_mask_function) is None


@pytest.mark.parametrize("q_length, kv_length", [(8, 8), (3, 8)], ids=["self", "cross"])
def test_bidirectional_without_padding_is_none(q_length, kv_length):
    assert fastattn_mask(2, q_length, kv_length, mask_function=bidirectional_mask_function) is None


@pytest.mark.parametrize("dtype", [torch.bool, torch.long], ids=["bool", "long"])
@pytest.mark.parametrize("mask_function", [causal_mask_function, bidirectional_mask_function], ids=["causal", "bidir"])
def test_padding_gives_key_padding_slice(mask_function, dtype):
    attention_mask = padding_mask(dtype=dtype)
    out = fastattn_mask(2, 8, 8, mask_function=mask_function, attention_mask=attention_mask)
    assert out.dtype == torch.bool and out.shape == (2, 8)
    assert torch.equal(out, attention_mask.bool())
    assert classify_mask(out, 2, 8) == MASK_KEY_PADDING


def test_padding_with_cache_offsets():
    """A causal chunk aligned with the end of a cache starting at kv_offset: the keys' slice of the 2-D mask."""
    attention_mask = padding_mask(length=12)
    out = fastattn_mask(
        2, 3, 10, q_offset=9, kv_offset=2, mask_function=causal_mask_function, attention_mask=attention_mask
    )
    assert out.shape == (2, 10)
    assert torch.equal(out, attention_mask.bool()[:, 2:12])


def test_padding_mask_shorter_than_the_cache():
    """Keys past the end of the 2-D mask (a cache longer than the mask) are not attended."""
    attention_mask = padding_mask(length=6, right=1)
    out = fastattn_mask(2, 2, 8, q_offset=6, mask_function=causal_mask_function, attention_mask=attention_mask)
    assert out.shape == (2, 8)
    assert torch.equal(out[:, :6], attention_mask.bool()) and not out[:, 6:].any()


def test_bidirectional_cross_attention_padding():
    attention_mask = padding_mask(length=8)
    out = fastattn_mask(2, 3, 8, mask_function=bidirectional_mask_function, attention_mask=attention_mask)
    assert torch.equal(out, attention_mask.bool())


@pytest.mark.parametrize("mask_function", [causal_mask_function, bidirectional_mask_function], ids=["causal", "bidir"])
def test_all_ones_padding_is_dropped(mask_function):
    """A tokenizer's mask without padding: no key mask, so the kernels skip per-key masking (one host sync)."""
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    assert fastattn_mask(2, 8, 8, mask_function=mask_function, attention_mask=attention_mask) is None


def test_all_ones_over_the_keys_but_not_the_whole_mask_is_dropped():
    """Only the keys this forward sees count: padding outside ``[kv_offset, kv_offset + kv_length)`` does not."""
    attention_mask = torch.ones(2, 10, dtype=torch.bool)
    attention_mask[0, 0] = False
    out = fastattn_mask(2, 1, 8, q_offset=9, kv_offset=2, mask_function=causal_mask_function,
                        attention_mask=attention_mask)  # fmt: skip
    assert out is None


def test_one_padded_key_keeps_the_mask():
    attention_mask = torch.ones(2, 8, dtype=torch.bool)
    attention_mask[1, 0] = False
    out = fastattn_mask(2, 8, 8, mask_function=causal_mask_function, attention_mask=attention_mask)
    assert torch.equal(out, attention_mask)


def test_all_ones_padding_is_kept_when_compiled():
    """Under torch.compile the mask stays: dropping it would branch on the mask's data."""

    def build(mask):
        return fastattn_mask(2, 8, 8, mask_function=causal_mask_function, attention_mask=mask)

    torch._dynamo.reset()
    attention_mask = torch.ones(2, 8, dtype=torch.bool)
    out = torch.compile(build, fullgraph=True, backend="eager")(attention_mask)
    assert torch.equal(out, attention_mask)


# --------------------------------------------------------------------------------------------------------------------
# Everything else is materialised as SDPA's 4-D bool mask (which the kernels decline): never dropped
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_padding", [False, True], ids=["nopad", "pad"])
def test_sliding_window_is_materialised(with_padding):
    attention_mask = padding_mask() if with_padding else None
    window = sliding_window_causal_mask_function(3)
    out = fastattn_mask(2, 8, 8, mask_function=window, attention_mask=attention_mask, allow_is_causal_skip=True)
    assert out is not None and out.dtype == torch.bool and out.shape == (2, 1, 8, 8)
    assert classify_mask(out, 2, 8) == MASK_BOOL_4D
    q, kv = torch.arange(8)[:, None], torch.arange(8)[None, :]
    expected = ((kv <= q) & (kv > q - 3))[None, None].expand(2, 1, 8, 8)
    if with_padding:
        expected = expected & attention_mask.bool()[:, None, None, :]
    assert torch.equal(out, expected)
    reference = sdpa_mask(2, 8, 8, mask_function=window, attention_mask=attention_mask, allow_is_causal_skip=False)
    assert torch.equal(out, reference)


def test_custom_and_mask_is_materialised():
    """A model's extra ``and`` mask function (not the plain causal one) is kept, not replaced by a key-padding mask."""
    block_diagonal = lambda b, h, q, kv: (q // 4) == (kv // 4)
    fn = and_masks(causal_mask_function, block_diagonal)
    out = fastattn_mask(2, 8, 8, mask_function=fn, attention_mask=padding_mask())
    assert out.shape == (2, 1, 8, 8)
    assert not out[:, :, 5, :4].any()  # across the block boundary: hidden
    assert out[0, 0, 5, 4] and out[0, 0, 5, 5] and not out[0, 0, 5, 6]  # row 0: left padding only
    assert out[1, 0, 5, 4] and not out[1, 0, 5, 5]  # row 1: keys 5.. are right padding


@pytest.mark.parametrize("padding", ["none", "all_ones", "right"])
@pytest.mark.parametrize("tensor_offset", [False, True], ids=["int", "tensor"])
def test_prefill_against_static_cache_is_a_shorter_key_mask(padding, tensor_offset):
    """Several queries against a static cache (keys run to max_cache_len, past the queries' end): a key mask covering
    only the filled slots, up to the last query; a 1-D mask of that length when nothing is padded. Without the unfilled
    tail the alignment is bottom-right again: query i at absolute position q_offset + i sees exactly the keys the
    explicit causal mask allows."""
    attention_mask = {"none": None, "all_ones": torch.ones(2, 10), "right": padding_mask(length=10, right=2)}[padding]
    offset = torch.tensor(3) if tensor_offset else 3
    out = fastattn_mask(
        2, 2, 10, q_offset=offset, kv_offset=0, mask_function=causal_mask_function, attention_mask=attention_mask,
        allow_is_causal_skip=True, allow_is_bidirectional_skip=True,
    )  # fmt: skip
    key = value = torch.randn(2, 1, 10, 4)
    kept_mask, kept_key, kept_value = drop_unfilled_cache_slots(out, key, value)
    assert kept_key.shape[2] == kept_value.shape[2] == 5 and kept_key.data_ptr() == key.data_ptr()  # views
    if padding == "right":
        assert out.dtype == torch.bool and out.shape == (2, 5)
        assert torch.equal(out, attention_mask.bool()[:, :5]) and kept_mask is out
    else:  # nothing padded among the filled slots: their number only, and no mask for the kernels
        assert out.dtype == torch.bool and out.shape == (5,) and out.all()
        assert kept_mask is None
    batch_mask = torch.ones(2, 10) if attention_mask is None else attention_mask
    bottom_right = explicit_causal(batch_mask, 2, 5, q_offset=3)
    assert torch.equal(bottom_right, explicit_causal(batch_mask, 2, 10, q_offset=3)[..., :5])


@pytest.mark.parametrize("padding", ["none", "right"])
def test_static_cache_prefill_mask_built_again_from_itself(padding):
    """generate() builds a static cache's mask before the forward, and the forward builds it again from that one: the
    second build gives the first's mask back."""
    attention_mask = None if padding == "none" else padding_mask(length=10, right=2)

    def build(mask):
        return fastattn_mask(2, 2, 10, q_offset=3, mask_function=causal_mask_function, attention_mask=mask)

    first = build(attention_mask)
    assert torch.equal(build(first), first)


def test_drop_unfilled_cache_slots_passes_other_masks_through():
    key = value = torch.randn(2, 1, 10, 4)
    for mask in (None, torch.ones(2, 10, dtype=torch.bool), torch.ones(2, 1, 3, 10, dtype=torch.bool)):
        kept_mask, kept_key, kept_value = drop_unfilled_cache_slots(mask, key, value)
        assert kept_mask is mask and kept_key is key and kept_value is value


def test_prefill_against_static_cache_is_materialised_when_compiled():
    """Under torch.compile the filled length would be a data-dependent shape: the 4-D mask instead (the fallback)."""

    def build(offset):
        return fastattn_mask(2, 2, 10, q_offset=offset, mask_function=causal_mask_function, attention_mask=None)

    torch._dynamo.reset()
    out = torch.compile(build, fullgraph=True, backend="eager")(torch.tensor(3))
    assert out.shape == (2, 1, 2, 10) and classify_mask(out, 2, 10) == MASK_BOOL_4D
    assert torch.equal(out, explicit_causal(torch.ones(2, 10), 2, 10, q_offset=3).expand_as(out))


@pytest.mark.parametrize("with_padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("tensor_offset", [False, True], ids=["int", "tensor"])
def test_decode_against_static_cache_is_key_padding(with_padding, tensor_offset):
    """One query against a static cache (keys to max_cache_len, past the query): a (B, S_kv) key mask hiding the
    unfilled slots, not a materialised 4-D mask. StaticCache reports its offset as a 0-d tensor
    (transformers' get_query_offset), compared on the device without a host sync."""
    attention_mask = padding_mask(length=10, left=1, right=6) if with_padding else None
    offset = torch.tensor(3) if tensor_offset else 3
    out = fastattn_mask(2, 1, 10, q_offset=offset, mask_function=causal_mask_function, attention_mask=attention_mask)
    assert out is not None and out.dtype == torch.bool and out.shape == (2, 10)
    assert classify_mask(out, 2, 10) == MASK_KEY_PADDING
    batch_mask = attention_mask if with_padding else torch.ones(2, 10)
    # A single query sees every key its mask row allows (the kernels' bottom-right rule for S_q = 1).
    assert torch.equal(out, explicit_causal(batch_mask, 1, 10, q_offset=3)[:, 0, 0])
    assert not out[:, 4:].any()  # the unfilled slots after position 3


def test_decode_key_mask_compiles_fullgraph():
    attention_mask = padding_mask(length=10, left=1, right=0).bool()

    def build(mask, offset):
        return fastattn_mask(2, 1, 10, q_offset=offset, mask_function=causal_mask_function, attention_mask=mask)

    torch._dynamo.reset()
    out = torch.compile(build, fullgraph=True, backend="eager")(attention_mask, torch.tensor(3))
    assert torch.equal(out, build(attention_mask, torch.tensor(3)))


# --------------------------------------------------------------------------------------------------------------------
# Through transformers' own entry points, with the registered implementation
# --------------------------------------------------------------------------------------------------------------------


def _config():
    config = LlamaConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_hidden_layers=1)
    config._attn_implementation = "fastattn_dense"
    return config


def test_create_causal_mask_uses_the_builder():
    config, embeds = _config(), torch.zeros(2, 8, 32)
    assert create_causal_mask(config, embeds, None, None) is None
    attention_mask = padding_mask()
    assert torch.equal(create_causal_mask(config, embeds, attention_mask, None), attention_mask.bool())
    # Packed sequences (position ids restarting, no attention mask) need a block-diagonal mask: materialised.
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2)
    packed = create_causal_mask(config, embeds, None, None, position_ids=position_ids)
    assert packed.shape == (2, 1, 8, 8) and not packed[:, :, 3, :3].any()


def test_create_bidirectional_mask_uses_the_builder():
    config, embeds = _config(), torch.zeros(2, 8, 32)
    config.is_causal = False
    assert create_bidirectional_mask(config, embeds, None) is None
    attention_mask = padding_mask()
    assert torch.equal(create_bidirectional_mask(config, embeds, attention_mask), attention_mask.bool())


# --------------------------------------------------------------------------------------------------------------------
# classify_mask
# --------------------------------------------------------------------------------------------------------------------


def test_classify_mask_kinds():
    assert classify_mask(None, 2, 8) == MASK_NONE
    assert classify_mask(torch.ones(2, 8, dtype=torch.bool), 2, 8) == MASK_KEY_PADDING
    assert classify_mask(torch.ones(2, 8, dtype=torch.long), 2, 8) == MASK_KEY_PADDING
    assert classify_mask(torch.ones(2, 1, 4, 8, dtype=torch.bool), 2, 8) == MASK_BOOL_4D
    assert classify_mask(torch.zeros(2, 1, 4, 8), 2, 8) == MASK_ADDITIVE_4D
    assert classify_mask(torch.zeros(2, 1, 4, 8, dtype=torch.float16), 2, 8) == MASK_ADDITIVE_4D
    assert classify_mask(torch.ones(2, 7, dtype=torch.bool), 2, 8) == MASK_OTHER  # wrong key length
    assert classify_mask(torch.ones(3, 8, dtype=torch.bool), 2, 8) == MASK_OTHER  # wrong batch
    assert classify_mask(torch.ones(2, 4, 8, dtype=torch.bool), 2, 8) == MASK_OTHER  # 3-D
    assert classify_mask(object(), 2, 8) == MASK_OTHER


def test_classify_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    block_mask = create_block_mask(lambda b, h, q, kv: kv <= q, B=None, H=None, Q_LEN=128, KV_LEN=128, device="cpu")
    assert classify_mask(block_mask, 2, 128) == MASK_BLOCK_MASK
