"""Helpers shared by the method-level tests (dispatch, BSFA, SeerAttention): warnings, tiny model pairs, prompts."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

import hf_fastattn.dispatch
from hf_fastattn._compat import cache_argument
from hf_fastattn.artifacts import CONFIG_NAME


@pytest.fixture(autouse=True)
def fresh_warnings(caplog):
    """Every test starts with no warning remembered (dispatch warns once per reason) and captures hf_fastattn's."""
    hf_fastattn.dispatch.reset_warnings()
    caplog.set_level(logging.WARNING, logger="hf_fastattn")
    yield
    hf_fastattn.dispatch.reset_warnings()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hf_fastattn" and r.levelno >= logging.WARNING]


def model_pair(config, auto_class, implementation: str = "sdpa", seed: int = 0):
    """(eager reference, model to patch) with the same weights, each built from its own copy of the config."""
    torch.manual_seed(seed)
    reference = auto_class.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    model = auto_class.from_config(copy.deepcopy(config), attn_implementation=implementation).eval()
    model.load_state_dict(reference.state_dict())
    assert reference.config is not model.config
    assert reference.config._attn_implementation == "eager"
    assert model.config._attn_implementation == implementation
    return reference, model


def left_padded_prompt(vocab: int, pad_id: int, seq: int, pad: int = 0, batch: int = 2, seed: int = 1):
    """Random token ids and a mask; with ``pad``, row 1 is left-padded by ``pad`` tokens (else no mask at all)."""
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    if not pad:
        return ids, None
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = pad_id
    return ids, mask


def greedy_generate_pair(model, reference, input_ids, attention_mask, *, new_tokens: int, pad_id: int):
    """``generate`` of exactly ``new_tokens`` greedy tokens with a fresh ``DynamicCache``, by ``model`` and by
    ``reference`` on the same prompt; returns both outputs (``sequences`` and per-step ``logits``)."""
    from transformers import DynamicCache

    kwargs = {
        "input_ids": input_ids, "attention_mask": attention_mask, "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": pad_id, "return_dict_in_generate": True,
        "output_logits": True,
    }  # fmt: skip
    with torch.no_grad():
        actual = model.generate(**kwargs, **cache_argument(model, DynamicCache(config=model.config)))
        expected = reference.generate(**kwargs, **cache_argument(reference, DynamicCache(config=reference.config)))
    return actual, expected


def rewrite_artifact_config(directory, edit) -> None:
    """Apply ``edit`` to an artifact's JSON config in place (to damage or age it)."""
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
