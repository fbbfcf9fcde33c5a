"""The ``hf-fastattn`` command line.

``hf-fastattn info``        versions, device, registered methods and their capabilities.
``hf-fastattn selftest``    tiny random models with each method vs transformers' eager attention.
``hf-fastattn quickstart``  a real model, dense vs a method: perplexity, needle grid, heatmaps, summary table.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys


def info() -> int:
    from importlib import metadata

    import torch

    import hf_fastattn
    from hf_fastattn.ops._runtime import interpreter_enabled

    print(f"hf_fastattn   {hf_fastattn.__version__}")
    print(f"python        {platform.python_version()}")
    for dist in ("torch", "triton", "transformers", "accelerate", "datasets", "safetensors"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{dist:<13} {version}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"device        cuda: {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB")
        print("kernel path   Triton (compiled)")
    else:
        path = "Triton interpreter (TRITON_INTERPRET=1)" if interpreter_enabled() else "PyTorch reference (chunked)"
        print(f"device        cpu\nkernel path   {path}")
    print("\nregistered methods:")
    for spec in hf_fastattn.list_methods():
        print(f"  {spec.registered_name}: {spec.description} (fallback: {spec.fallback})")
        for name, value in spec.capabilities.describe().items():
            print(f"      {name:<14} {value}")
    return 0


def _tiny_models():
    """Tiny random models: a GQA causal LM and a bidirectional encoder, with inputs that include padding."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig

    generator = torch.Generator().manual_seed(0)
    llama = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    bert = BertConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    ids = torch.randint(0, 128, (2, 19), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second row
    return [("llama", AutoModelForCausalLM, llama, ids, mask), ("bert", AutoModel, bert, ids, mask.flip(-1))]


def selftest(tolerance: float = 1e-4) -> int:
    """Compare each method with eager on the current path; on a CPU-only machine also on the interpreted kernels."""
    import torch

    import hf_fastattn
    from hf_fastattn.ops._runtime import interpreter_enabled

    on_cpu_reference = not torch.cuda.is_available() and not interpreter_enabled()
    kernels = "Triton kernels (interpreted)" if interpreter_enabled() else "Triton kernels"
    print("path: " + ("PyTorch reference (CPU)" if on_cpu_reference else kernels))
    failures = 0
    for spec in hf_fastattn.list_methods():
        for arch, auto_class, config, ids, mask in _tiny_models():
            torch.manual_seed(0)
            reference = auto_class.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
            patched = auto_class.from_config(copy.deepcopy(config), attn_implementation=spec.registered_name).eval()
            patched.load_state_dict(reference.state_dict())
            assert patched.config._attn_implementation == spec.registered_name
            assert reference.config._attn_implementation == "eager"
            with torch.no_grad():
                expected = reference(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
                actual = patched(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            valid = mask.bool()
            error = (expected - actual)[valid].abs().max().item()
            ok = error <= tolerance
            failures += not ok
            print(
                f"{spec.registered_name:<16} {arch:<6} max |fastattn - eager| = {error:.2e}  {'ok' if ok else 'FAIL'}"
            )
    if on_cpu_reference:
        # Triton decides compiled vs interpreted when kernels are defined, so the interpreted run is a new process.
        sys.stdout.flush()
        command = [sys.executable, "-m", "hf_fastattn.cli", "selftest", "--tolerance", str(tolerance)]
        failures += subprocess.run(command, env={**os.environ, "TRITON_INTERPRET": "1"}, check=False).returncode != 0
    print("selftest passed" if not failures else f"selftest FAILED ({failures} case(s))")
    return 1 if failures else 0


def quickstart(args: argparse.Namespace) -> int:
    """Dense vs ``--method`` on a real offline model; user errors end with a one-line message, not a traceback."""
    import torch

    import hf_fastattn  # noqa: F401  (registers the methods)
    from hf_fastattn.assets import AssetUnavailable
    from hf_fastattn.assets.data import load_text
    from hf_fastattn.assets.models import load_model
    from hf_fastattn.evaluation.quickstart import run_quickstart

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        text = load_text(args.text, "eval") if args.text_file is None else _read_text_file(args.text_file)
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
        result = run_quickstart(
            model, tokenizer, method=args.method, eval_text=text, output_dir=args.out,
            context_lengths=args.context_lengths, depth_percents=args.depths, needles_per_cell=args.needles,
            perplexity_context=args.ppl_context, perplexity_tokens=args.ppl_tokens, seed=args.seed,
        )  # fmt: skip
    except (AssetUnavailable, KeyError, ValueError, OSError) as error:
        print(f"hf-fastattn quickstart: {error}", file=sys.stderr)
        return 2
    print(result["summary"])
    print(f"\nresults, heatmaps and summary written to {args.out}")
    return 0


def _read_text_file(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-fastattn", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device, registered methods and capabilities")
    check = commands.add_parser("selftest", help="tiny random models: each method vs eager attention")
    check.add_argument("--tolerance", type=float, default=1e-4, help="max abs error on fp32 hidden states")
    demo = commands.add_parser("quickstart", help="dense vs a method on a real model: perplexity, needles, heatmaps")
    demo.add_argument("--model", default="smollm2", help="asset name (smollm2), local folder or hub id")
    demo.add_argument("--method", default="dense", help="hf_fastattn method to compare with dense attention")
    demo.add_argument("--text", default="essays", help="held-out text asset (essays or austen)")
    demo.add_argument("--text-file", help="a local UTF-8 text file instead of --text")
    demo.add_argument("--out", default="quickstart_results", help="output folder (created)")
    demo.add_argument("--context-lengths", type=int, nargs="+", default=[256, 512])
    demo.add_argument("--depths", type=float, nargs="+", default=[0, 50, 100], help="needle depths in percent")
    demo.add_argument("--needles", type=int, default=1, help="needles per grid cell")
    demo.add_argument("--ppl-context", type=int, default=512, help="perplexity window length")
    demo.add_argument("--ppl-tokens", type=int, default=2048, help="tokens of text scored for perplexity")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", help="default: cuda if available, else cpu")
    demo.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "quickstart":
        return quickstart(args)
    return selftest(args.tolerance)


if __name__ == "__main__":
    sys.exit(main())
