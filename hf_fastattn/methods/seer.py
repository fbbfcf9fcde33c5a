"""``fastattn_seer``: SeerAttention, learned block gates choosing which key blocks each query block attends to.

Per layer, an :class:`AttnGate` scores ``(query block, key block)`` pairs from pooled queries and keys (one score map
per KV head, shared by its GQA group). The scores become a block selection on the device (:mod:`hf_fastattn.ops.seer`,
FlexAttention's ``kv_num_blocks`` / ``kv_indices`` layout), and the block-sparse kernel computes only those blocks.

Configuration (``patch(model, "seer", ...)``):

* ``gates``: a gate artifact directory (from :func:`hf_fastattn.train_gates` or ``hf-fastattn train-gates``). Without
  it the gates are freshly initialised (only useful for training them). The artifact's model, block size, gate
  dimension and gate format version are checked.
* ``mode``: ``"gate"`` (default) selects from the gates; ``"oracle"`` selects from the exact block-level attention map
  (the ground-truth kernel runs first: a quality upper bound, not a speed-up).
* one selection rule: ``sparsity`` (fraction of the visible blocks to drop, default 0.5), ``topk`` (blocks kept per
  query block) or ``threshold`` (keep blocks whose gate probability exceeds it, SeerAttention's tau, e.g. 5e-4).
* ``allocation`` for ``sparsity``: ``"row"`` (default) drops the fraction from every query block; ``"head"`` shares one
  budget among all query blocks of a (batch, KV head) and spends it on the most probable blocks of any row, so rows
  with spread-out attention keep more than rows with concentrated attention (the realised density is the same).
  On SmolLM2 ``"head"`` gives the better perplexity and the worse needle retrieval (``benchmarks/results``).
* Per-layer values go through ``patch(..., layers={i: ("seer", {"sparsity": 0.8})})``.
* ``budgets`` for ``sparsity`` (implies ``allocation="head"``): calibrated per-(layer, KV head) budget weights
  (:func:`hf_fastattn.calibrate_seer_budgets` or ``hf-fastattn calibrate seer``, a directory or the object): heads
  whose attention is spread get more blocks and concentrated ones fewer, at the same model-wide density.
* ``sink_blocks`` (default 1) and ``local_blocks`` (default 1, the diagonal): always kept, counted in the budget.
* ``tail_tokens`` (default 32, causal only): the last query rows attend exactly to every key, on the split-KV decode
  kernels. In a causal LM the last row computes the first generated token (later tokens run the exact decode
  kernels anyway). Their work (``tail * S`` keys, in blocks of ``block_size``²) counts in the realised density and,
  with ``allocation="head"``/``budgets``, comes out of the shared budget, so the density stays the requested one. On
  SmolLM2's needle grid at 50% with ``budgets`` it takes the gates from 0.28 to 0.50-0.51 (dense 0.455) for 0.2% of
  perplexity at 80% (``benchmarks/results/seer_smollm2``). A prompt no longer than the tail runs dense. ``0`` turns
  it off; so does ``sparsity=0``, which computes every block anyway.
* ``block_size`` (64) and ``gate_dim`` (128): fixed by trained gates.
* ``decode``: the decode-step strategy every method takes (decode runs the shared exact decode kernels).

Gating runs on prefill calls with no cached prefix (``S_q == S_kv``); chunked-prefill calls run the dense kernel.
RoPE models (Llama) feed the gate pre-RoPE queries and keys: the attention function receives rotated ones, so they are
rotated back with the model's own rotary embedding at the call's ``position_ids``, and the gate applies RoPE at block
positions in its own dimension. Forward only: a call that needs gradients through attention falls back to SDPA.

Each layer counts selected and visible blocks on the device; :func:`seer_statistics` reads the realised density.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..capabilities import Capabilities, MethodSpec
from ..dispatch import dispatch_attention
from ..masks import fastattn_mask
from ..ops.decode import decode_attention, decode_attention_reference
from ..ops.dense import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, dense_attention, dense_attention_reference
from ..ops.seer import (
    ALLOCATIONS,
    DEFAULT_BLOCK_SIZE,
    attention_with_block_target,
    attention_with_block_target_reference,
    block_sparse_attention,
    block_sparse_attention_reference,
    normalise_target,
    pool_blocks,
    pool_blocks_reference,
    select_block_lists,
    select_blocks,
    selection_from_mask,
    selection_mask,
    visible_blocks,
)
from ..state import LayerState

GATE_FORMAT_VERSION = 1
DEFAULT_GATE_DIM = 128
MODES = ("gate", "oracle")
# Keys in LayerState.counters: selected key blocks (a device tensor, no host sync) and visible ones (an int).
_COUNTS = "seer_blocks"
_VISIBLE = "seer_visible_blocks"
# Attribute set by gate training: a callable receiving (log_probs, valid, target) per prefill; the layer then runs
# dense.
GATE_LOSS_SINK = "seer_gate_loss_sink"
# Attribute set by budget calibration: a callable receiving (target, causal) per prefill; the layer then runs dense.
TARGET_SINK = "seer_target_sink"
_SELECTION_RULES = ("sparsity", "topk", "threshold")


class AttnGate(nn.Module):
    """SeerAttention's prefill gate for one layer, one score map per KV head.

    Queries are average-pooled per block; the query heads of a GQA group are concatenated and projected together to
    ``gate_dim``. Keys are pooled per block by max, min and average (concatenated) and projected to ``gate_dim``.
    With ``rope_theta`` the projections are rotated at their block's first position. Scores are
    ``q_g k_g^T / sqrt(gate_dim)`` over visible blocks, log-softmaxed over key blocks.
    """

    def __init__(
        self,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        gate_dim: int = DEFAULT_GATE_DIM,
        block_size: int = DEFAULT_BLOCK_SIZE,
        rope_theta: float | None = None,
    ):
        super().__init__()
        if num_q_heads % num_kv_heads:
            raise ValueError(f"query heads ({num_q_heads}) must be a multiple of key/value heads ({num_kv_heads})")
        if gate_dim % 2:
            raise ValueError(f"gate_dim must be even (RoPE pairs), got {gate_dim}")
        group = num_q_heads // num_kv_heads
        self.num_kv_heads, self.block_size, self.gate_dim, self.rope_theta = (
            num_kv_heads,
            block_size,
            gate_dim,
            rope_theta,
        )
        self.q_weight = nn.Parameter(
            torch.randn(num_kv_heads, group * head_dim, gate_dim) / math.sqrt(group * head_dim)
        )
        self.k_weight = nn.Parameter(torch.randn(num_kv_heads, 3 * head_dim, gate_dim) / math.sqrt(3 * head_dim))

    def forward(
        self, pooled_query: torch.Tensor, pooled_key: tuple, *, seq: int, causal: bool, key_padding=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block scores from pooled pre-RoPE inputs (:func:`~hf_fastattn.ops.seer.pool_blocks`): ``pooled_query``
        ``(B, H_q, NB, D)`` averages, ``pooled_key`` the ``(average, maximum, minimum)`` of ``(B, H_kv, NB, D)`` keys.

        Returns ``(log_probs, valid)``, both ``(B, H_kv, NQ, NK)``: log-probabilities over key blocks, and which blocks
        a row may select (visible, and holding at least one unpadded key).
        """
        k_avg, k_max, k_min = pooled_key
        batch, _, num_blocks, head_dim = pooled_query.shape
        dtype = self.q_weight.dtype
        q_group = pooled_query.view(batch, self.num_kv_heads, -1, num_blocks, head_dim).transpose(2, 3).flatten(3)
        q_gate = torch.einsum("bhnc,hcg->bhng", q_group.to(dtype), self.q_weight)
        k_features = torch.cat([k_max, k_min, k_avg], dim=-1).to(dtype)
        k_gate = torch.einsum("bhnc,hcg->bhng", k_features, self.k_weight)
        if self.rope_theta is not None:
            cos, signed_sin = _block_rope(num_blocks, self.block_size, self.gate_dim, self.rope_theta, q_gate.device)
            q_gate, k_gate = (
                torch.addcmul(t * cos, t.roll(self.gate_dim // 2, -1), signed_sin) for t in (q_gate, k_gate)
            )
        scale = 1.0 / math.sqrt(self.gate_dim)
        if key_padding is None:
            # Every row sees its own block (S_q == S_kv), so no row is empty: one fused product, scale and mask.
            valid, bias = _visible_bias(seq, causal, self.block_size, str(q_gate.device))
            scores = torch.baddbmm(
                bias.to(q_gate.dtype), q_gate.flatten(0, 1), k_gate.flatten(0, 1).transpose(-1, -2), alpha=scale
            ).view(batch, self.num_kv_heads, num_blocks, num_blocks)
            return torch.log_softmax(scores.float(), dim=-1), valid.expand_as(scores)
        scores = q_gate @ k_gate.transpose(-1, -2) * scale
        visible, _ = visible_blocks(seq, seq, causal=causal, block_size=self.block_size, device=q_gate.device)
        padded = F.pad(key_padding.bool(), (0, num_blocks * self.block_size - seq))
        valid = visible & padded.view(batch, 1, num_blocks, self.block_size).any(-1)[:, :, None, :]
        valid = valid.expand_as(scores)
        # A row with nothing valid (a fully padded query block) gets a harmless uniform row; it carries no target.
        scores = scores.float().masked_fill(~valid, float("-inf")).masked_fill(~valid.any(-1, keepdim=True), 0.0)
        return torch.log_softmax(scores, dim=-1), valid


@functools.lru_cache(maxsize=32)
def _block_rope(num_blocks: int, block_size: int, dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (rotate-half convention, as Llama) at each block's first position, fp32 ``(NB, dim)`` ``(cos, sin')``
    with ``sin'`` = ``[-sin, sin]`` over the two halves, so that ``x * cos + x.roll(dim / 2) * sin'`` rotates ``x``.
    Cached per geometry (read-only)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    angles = (torch.arange(num_blocks, device=device) * block_size).float()[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.cos()], dim=-1), torch.cat([-angles.sin(), angles.sin()], dim=-1)


@functools.lru_cache(maxsize=64)
def _visible_bias(seq: int, causal: bool, block_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(visible, bias)`` for an unpadded sequence: the visible blocks and an fp32 additive mask (0 / -inf)."""
    visible, _ = visible_blocks(seq, seq, causal=causal, block_size=block_size, device=device)
    return visible, torch.zeros(visible.shape, device=device).masked_fill(~visible, float("-inf"))


# ---------------------------------------------------------------------------------------------------------------------
# The attention function
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ops:
    """The kernels, or their PyTorch references on a device Triton cannot use."""

    sparse: Callable
    sparse_takes_mask: bool  # the reference takes a bool block mask, the kernel the compact selection
    target: Callable
    dense: Callable
    pool: Callable
    select: Callable
    tail: Callable  # the last rows against the whole sequence: split over the keys, like decode

    def run_sparse(self, query, key, value, selection, *, causal, scale, key_padding):
        if self.sparse_takes_mask:
            return self.sparse(
                query, key, value, selection_mask(selection), causal=causal, scale=scale, key_padding=key_padding,
                block_size=selection.block_size,
            )  # fmt: skip
        return self.sparse(query, key, value, selection, causal=causal, scale=scale, key_padding=key_padding)


def _select_reference(scores, *, seq_q, seq_k, causal, block_size, **rule):
    block_mask = select_blocks(scores, seq_q=seq_q, seq_k=seq_k, causal=causal, block_size=block_size, **rule)
    return selection_from_mask(block_mask, seq_q=seq_q, seq_k=seq_k, causal=causal, block_size=block_size)


_KERNELS = _Ops(
    block_sparse_attention, False, attention_with_block_target, dense_attention, pool_blocks, select_block_lists,
    decode_attention,
)  # fmt: skip
_REFERENCES = _Ops(
    block_sparse_attention_reference, True, attention_with_block_target_reference, dense_attention_reference,
    pool_blocks_reference, _select_reference, decode_attention_reference,
)  # fmt: skip


def _run(ops: _Ops, query, key, value, *, causal, scale, key_padding, state, position_ids=None):
    if state is None or getattr(state, "gate", None) is None:
        raise ValueError("fastattn_seer needs per-layer gates: use hf_fastattn.patch(model, 'seer', gates=...)")
    config = state.config
    block = config["block_size"]
    if query.shape[2] != key.shape[2]:  # a cached prefix (chunked prefill): the gates score whole sequences only
        return ops.dense(query, key, value, causal=causal, scale=scale, key_padding=key_padding)
    sink = getattr(state, GATE_LOSS_SINK, None)
    target_sink = getattr(state, TARGET_SINK, None)
    seq = query.shape[2]
    # sparsity=0 keeps every block already: an exact tail would only compute its rows twice.
    tail = min(config["tail_tokens"], seq) if causal and config.get("sparsity") != 0 else 0
    if tail == seq and sink is None and target_sink is None:  # a prompt within the exact tail: nothing to gate
        blocks = math.ceil(seq / block)
        visible = _visible_total(blocks, blocks, causal) * key.shape[0] * key.shape[1]
        _count(state, visible, visible)
        return ops.dense(query, key, value, causal=causal, scale=scale, key_padding=key_padding)
    threshold = config.get("threshold")
    if sink is not None or target_sink is not None or config["mode"] == "oracle":
        out, target = ops.target(
            query, key, value, causal=causal, scale=scale, key_padding=key_padding, block_size=block
        )
        target = normalise_target(target, key.shape[1])
        if target_sink is not None:
            target_sink(target, causal)
            return out
        if sink is not None:
            log_probs, valid = _gate_scores(ops, state, query, key, causal, key_padding, position_ids)
            sink(log_probs, valid, target)
            return out
        scores = target
    else:
        with torch.no_grad():
            scores, _ = _gate_scores(ops, state, query, key, causal, key_padding, position_ids)
        # Log-probabilities rank like probabilities; the threshold moves to log units with them.
        threshold = None if threshold is None else math.log(threshold) if threshold > 0 else -math.inf
    rule = {name: config[name] for name in ("sparsity", "topk") if config.get(name) is not None}
    if threshold is not None:
        rule["threshold"] = threshold
    head_weights = state.__dict__.get("_head_weights")
    if head_weights is not None:
        rule["head_weights"] = head_weights
    tail_work = _tail_work(seq, tail, block)
    if config["allocation"] == "head":
        rule["reserved_blocks"] = math.ceil(tail_work)
    selection = ops.select(
        scores, seq_q=seq, seq_k=seq, causal=causal, block_size=block,
        sink_blocks=config["sink_blocks"], local_blocks=config["local_blocks"], allocation=config["allocation"],
        **rule,
    )  # fmt: skip
    batch, heads, nq, nk = selection.shape
    computed = selection.selected_blocks().sum(dtype=torch.float64) + tail_work * batch * heads
    _count(state, computed, _visible_total(nq, nk, causal) * batch * heads)
    out = ops.run_sparse(query, key, value, selection, causal=causal, scale=scale, key_padding=key_padding)
    if tail:
        # The last rows, exact: they compute the first generated token (later tokens run the exact decode kernels).
        out[:, :, -tail:] = ops.tail(query[:, :, -tail:], key, value, scale=scale, key_padding=key_padding)
    return out


def _tail_work(seq: int, tail: int, block_size: int) -> float:
    """The exact tail's work in blocks of ``block_size``²: its rows see ``seq - tail + 1`` to ``seq`` keys (causal)."""
    keys = tail * seq - tail * (tail - 1) // 2
    return keys / block_size**2


def gate_log_probs(
    gate: AttnGate,
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    causal: bool,
    key_padding: torch.Tensor | None = None,
    rotary: nn.Module | None = None,
    position_ids: torch.Tensor | None = None,
    pool: Callable = pool_blocks,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's gate on the tensors its attention function receives: pool the queries and keys (undoing RoPE with
    the model's ``rotary`` embedding while pooling), then score. Returns ``AttnGate.forward``'s ``(log_probs, valid)``.
    ``pool`` is :func:`~hf_fastattn.ops.seer.pool_blocks` (the Triton kernel) or its reference."""
    cos = sin = None
    if rotary is not None:
        if position_ids is None:
            position_ids = torch.arange(query.shape[2], device=query.device)[None]
        cos, sin = rotary(query, position_ids)
    pooled_query = pool(query, gate.block_size, valid=key_padding, cos=cos, sin=sin)[0]
    pooled_key = pool(key, gate.block_size, valid=key_padding, cos=cos, sin=sin, extremes=True)
    return gate(pooled_query, pooled_key, seq=query.shape[2], causal=causal, key_padding=key_padding)


def _gate_scores(ops: _Ops, state, query, key, causal, key_padding, position_ids):
    return gate_log_probs(
        state.gate, query, key, causal=causal, key_padding=key_padding, rotary=state.__dict__.get("_rotary"),
        position_ids=position_ids, pool=ops.pool,
    )  # fmt: skip


def _count(state: LayerState, computed, visible: int) -> None:
    """Accumulate computed key blocks (selected ones plus the exact tail's work; a device tensor, so no host sync) and
    visible ones (an int from the geometry), summed over batch and mask heads."""
    previous = state.counters.get(_COUNTS)
    state.counters[_COUNTS] = computed if previous is None else previous + computed
    state.counters[_VISIBLE] = state.counters.get(_VISIBLE, 0) + visible


@functools.lru_cache(maxsize=256)
def _visible_total(num_query_blocks: int, num_key_blocks: int, causal: bool) -> int:
    # Gated calls have S_q == S_kv, so block counts stand in for lengths at block size 1.
    visible, _ = visible_blocks(num_query_blocks, num_key_blocks, causal=causal, block_size=1)
    return int(visible.sum())


def _kernel(query, key, value, **kwargs):
    return _run(_KERNELS, query, key, value, **kwargs)


def _reference(query, key, value, **kwargs):
    return _run(_REFERENCES, query, key, value, **kwargs)


def seer_statistics(state: LayerState) -> dict:
    """Realised density of one layer (selected / visible key blocks over every gated prefill since patching or
    ``state.reset_statistics()``); None before the layer's first gated prefill."""
    counts = state.counters.get(_COUNTS)
    if counts is None:
        return {"density": None}
    computed, visible = float(counts), state.counters[_VISIBLE]
    return {"density": computed / max(visible, 1), "blocks": {"computed": computed, "visible": visible}}


# ---------------------------------------------------------------------------------------------------------------------
# Patch-time preparation: configuration, gates, artifacts
# ---------------------------------------------------------------------------------------------------------------------

_DEFAULTS = {"mode": "gate", "block_size": DEFAULT_BLOCK_SIZE, "gate_dim": DEFAULT_GATE_DIM, "sink_blocks": 1,
             "local_blocks": 1, "tail_tokens": 32, "allocation": "row"}  # fmt: skip
_USER_KEYS = {"gates", "budgets", *_DEFAULTS, *_SELECTION_RULES}


def _prepare(model, states: list[LayerState]) -> None:
    for state in states:
        _check_config(state.config)
    sources = {str(state.config["gates"]) for state in states if state.config.get("gates") is not None}
    artifacts = {source: _read_gates(model, Path(source)) for source in sources}
    budgets = {}
    for state in states:
        source = state.config.get("budgets")
        if source is not None and id(source) not in budgets:
            budgets[id(source)] = _read_budgets(source)
    rope_theta, rotary = _rope(model)
    if rotary is not None:
        rotary = _LastRotaryTables(rotary)
    device = next(model.parameters()).device
    for state in states:
        config = state.config
        source = config.pop("gates", None)
        if source is not None:
            _apply_artifact_settings(config, artifacts[str(source)], state.layer_index)
        if config.get("budgets") is not None:
            config.setdefault("allocation", "head")
        for name, value in _DEFAULTS.items():
            config.setdefault(name, value)
        if not any(config.get(rule) is not None for rule in _SELECTION_RULES):
            config["sparsity"] = 0.5
        if config.get("budgets") is not None:
            _apply_budgets(model, state, budgets[id(config["budgets"])])
        module_config = model.config
        heads = module_config.num_attention_heads
        kv_heads = getattr(module_config, "num_key_value_heads", None) or heads
        head_dim = getattr(module_config, "head_dim", None) or module_config.hidden_size // heads
        state.gate = AttnGate(
            heads, kv_heads, head_dim, gate_dim=config["gate_dim"], block_size=config["block_size"],
            rope_theta=rope_theta,
        ).to(device)  # fmt: skip
        if rotary is not None:
            state.__dict__["_rotary"] = rotary  # a plain attribute: not a submodule, never saved
        if source is not None:
            _load_gate(state, artifacts[str(source)], source)


class _LastRotaryTables:
    """The model's rotary embedding, remembering its last ``(cos, sin)``: every layer of one forward passes the same
    ``position_ids`` tensor, so the tables are computed once per forward instead of once per layer."""

    def __init__(self, rotary: nn.Module):
        self.rotary = rotary
        self._last_key = None
        self._last_tables = None

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (position_ids._version, x.dtype, x.device, torch.is_grad_enabled())
        last = self._last_key
        if last is not None and last[0]() is position_ids and last[1:] == key:
            return self._last_tables
        self._last_tables = self.rotary(x, position_ids)
        self._last_key = (weakref.ref(position_ids), *key)
        return self._last_tables


def _check_config(config: dict) -> None:
    unknown = sorted(set(config) - _USER_KEYS)
    if unknown:
        raise ValueError(f"unknown fastattn_seer setting(s) {unknown}; valid: {sorted(_USER_KEYS)}")
    mode = config.get("mode", "gate")
    if mode not in MODES:
        raise ValueError(f"fastattn_seer mode must be one of {MODES}, got {mode!r}")
    rules = [rule for rule in _SELECTION_RULES if config.get(rule) is not None]
    if len(rules) > 1:
        raise ValueError(f"choose one fastattn_seer selection rule, got {rules}")
    sparsity = config.get("sparsity")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    for name in ("sink_blocks", "local_blocks", "tail_tokens"):
        value = config.get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"fastattn_seer {name} must be an integer >= 0, got {value!r}")
    allocation = config.get("allocation", "row")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"fastattn_seer allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if allocation != "row" and rules not in ([], ["sparsity"]):
        raise ValueError(f"allocation={allocation!r} applies to the sparsity rule, not {rules[0]}")
    if config.get("budgets") is not None:
        if rules not in ([], ["sparsity"]):
            raise ValueError(f"budgets apply to the sparsity rule, not {rules[0]}")
        if config.get("allocation", "head") != "head":
            raise ValueError("budgets share blocks between heads: they need allocation='head' (the default with them)")


def _rope(model) -> tuple[float | None, nn.Module | None]:
    """``(rope_theta, rotary embedding module)`` for a RoPE model (its rotary module found by name), else None twice.

    The module maps ``(x, position_ids)`` to the ``(cos, sin)`` the model rotated queries and keys with.
    """
    rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    if rotary is None:
        return None, None
    parameters = getattr(model.config, "rope_parameters", None) or {}
    theta = parameters.get("rope_theta", getattr(model.config, "rope_theta", 10000.0))
    return float(theta), rotary


def _read_gates(model, directory: Path) -> dict:
    from ..artifacts import ArtifactError, check_fingerprint, read_artifact  # artifacts imports patch -> registry

    config, tensors = read_artifact(directory)
    check_fingerprint(model, config, directory)
    version = config.get("metadata", {}).get("seer_gate_version")
    if version != GATE_FORMAT_VERSION:
        raise ArtifactError(
            f"{directory} holds gate format version {version!r}; this hf_fastattn reads version {GATE_FORMAT_VERSION}"
        )
    layers = {entry["index"]: entry["config"] for entry in config["layers"] if entry["method"] == "seer"}
    if not layers:
        raise ArtifactError(f"artifact {directory} holds no SeerAttention gates")
    return {"layers": layers, "tensors": tensors}


def _read_budgets(source):
    from ..calibration.seer_budgets import SeerBudgets

    return source if isinstance(source, SeerBudgets) else SeerBudgets.load(Path(source))


def _apply_budgets(model, state: LayerState, budgets) -> None:
    """Install the layer's calibrated head weights for its sparsity; the config keeps where they came from."""
    config = state.config
    source = config["budgets"]
    where = "calibration (in memory)" if budgets is source else str(source)
    budgets.check(model, block_size=config["block_size"], sink_blocks=config["sink_blocks"],
                  local_blocks=config["local_blocks"], source=where)  # fmt: skip
    state.__dict__["_head_weights"] = budgets.head_weights(state.layer_index, config["sparsity"])
    config["budgets"] = where


def _apply_artifact_settings(config: dict, artifact: dict, index: int) -> None:
    from ..artifacts import ArtifactError

    saved = artifact["layers"].get(index)
    if saved is None:
        raise ArtifactError(f"the gate artifact has no gate for attention layer {index}")
    for name in ("block_size", "gate_dim"):
        if config.get(name, saved[name]) != saved[name]:
            raise ArtifactError(
                f"the gates were trained with {name}={saved[name]}, but {name}={config[name]} was requested"
            )
        config[name] = saved[name]


def _load_gate(state: LayerState, artifact: dict, source) -> None:
    from ..artifacts import ArtifactError

    for name, parameter in state.gate.named_parameters():
        key = f"layers.{state.layer_index}.gate.{name}"
        tensor = artifact["tensors"].get(key)
        if tensor is None or tensor.shape != parameter.shape:
            found = None if tensor is None else tuple(tensor.shape)
            raise ArtifactError(f"{source}: {key} is {found}, the model's gate expects {tuple(parameter.shape)}")
        with torch.no_grad():
            parameter.copy_(tensor)


SPEC = MethodSpec(
    name="seer",
    description="SeerAttention: learned block gates select key blocks; a block-sparse kernel computes only those.",
    kernel=_kernel,
    reference=_reference,
    capabilities=Capabilities(head_dims=SUPPORTED_HEAD_DIMS, dtypes=SUPPORTED_DTYPES, backward=False),
    prepare=_prepare,
    statistics=seer_statistics,
    uses_positions=True,
    # Fresh gates, but sparsity 0 keeps every visible block (16-token blocks: two for the 19-token inputs): exact.
    selftest_config={"sparsity": 0.0, "block_size": 16},
)

mask_builder = fastattn_mask


def seer_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for ``attn_implementation="fastattn_seer"``."""
    return dispatch_attention(SPEC, module, query, key, value, attention_mask, scaling, dropout, **kwargs)
