"""``fastattn_seer`` on tiny random models: exactness at sparsity 0, the block-sparse kernel's answer on the gate's (or
the ground truth's) selection, pre-RoPE gate inputs, chunked prefill and decode, configuration errors, gate artifacts
and the gradient fallback.

The models are fp32 on the CPU, where ``tests/conftest.py`` runs the Triton kernels in the interpreter, with 16-token
blocks so that an 80-token prompt spans five query blocks. Every sparse check records the method's own kernel calls
(inputs, selection and output, through a spy on ``hf_fastattn.methods.seer._KERNELS``) and recomputes them with the
plain-PyTorch references of :mod:`hf_fastattn.ops.seer`.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from method_helpers import (  # noqa: F401 (autouse fixture)
    fresh_warnings,
    greedy_generate_pair,
    left_padded_prompt,
    rewrite_artifact_config,
    warnings_of,
)
from method_helpers import model_pair as shared_model_pair
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, DynamicCache, LlamaConfig

import hf_fastattn
import hf_fastattn.dispatch
import hf_fastattn.ops.seer.attention as seer_attention
from hf_fastattn import ArtifactError
from hf_fastattn._compat import cache_argument
from hf_fastattn.artifacts import TENSORS_NAME
from hf_fastattn.methods import seer
from hf_fastattn.ops.dense import dense_attention_reference
from hf_fastattn.ops.seer import (
    attention_with_block_target_reference,
    block_sparse_attention_reference,
    normalise_target,
    pool_blocks_reference,
    select_blocks,
    selection_mask,
    visible_blocks,
)

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="fp32 tiny models run the kernels only on the CPU interpreter"
)

BLOCK = 16
GATE_DIM = 16
VOCAB = 128
PAD_ID = 0
TOL = {"atol": 1e-4, "rtol": 1e-4}
KERNEL_TOL = {"atol": 2e-5, "rtol": 2e-5}  # one kernel call against its fp32 reference
LLAMA = LlamaConfig(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2,
    initializer_range=0.2,  # larger scores than the default: peaked attention, greedy decoding does not repeat
)  # fmt: skip
BERT = BertConfig(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    max_position_embeddings=128, pad_token_id=PAD_ID, initializer_range=0.2,
)  # fmt: skip
LAYERS = 2
ARCHS = {"llama": (LLAMA, AutoModelForCausalLM), "bert": (BERT, AutoModel)}


def model_pair(arch: str = "llama", implementation: str = "sdpa", seed: int = 0):
    return shared_model_pair(*ARCHS[arch], implementation, seed)


def prompt(seq: int = 80, pad: int = 0, batch: int = 2, seed: int = 1):
    return left_padded_prompt(VOCAB, PAD_ID, seq, pad, batch, seed)


def output(model, ids, mask, **kwargs):
    with torch.no_grad():
        result = model(input_ids=ids, attention_mask=mask, **kwargs)
    return result.logits if getattr(result, "logits", None) is not None else result.last_hidden_state


def valid_positions(ids, mask):
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()


def statistics(model) -> list[dict]:
    spec = hf_fastattn.get_method("seer")
    return [spec.statistics(state) for state in hf_fastattn.layer_states(model)]


def densities(model) -> list[float | None]:
    return [entry["density"] for entry in statistics(model)]


def gate_tensors(model) -> dict[str, torch.Tensor]:
    return {
        f"{state.layer_index}.{name}": parameter.detach().clone()
        for state in hf_fastattn.layer_states(model)
        for name, parameter in state.gate.named_parameters()
    }


def randomise_gates(model, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for state in hf_fastattn.layer_states(model):
            for parameter in state.gate.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator))


class Spy:
    """Records the method's kernel calls (inputs, kwargs, output), gate calls, decode steps, Triton launches and SDPA
    fallbacks; the plain-PyTorch reference path must never run."""

    KERNELS = ("sparse", "target", "dense", "pool", "select", "tail")

    def __init__(self, monkeypatch):
        self.sparse, self.target, self.dense, self.pool, self.select, self.tail = [], [], [], [], [], []
        self.gate, self.decode = [], []
        self.launches, self.fallbacks = [], 0
        kernels = {name: self._recording(getattr(seer._KERNELS, name), getattr(self, name)) for name in self.KERNELS}
        kernels["pool"] = self._recording(seer._KERNELS.pool, self.pool, positional=("x", "block_size"))
        kernels["select"] = self._recording(seer._KERNELS.select, self.select, positional=("scores",))
        monkeypatch.setattr(seer, "_KERNELS", dataclasses.replace(seer._KERNELS, **kernels))
        # Every operation of the reference path (whatever _Ops holds) must stay unused.
        operations = [field.name for field in dataclasses.fields(seer._REFERENCES)]
        forbidden = {name: self._forbidden for name in operations if callable(getattr(seer._REFERENCES, name))}
        monkeypatch.setattr(seer, "_REFERENCES", dataclasses.replace(seer._REFERENCES, **forbidden))
        real_decode = hf_fastattn.dispatch.decode_attention

        def decode(query, *args, **kwargs):
            self.decode.append(query.shape[2])
            return real_decode(query, *args, **kwargs)

        monkeypatch.setattr(hf_fastattn.dispatch, "decode_attention", decode)
        real_fallback = hf_fastattn.dispatch.sdpa_fallback

        def fallback(*args, **kwargs):
            self.fallbacks += 1
            return real_fallback(*args, **kwargs)

        monkeypatch.setattr(hf_fastattn.dispatch, "sdpa_fallback", fallback)
        real_launch = seer_attention._launch

        def launch(kernel, *args, **kwargs):
            self.launches.append(kernel)
            return real_launch(kernel, *args, **kwargs)

        monkeypatch.setattr(seer_attention, "_launch", launch)
        real_gate = seer.AttnGate.forward

        def gate(module, pooled_query, pooled_key, **kwargs):
            log_probs, valid = real_gate(module, pooled_query, pooled_key, **kwargs)
            record = {"query": pooled_query, "key": pooled_key, "log_probs": log_probs, "valid": valid}
            self.gate.append({**record, **kwargs})
            return log_probs, valid

        monkeypatch.setattr(seer.AttnGate, "forward", gate)

    @staticmethod
    def _recording(function, calls, positional=("q", "k", "v")):
        """Records the first ``positional`` arguments by name, the rest as ``args``, and the output as returned (a
        copy: the method writes the exact tail rows into the block-sparse kernel's output afterwards)."""

        def wrapper(*args, **kwargs):
            out = function(*args, **kwargs)
            named = dict(zip(positional, args))
            snapshot = out.clone() if isinstance(out, torch.Tensor) else out
            calls.append({**named, "args": args[len(positional) :], "kwargs": kwargs, "out": snapshot})
            return out

        return wrapper

    @staticmethod
    def _forbidden(*args, **kwargs):
        raise AssertionError("the plain-PyTorch reference ran instead of the Triton kernel")

    def assert_sparse_kernel_ran(self, calls: int):
        assert len(self.sparse) == calls and len(self.select) == calls and self.fallbacks == 0
        assert self.launches.count(seer_attention._block_sparse_fwd_kernel) == calls


def check_sparse_calls(spy: Spy, *, causal: bool, **rule):
    """Each block-sparse kernel call equals the reference on its selection, and that selection is the one the rule
    picks from the gate's probabilities (gate mode). Returns (selected, visible) blocks summed over the calls."""
    selected = visible_total = 0
    assert len(spy.gate) == len(spy.sparse)
    for call, gate in zip(spy.sparse, spy.gate):
        (selection,) = call["args"]
        kwargs = call["kwargs"]
        assert kwargs["causal"] is causal and selection.block_size == BLOCK
        seq = call["q"].shape[2]
        mask = selection_mask(selection)
        assert mask.shape == (call["q"].shape[0], call["k"].shape[1], -(-seq // BLOCK), -(-seq // BLOCK))
        expected = block_sparse_attention_reference(
            call["q"], call["k"], call["v"], mask, causal=causal, scale=kwargs["scale"],
            key_padding=kwargs["key_padding"], block_size=BLOCK,
        )  # fmt: skip
        torch.testing.assert_close(call["out"], expected, **KERNEL_TOL)
        probabilities = gate["log_probs"].exp()
        chosen = select_blocks(probabilities, seq_q=seq, seq_k=seq, causal=causal, block_size=BLOCK, **rule)
        assert torch.equal(mask, chosen)
        visible, _ = visible_blocks(seq, seq, causal=causal, block_size=BLOCK)
        selected += int(mask.sum())
        visible_total += int(visible.sum()) * mask.shape[0] * mask.shape[1]
    return selected, visible_total


# --------------------------------------------------------------------------------------------------------------------
# Sparsity 0: every visible block, exact attention
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_sparsity_zero_matches_eager(arch, monkeypatch, caplog):
    reference, model = model_pair(arch)
    hf_fastattn.patch(model, "seer", sparsity=0.0, block_size=BLOCK)
    assert model.config._attn_implementation == "fastattn_seer"
    assert reference.config._attn_implementation == "eager"
    spy = Spy(monkeypatch)
    ids, mask = prompt(seq=40, pad=21)  # 3 blocks, the last partial; row 1: a fully padded first block
    got, expected = output(model, ids, mask), output(reference, ids, mask)
    valid = valid_positions(ids, mask)
    torch.testing.assert_close(got[valid], expected[valid], **TOL)
    spy.assert_sparse_kernel_ran(LAYERS)
    assert warnings_of(caplog) == []
    blocks = 3 * 4 // 2 if arch == "llama" else 3 * 3  # per (batch row, KV head): causal triangle or everything
    kv_heads = 2 if arch == "llama" else 4
    per_layer = {"density": 1.0, "blocks": {"computed": 2 * kv_heads * blocks, "visible": 2 * kv_heads * blocks}}
    assert statistics(model) == [per_layer] * LAYERS
    for state in hf_fastattn.layer_states(model):
        state.reset_statistics()
    assert densities(model) == [None] * LAYERS


# --------------------------------------------------------------------------------------------------------------------
# Gate mode: the gate's selection, computed by the block-sparse kernel
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "rule", "density"),
    [
        # Budgets ceil(0.5 * visible) per row: causal rows see 1..5 blocks (1+1+2+2+3 of 15), bidirectional 2 of 4.
        ("llama", {"sparsity": 0.5}, 9 / 15),
        ("bert", {"sparsity": 0.5}, 1 / 2),
        ("llama", {"topk": 3}, (1 + 2 + 3 + 3 + 3) / 15),
        ("llama", {"threshold": 0.3}, None),  # SeerAttention's tau, on the gate's probabilities
        ("llama", {"sparsity": 0.5, "allocation": "head"}, 8 / 15),  # one budget of ceil(0.5 * 15) per KV head
    ],
    ids=["llama-sparsity", "bert-sparsity", "llama-topk", "llama-threshold", "llama-sparsity-head"],
)
def test_gate_selection_runs_the_block_sparse_kernel(arch, rule, density, monkeypatch, caplog):
    """Fresh random gates: each layer's output is block-sparse attention (the reference) over the selection that the
    rule makes from the gate's probabilities, and the realised density is those selections' count. No sink block, so
    that most rows have a choice to make."""
    reference, model = model_pair(arch)
    rule = {**rule, "sink_blocks": 0, "local_blocks": 1}
    hf_fastattn.patch(model, "seer", block_size=BLOCK, gate_dim=GATE_DIM, tail_tokens=0, **rule)
    spy = Spy(monkeypatch)
    seq = 80 if arch == "llama" else 64
    ids, mask = prompt(seq=seq, pad=20)
    got = output(model, ids, mask)
    spy.assert_sparse_kernel_ran(LAYERS)
    assert spy.target == spy.dense == spy.tail == [] and warnings_of(caplog) == []
    causal = arch == "llama"
    selected, visible = check_sparse_calls(spy, causal=causal, **rule)
    if density is not None:
        assert selected / visible == pytest.approx(density)
    layer_stats = statistics(model)
    assert sum(s["blocks"]["computed"] for s in layer_stats) == selected
    assert sum(s["blocks"]["visible"] for s in layer_stats) == visible
    assert all(0.0 < density < 1.0 for density in densities(model))
    # The gate really chooses: its selections differ between KV heads, and the output is not eager's.
    masks = torch.stack([selection_mask(call["args"][0]) for call in spy.sparse])  # (layers, B, H_kv, NQ, NK)
    assert any(not torch.equal(masks[:, :, head], masks[:, :, 0]) for head in range(1, masks.shape[2]))
    valid = valid_positions(ids, mask)
    assert (got[valid] - output(reference, ids, mask)[valid]).abs().max() > 1e-3


@pytest.mark.parametrize(("tail", "allocation"), [(12, "head"), (12, "row"), (0, "head")])
def test_exact_tail_rows(tail, allocation, monkeypatch):
    """``tail_tokens``: the last rows of a causal prefill are exact attention over every key (the split-KV decode
    kernels), the other rows the block-sparse kernel's; with ``allocation="head"`` the tail's work comes out of each
    head's budget, and it counts in the realised density. 12 rows of 122 (16-token blocks, the last one 10 rows) span
    two query blocks."""
    _, model = model_pair()
    hf_fastattn.patch(model, "seer", sparsity=0.5, block_size=BLOCK, gate_dim=GATE_DIM, sink_blocks=0,
                      allocation=allocation, tail_tokens=tail)  # fmt: skip
    randomise_gates(model)
    spy = Spy(monkeypatch)
    seq = 122
    output(model, *prompt(seq=seq, pad=13))
    spy.assert_sparse_kernel_ran(LAYERS)
    assert len(spy.tail) == (LAYERS if tail else 0)
    visible, _ = visible_blocks(seq, seq, causal=True, block_size=BLOCK)
    tail_work = (tail * seq - tail * (tail - 1) // 2) / BLOCK**2  # keys seen by the tail rows, in 16x16 blocks
    budget = math.ceil(0.5 * int(visible.sum()))
    assert budget - math.ceil(tail_work) > visible.shape[0]  # beyond the diagonal blocks: nothing clamps
    computed = 0.0
    for sparse_call, select_call, index in zip(spy.sparse, spy.select, range(LAYERS)):
        mask = selection_mask(sparse_call["args"][0])  # (B, H_kv, NQ, NK)
        if allocation == "head":
            assert (mask.sum((-2, -1)) == budget - math.ceil(tail_work)).all()
            assert select_call["kwargs"]["reserved_blocks"] == math.ceil(tail_work)
        else:
            assert "reserved_blocks" not in select_call["kwargs"]
        computed += int(mask.sum()) + tail_work * mask.shape[0] * mask.shape[1]
        if not tail:
            continue
        tail_call = spy.tail[index]
        assert tail_call["q"].shape[2] == tail and tail_call["k"] is sparse_call["k"]
        torch.testing.assert_close(tail_call["q"], sparse_call["q"][:, :, -tail:], atol=0, rtol=0)
        kwargs = tail_call["kwargs"]
        assert torch.equal(kwargs["key_padding"], sparse_call["kwargs"]["key_padding"])
        exact = dense_attention_reference(
            sparse_call["q"], sparse_call["k"], sparse_call["v"], causal=True, scale=kwargs["scale"],
            key_padding=kwargs["key_padding"],
        )  # fmt: skip
        torch.testing.assert_close(tail_call["out"], exact[:, :, -tail:], **KERNEL_TOL)
    visible_total = int(visible.sum()) * 2 * LLAMA.num_key_value_heads * LAYERS
    assert sum(entry["blocks"]["computed"] for entry in statistics(model)) == pytest.approx(computed)
    assert sum(entry["blocks"]["visible"] for entry in statistics(model)) == visible_total
    if allocation == "head":  # the budget's density, less under one block per head for the rounded-up reserve
        per_head = computed / (visible_total // int(visible.sum()))
        assert budget - 1 < per_head <= budget


def test_exact_tail_output_is_written_into_the_layer_output(monkeypatch):
    """End to end through the attention function: the tail rows of its output are the exact ones, the other rows the
    block-sparse kernel's (recorded before the tail was written)."""
    _, model = model_pair()
    hf_fastattn.patch(model, "seer", sparsity=0.8, block_size=BLOCK, gate_dim=GATE_DIM, tail_tokens=20)
    randomise_gates(model)
    spy = Spy(monkeypatch)
    outputs = []
    real = seer._run

    def run(*args, **kwargs):
        outputs.append(real(*args, **kwargs))
        return outputs[-1]

    monkeypatch.setattr(seer, "_run", run)
    output(model, *prompt(seq=80, pad=0))
    assert len(outputs) == len(spy.sparse) == len(spy.tail) == LAYERS
    for out, sparse_call, tail_call in zip(outputs, spy.sparse, spy.tail):
        torch.testing.assert_close(out[:, :, -20:], tail_call["out"], atol=0, rtol=0)
        torch.testing.assert_close(out[:, :, :-20], sparse_call["out"][:, :, :-20], atol=0, rtol=0)
        assert (sparse_call["out"][:, :, -20:] - tail_call["out"]).abs().max() > 1e-3  # the tail changed them


def test_prompt_within_the_tail_runs_dense_attention(monkeypatch):
    """A causal prompt no longer than ``tail_tokens`` has nothing to gate: the dense kernel runs, and the density is
    1; a bidirectional encoder has no tail and stays sparse."""
    reference, model = model_pair()
    hf_fastattn.patch(model, "seer", sparsity=0.8, block_size=BLOCK, gate_dim=GATE_DIM, tail_tokens=48)
    spy = Spy(monkeypatch)
    ids, mask = prompt(seq=48, pad=0)
    torch.testing.assert_close(output(model, ids, mask), output(reference, ids, mask), **TOL)
    assert spy.sparse == spy.gate == spy.tail == [] and len(spy.dense) == LAYERS
    assert densities(model) == [1.0] * LAYERS
    _, encoder = model_pair("bert")
    hf_fastattn.patch(encoder, "seer", sparsity=0.5, block_size=BLOCK, gate_dim=GATE_DIM, tail_tokens=48)
    spy = Spy(monkeypatch)
    output(encoder, *prompt(seq=48, pad=0))
    spy.assert_sparse_kernel_ran(LAYERS)
    assert spy.tail == [] and spy.dense == []


def test_oracle_selects_from_the_ground_truth(monkeypatch, caplog):
    """``mode="oracle"``: the ground-truth kernel runs first and the selection is the sparsity rule applied to its
    normalised (GQA max-pooled) block map, recomputed here by the reference on the recorded q/k/v."""
    _, model = model_pair()
    rule = {"sparsity": 0.5, "sink_blocks": 0, "local_blocks": 1}
    hf_fastattn.patch(model, "seer", mode="oracle", block_size=BLOCK, gate_dim=GATE_DIM, tail_tokens=0, **rule)
    spy = Spy(monkeypatch)
    ids, mask = prompt(seq=64, pad=11)
    output(model, ids, mask)
    spy.assert_sparse_kernel_ran(LAYERS)
    assert len(spy.target) == LAYERS and spy.gate == [] and warnings_of(caplog) == []
    assert spy.launches.count(seer_attention._block_target_kernel) == LAYERS
    for target_call, sparse_call in zip(spy.target, spy.sparse):
        for name in ("q", "k", "v"):
            assert sparse_call[name] is target_call[name]
        kwargs = sparse_call["kwargs"]
        out, target = attention_with_block_target_reference(
            sparse_call["q"], sparse_call["k"], sparse_call["v"], causal=True, scale=kwargs["scale"],
            key_padding=kwargs["key_padding"], block_size=BLOCK,
        )  # fmt: skip
        torch.testing.assert_close(target_call["out"][1], target, **KERNEL_TOL)  # the kernel's own target
        torch.testing.assert_close(target_call["out"][0], out, **KERNEL_TOL)
        expected = select_blocks(
            normalise_target(target, sparse_call["k"].shape[1]), seq_q=64, seq_k=64, causal=True, block_size=BLOCK,
            **rule,
        )  # fmt: skip
        (selection,) = sparse_call["args"]
        assert torch.equal(selection_mask(selection), expected)
        reference_out = block_sparse_attention_reference(
            sparse_call["q"], sparse_call["k"], sparse_call["v"], expected, causal=True, scale=kwargs["scale"],
            key_padding=kwargs["key_padding"], block_size=BLOCK,
        )  # fmt: skip
        torch.testing.assert_close(sparse_call["out"], reference_out, **KERNEL_TOL)
    assert all(density < 1.0 for density in densities(model))


def test_gate_scores_pooled_pre_rope_queries_and_keys(monkeypatch):
    """The attention function gets rotated q/k; the gate must score the block pools of the projections before RoPE
    (the pool kernel undoes RoPE at the call's position ids, shifted for the left-padded row as ``generate`` passes
    them): compared here with the reference pools of the q_proj / k_proj outputs, padding excluded."""
    _, model = model_pair()
    hf_fastattn.patch(model, "seer", sparsity=0.5, block_size=BLOCK, gate_dim=GATE_DIM)
    spy = Spy(monkeypatch)
    projections = []
    heads, kv_heads, head_dim = LLAMA.num_attention_heads, LLAMA.num_key_value_heads, 16
    for layer in model.model.layers:
        for name, count in (("q_proj", heads), ("k_proj", kv_heads)):
            getattr(layer.self_attn, name).register_forward_hook(
                lambda module, args, out, _n=name, _c=count: projections.append(
                    (_n, out.view(out.shape[0], out.shape[1], _c, head_dim).transpose(1, 2))
                )
            )
    ids, mask = prompt(seq=56, pad=21)  # 4 blocks, the last one partial; row 1 starts with a fully padded block
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    output(model, ids, mask, position_ids=position_ids)
    assert len(spy.gate) == LAYERS and len(projections) == 2 * LAYERS
    assert [call["kwargs"].get("extremes", False) for call in spy.pool] == [False, True] * LAYERS  # the kernel ran
    for layer, gate in enumerate(spy.gate):
        (q_name, q_proj), (k_name, k_proj) = projections[2 * layer : 2 * layer + 2]
        assert (q_name, k_name) == ("q_proj", "k_proj")
        (query_average,) = pool_blocks_reference(q_proj, BLOCK, valid=mask)
        key_pools = pool_blocks_reference(k_proj, BLOCK, valid=mask, extremes=True)
        torch.testing.assert_close(gate["query"], query_average, atol=1e-5, rtol=1e-5)
        assert len(gate["key"]) == 3
        for got, expected in zip(gate["key"], key_pools):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # Pooling what the attention function received (rotated) would give something else.
        sparse_call = spy.sparse[layer]
        assert (pool_blocks_reference(sparse_call["q"], BLOCK, valid=mask)[0] - query_average).abs().max() > 1e-2
        assert (pool_blocks_reference(sparse_call["k"], BLOCK, valid=mask)[0] - key_pools[0]).abs().max() > 1e-2
        assert gate["seq"] == 56 and gate["causal"] is True
        assert torch.equal(gate["key_padding"].bool(), mask.bool())


@pytest.mark.parametrize("rope_theta", [None, 10000.0])
@pytest.mark.parametrize("causal", [True, False])
def test_attn_gate_scores_from_first_principles(rope_theta, causal):
    """AttnGate's log-probabilities, spelled out: group-concatenated query pools and (max, min, avg) key pools
    projected per KV head, each block's projection rotated pair by pair at the block's first position, scaled dot
    products over the visible blocks, log-softmax. With an all-ones key padding (the masked path) the same."""
    torch.manual_seed(0)
    q_heads, kv_heads, head_dim, gate_dim, block, seq = 4, 2, 8, 6, 4, 18
    gate = seer.AttnGate(q_heads, kv_heads, head_dim, gate_dim=gate_dim, block_size=block, rope_theta=rope_theta)
    batch, nb = 2, -(-seq // block)
    pooled_q = torch.randn(batch, q_heads, nb, head_dim)
    pooled_k = tuple(torch.randn(batch, kv_heads, nb, head_dim) for _ in range(3))  # (avg, max, min)
    log_probs, valid = gate(pooled_q, pooled_k, seq=seq, causal=causal)

    group, half = q_heads // kv_heads, gate_dim // 2
    expected = torch.full((batch, kv_heads, nb, nb), float("-inf"))
    for b in range(batch):
        for h in range(kv_heads):
            q_features = torch.cat([pooled_q[b, h * group + g] for g in range(group)], dim=-1)  # (NB, G*D)
            k_features = torch.cat([pooled_k[1][b, h], pooled_k[2][b, h], pooled_k[0][b, h]], dim=-1)
            q_gate, k_gate = q_features @ gate.q_weight[h], k_features @ gate.k_weight[h]
            if rope_theta is not None:
                for x in (q_gate, k_gate):
                    for n in range(nb):
                        for i in range(half):
                            angle = n * block * rope_theta ** (-2 * i / gate_dim)
                            a, c = x[n, i].item(), x[n, i + half].item()
                            x[n, i] = a * math.cos(angle) - c * math.sin(angle)
                            x[n, i + half] = c * math.cos(angle) + a * math.sin(angle)
            for m in range(nb):
                seen = [n for n in range(nb) if not causal or n <= m]
                scores = torch.stack([q_gate[m] @ k_gate[n] / math.sqrt(gate_dim) for n in seen])
                expected[b, h, m, seen] = torch.log_softmax(scores, dim=0)
    torch.testing.assert_close(log_probs, expected.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(valid, torch.isfinite(expected))
    padded_log_probs, padded_valid = gate(
        pooled_q, pooled_k, seq=seq, causal=causal, key_padding=torch.ones(batch, seq, dtype=torch.bool)
    )
    torch.testing.assert_close(padded_log_probs, log_probs, atol=1e-6, rtol=1e-6)
    assert torch.equal(padded_valid, valid)


def test_rotary_tables_computed_once_per_position_ids():
    """The rotary tables are reused while the same position_ids tensor comes back unchanged (one forward's layers),
    and recomputed for another tensor, after an in-place change, or for another dtype."""
    calls = []

    class Rotary(torch.nn.Module):
        def forward(self, x, position_ids):
            calls.append(position_ids.clone())
            angles = position_ids[..., None].float() * torch.ones(4)
            return angles.cos().to(x.dtype), angles.sin().to(x.dtype)

    tables = seer._LastRotaryTables(Rotary())
    x, positions = torch.zeros(1, 2, 3, 4), torch.arange(3)[None]
    first = tables(x, positions)
    assert tables(x, positions) is first and len(calls) == 1
    positions.add_(5)  # in place: same object, new values
    assert torch.equal(tables(x, positions)[0], torch.cos(positions[..., None].float() * torch.ones(4)))
    assert len(calls) == 2
    tables(x, torch.arange(3)[None])  # equal values, another tensor
    tables(x.double(), positions)
    assert len(calls) == 4


# --------------------------------------------------------------------------------------------------------------------
# Cached prefixes: chunked prefill on the dense kernel, decode on the shared decode kernels
# --------------------------------------------------------------------------------------------------------------------


def test_chunked_prefill_runs_the_dense_kernel(monkeypatch, caplog):
    """A 40-token prefill gates; a 24-token chunk after it (S_q != S_kv, too long for decode) runs the dense kernel
    and is not counted. At sparsity 0 both chunks are eager's full forward."""
    reference, model = model_pair()
    hf_fastattn.patch(model, "seer", sparsity=0.0, block_size=BLOCK, gate_dim=GATE_DIM)
    spy = Spy(monkeypatch)
    ids, _ = prompt(seq=64)
    cache = DynamicCache(config=model.config)
    first = output(model, ids[:, :40], None, **cache_argument(model, cache), use_cache=True)
    counts = statistics(model)
    second = output(model, ids[:, 40:], None, **cache_argument(model, cache), use_cache=True)
    assert [call["q"].shape[2] for call in spy.sparse] == [40] * LAYERS
    assert [(call["q"].shape[2], call["k"].shape[2]) for call in spy.dense] == [(24, 64)] * LAYERS
    assert spy.decode == [] and spy.fallbacks == 0 and warnings_of(caplog) == []
    assert statistics(model) == counts  # the chunk did not gate
    full = output(reference, ids, None)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, **TOL)


def test_greedy_generate_matches_eager(monkeypatch, caplog):
    """Left-padded batch, DynamicCache: the prefill runs the block-sparse kernel, each single-token step the shared
    decode kernels; at sparsity 0 the tokens and step logits are eager's."""
    reference, model = model_pair()
    hf_fastattn.patch(model, "seer", sparsity=0.0, block_size=BLOCK, gate_dim=GATE_DIM)
    ids, mask = prompt(seq=36, pad=7, seed=3)
    spy = Spy(monkeypatch)
    new = 5
    actual, expected = greedy_generate_pair(model, reference, ids, mask, new_tokens=new, pad_id=PAD_ID)
    assert [call["q"].shape[2] for call in spy.sparse] == [36] * LAYERS
    assert spy.decode == [1] * (LAYERS * (new - 1)) and spy.dense == [] and spy.fallbacks == 0
    assert torch.equal(actual.sequences, expected.sequences)
    assert len(set(actual.sequences[:, 36:].flatten().tolist())) > 1, "degenerate model: the test would prove little"
    torch.testing.assert_close(torch.stack(actual.logits, 1), torch.stack(expected.logits, 1), **TOL)
    assert densities(model) == [1.0] * LAYERS and warnings_of(caplog) == []


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"sparsty": 0.5}, r"unknown fastattn_seer setting\(s\) \['sparsty'\]"),
        ({"sparsity": 0.5, "topk": 2}, r"choose one fastattn_seer selection rule, got \['sparsity', 'topk'\]"),
        ({"topk": 2, "threshold": 1e-3}, r"choose one fastattn_seer selection rule, got \['topk', 'threshold'\]"),
        ({"mode": "exact"}, r"fastattn_seer mode must be one of \('gate', 'oracle'\), got 'exact'"),
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\), got 1.0"),
        ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\), got -0.1"),
        ({"gate_dim": 15}, "gate_dim must be even"),
        ({"allocation": "column"}, r"allocation must be one of \('row', 'head'\), got 'column'"),
        ({"topk": 2, "allocation": "head"}, r"allocation='head' applies to the sparsity rule, not topk"),
    ],
    ids=[
        "unknown",
        "sparsity+topk",
        "topk+threshold",
        "mode",
        "sparsity-1",
        "sparsity-negative",
        "odd-gate-dim",
        "allocation",
        "allocation-topk",
    ],
)
def test_bad_configuration_is_refused_at_patch_time(config, message):
    _, model = model_pair()
    with pytest.raises(ValueError, match=message):
        hf_fastattn.patch(model, "seer", block_size=BLOCK, **config)
    assert model.config._attn_implementation == "sdpa" and hf_fastattn.layer_states(model) == []


def test_bad_per_layer_configuration_is_refused():
    _, model = model_pair()
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 2.0"):
        hf_fastattn.patch(model, "seer", sparsity=0.5, layers={1: ("seer", {"sparsity": 2.0})})
    assert hf_fastattn.layer_states(model) == []


def test_registered_name_without_patch_needs_gates():
    """``attn_implementation="fastattn_seer"`` without ``patch`` has no gates: an error, not dense in disguise."""
    _, model = model_pair(implementation="fastattn_seer")
    with pytest.raises(ValueError, match=r"fastattn_seer needs per-layer gates.*patch\(model, 'seer', gates=\.\.\.\)"):
        output(model, *prompt(seq=20))


# --------------------------------------------------------------------------------------------------------------------
# Gate artifacts
# --------------------------------------------------------------------------------------------------------------------

RULE = {"sparsity": 0.5, "sink_blocks": 0}


@pytest.fixture
def gate_artifact(tmp_path):
    """A model patched with randomly perturbed gates (block 16, gate_dim 16) and its saved artifact."""
    _, model = model_pair()
    hf_fastattn.patch(model, "seer", block_size=BLOCK, gate_dim=GATE_DIM, **RULE)
    randomise_gates(model)
    directory = hf_fastattn.save_state(model, tmp_path / "gates", metadata={"seer_gate_version": 1})
    return model, directory


def test_gates_load_through_patch(gate_artifact):
    model, directory = gate_artifact
    _, other = model_pair(seed=5)  # other base weights: the artifact checks shapes only
    hf_fastattn.patch(other, "seer", gates=str(directory), **RULE)
    expected, loaded = gate_tensors(model), gate_tensors(other)
    assert expected.keys() == loaded.keys() and len(loaded) == 2 * LAYERS
    for name in expected:
        assert torch.equal(loaded[name], expected[name]), name
    for state in hf_fastattn.layer_states(other):
        # block_size and gate_dim come from the artifact (not the 64 / 128 defaults); "gates" is not kept.
        assert state.config == {
            "block_size": BLOCK, "gate_dim": GATE_DIM, "mode": "gate", "local_blocks": 1, "tail_tokens": 32,
            "allocation": "row", **RULE,
        }  # fmt: skip
    # Same gates and base weights: the same selections, the same logits.
    _, same = model_pair()
    hf_fastattn.patch(same, "seer", gates=directory, **RULE)
    ids, mask = prompt(seq=48, pad=9)
    torch.testing.assert_close(output(same, ids, mask), output(model, ids, mask), atol=0, rtol=0)


def test_gates_round_trip_through_load_state(gate_artifact):
    model, directory = gate_artifact
    _, other = model_pair()
    hf_fastattn.load_state(other, directory)
    assert [state.config for state in hf_fastattn.layer_states(other)] == [
        state.config for state in hf_fastattn.layer_states(model)
    ]
    loaded, expected = gate_tensors(other), gate_tensors(model)
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
    ids, mask = prompt(seq=48, pad=9)
    torch.testing.assert_close(output(other, ids, mask), output(model, ids, mask), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("version-2", "gate format version 2; this hf_fastattn reads version 1"),
        ("version-missing", "gate format version None"),
        ("corrupt-tensors", "cannot be read"),
        ("missing-tensors", "is missing: not an hf_fastattn artifact directory"),
        ("no-seer-layers", "holds no SeerAttention gates"),
    ],
)
def test_damaged_or_foreign_artifact_is_refused(gate_artifact, damage, message):
    _, directory = gate_artifact
    if damage == "version-2":
        rewrite_artifact_config(directory, lambda config: config["metadata"].update(seer_gate_version=2))
    elif damage == "version-missing":
        rewrite_artifact_config(directory, lambda config: config["metadata"].clear())
    elif damage == "corrupt-tensors":
        data = (directory / TENSORS_NAME).read_bytes()
        (directory / TENSORS_NAME).write_bytes(data[: len(data) // 2])
    elif damage == "missing-tensors":
        (directory / TENSORS_NAME).unlink()
    else:
        rewrite_artifact_config(directory, lambda config: [layer.update(method="dense") for layer in config["layers"]])
    _, other = model_pair()
    hf_fastattn.patch(other, "dense")
    with pytest.raises(ArtifactError, match=message):
        hf_fastattn.patch(other, "seer", gates=directory)
    # The failed patch left the model as it was.
    assert [state.method for state in hf_fastattn.layer_states(other)] == ["dense"] * LAYERS
    assert other.config._attn_implementation == "fastattn_dense"


@pytest.mark.parametrize(
    ("requested", "message"),
    [
        ({"block_size": 32}, "the gates were trained with block_size=16, but block_size=32 was requested"),
        ({"gate_dim": 32}, "the gates were trained with gate_dim=16, but gate_dim=32 was requested"),
    ],
)
def test_requested_geometry_must_match_the_gates(gate_artifact, requested, message):
    _, directory = gate_artifact
    _, other = model_pair()
    with pytest.raises(ArtifactError, match=message):
        hf_fastattn.patch(other, "seer", gates=directory, **requested)
    assert hf_fastattn.layer_states(other) == [] and other.config._attn_implementation == "sdpa"
    hf_fastattn.patch(other, "seer", gates=directory, block_size=BLOCK, gate_dim=GATE_DIM)  # the same values are fine


def test_gates_of_another_model_shape_are_refused(gate_artifact):
    _, directory = gate_artifact
    config = copy.deepcopy(LLAMA)
    config.num_hidden_layers = 3
    bigger = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with pytest.raises(ArtifactError, match=r"different model: fields \['attention_layers', 'num_hidden_layers'\]"):
        hf_fastattn.patch(bigger, "seer", gates=directory)
    with pytest.raises(ArtifactError, match="different model"):
        hf_fastattn.load_state(bigger, directory)
    assert hf_fastattn.layer_states(bigger) == []


# --------------------------------------------------------------------------------------------------------------------
# Gradients: forward-only kernels, SDPA fallback
# --------------------------------------------------------------------------------------------------------------------


def test_gradients_fall_back_to_sdpa_with_one_warning(monkeypatch, caplog):
    """A call that needs gradients through attention runs SDPA (dense: eager's answer), warning once; without
    gradients the block-sparse kernel runs again, silently."""
    reference, model = model_pair()
    hf_fastattn.patch(model, "seer", sparsity=0.5, block_size=BLOCK, gate_dim=GATE_DIM, tail_tokens=0)
    spy = Spy(monkeypatch)
    ids, mask = prompt(seq=48, pad=9)
    valid = mask.bool()
    for _ in range(2):
        out = model(input_ids=ids, attention_mask=mask).logits
        assert out.requires_grad
        torch.testing.assert_close(out.detach()[valid], output(reference, ids, mask)[valid], **TOL)
    out[valid].sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    [message] = warnings_of(caplog)
    assert "fastattn_seer" in message and "backward pass" in message and "sdpa" in message
    assert spy.fallbacks == 2 * LAYERS and spy.sparse == [] and spy.gate == []
    assert densities(model) == [None] * LAYERS  # SeerAttention never ran
    output(model, ids, mask)
    assert len(warnings_of(caplog)) == 1 and len(spy.sparse) == LAYERS
    assert all(density < 1.0 for density in densities(model))
