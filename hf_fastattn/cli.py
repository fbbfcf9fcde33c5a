"""The ``hf-fastattn`` command line.

``hf-fastattn info``        versions, device, registered methods and their capabilities.
``hf-fastattn selftest``    tiny random models with each method vs transformers' eager attention.
``hf-fastattn eval TASK``   several methods on one task (niah, passkey, ruler, ppl, encoder): one table, JSON, plots.
``hf-fastattn calibrate bsfa``  BSFA thresholds for a model, saved as an artifact.
``hf-fastattn calibrate seer``  SeerAttention budget weights per (layer, KV head), saved as an artifact.
``hf-fastattn train-gates``     SeerAttention gates for a model (``Trainer``; runs under ``accelerate launch``).
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


def _last_hidden(model, ids, mask):
    return model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]


def _cached_step_hidden(model, ids, mask):
    """Hidden states of the last two tokens, fed as one step after a cached prefill of the others."""
    from hf_fastattn._compat import cache_argument, output_cache

    prefill = model(ids[:, :-2], attention_mask=mask[:, :-2], use_cache=True)
    step = model(
        ids[:, -2:], attention_mask=mask, output_hidden_states=True, **cache_argument(model, output_cache(prefill))
    )
    return step.hidden_states[-1]


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
            if spec.selftest_config:  # e.g. BSFA: thresholds that keep every tile, tiles small enough to run it
                hf_fastattn.patch(patched, spec.name, **spec.selftest_config)
            assert patched.config._attn_implementation == spec.registered_name
            assert reference.config._attn_implementation == "eager"
            checks = {"forward": (_last_hidden, mask.bool())}
            if arch == "llama":  # causal: also two cached decode steps, which run the shared decode kernels
                checks["decode"] = (_cached_step_hidden, mask[:, -2:].bool())
            for check, (run, valid) in checks.items():
                with torch.no_grad():
                    error = (run(reference, ids, mask) - run(patched, ids, mask))[valid].abs().max().item()
                ok = error <= tolerance
                failures += not ok
                print(
                    f"{spec.registered_name:<16} {arch:<6} {check:<8} max |fastattn - eager| = {error:.2e}  "
                    f"{'ok' if ok else 'FAIL'}"
                )
    if on_cpu_reference:
        # Triton decides compiled vs interpreted when kernels are defined, so the interpreted run is a new process.
        sys.stdout.flush()
        command = [sys.executable, "-m", "hf_fastattn.cli", "selftest", "--tolerance", str(tolerance)]
        failures += subprocess.run(command, env={**os.environ, "TRITON_INTERPRET": "1"}, check=False).returncode != 0
    print("selftest passed" if not failures else f"selftest FAILED ({failures} case(s))")
    return 1 if failures else 0


def evaluate(args: argparse.Namespace) -> int:
    """``hf-fastattn eval <task>``; bad input ends with a one-line message and exit code 2, not a traceback."""
    from accelerate import PartialState

    from hf_fastattn.assets import AssetUnavailable
    from hf_fastattn.evaluation.suite import DEFAULTS, run_eval

    options = {name: getattr(args, name) for name in DEFAULTS[args.task]["cpu"] if name != "model"}
    try:
        result = run_eval(
            args.task,
            model=args.model,
            methods=args.methods,
            output_dir=args.out,
            text=getattr(args, "text", "essays"),
            text_file=getattr(args, "text_file", None),
            seed=args.seed,
            device=args.device,
            dtype=args.dtype,
            method_config=_method_config(args.config),
            **options,
        )
    except (AssetUnavailable, ValueError, OSError, ImportError) as error:
        return _user_error(f"eval {args.task}", error)
    if PartialState().is_main_process:  # under `accelerate launch`, the process that wrote the files
        print(result["summary"])
        print(f"\nresults, summary and plots written to {result['output_dir']}")
    return 0


def calibrate(args: argparse.Namespace) -> int:
    """``hf-fastattn calibrate bsfa|seer``: a method's calibrated state, written as an artifact."""
    from hf_fastattn import ArtifactError
    from hf_fastattn._io import check_writable
    from hf_fastattn.assets import AssetUnavailable
    from hf_fastattn.assets.models import load_model, resolve_device, resolve_dtype
    from hf_fastattn.calibration import calibrate_bsfa, calibrate_seer_budgets

    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        check_writable(args.out)
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
        if args.method == "seer":
            budgets = calibrate_seer_budgets(
                model, args.data, tokenizer=tokenizer, samples=args.samples, sequence_length=args.seq_len,
                sparsities=args.sparsities, block_size=args.block_size, sink_blocks=args.sink_blocks,
                local_blocks=args.local_blocks, output_dir=args.out,
            )  # fmt: skip
        else:
            calibration = calibrate_bsfa(
                model, args.data, tokenizer=tokenizer, k=args.k, samples=args.samples, sequence_length=args.seq_len,
                target_skip=args.target_skip, aggregate=args.aggregate, block_m=args.block_m, block_n=args.block_n,
                output_dir=args.out,
            )  # fmt: skip
    except (AssetUnavailable, ArtifactError, ValueError, TypeError, OSError) as error:
        return _user_error(f"calibrate {args.method}", error)
    if args.method == "seer":
        return _report_seer_budgets(budgets, args.out)
    details = calibration.details
    print(f"calibrated {details['samples']} x {details['sequence_length']} tokens of {details['data']} "
          f"in {details['seconds']:.1f} s; tiles {calibration.block_m}x{calibration.block_n}")  # fmt: skip
    for k, fraction in zip(calibration.k_values, _mean_skip(calibration)):
        print(f"  k={k:<4} skips {fraction:6.1%} of skippable tiles on the calibration windows")
    print(f"default k per layer: {sorted(set(calibration.layer_k.values()))}; artifact written to {args.out}")
    return 0


def _report_seer_budgets(budgets, out) -> int:
    import torch

    details = budgets.details
    print(f"calibrated {details['samples']} x {details['sequence_length']} tokens of {details['data']} "
          f"in {details['seconds']:.1f} s; blocks of {budgets.block_size}")  # fmt: skip
    table = torch.stack([budgets.weights[index] for index in sorted(budgets.weights)], dim=1)  # (grid, layers, heads)
    for sparsity, weights in zip(budgets.sparsities, table):
        print(f"  sparsity {sparsity:.2f}: head weights {weights.min():.2f}-{weights.max():.2f} (mean 1)")
    print(f"artifact written to {out}; use it as patch(model, 'seer', budgets=DIR) or --config seer.budgets=DIR")
    return 0


def train_gates(args: argparse.Namespace) -> int:
    """``hf-fastattn train-gates``: SeerAttention gates, from a config file and/or flags, saved as an artifact."""
    import dataclasses

    from accelerate import PartialState

    from hf_fastattn import ArtifactError
    from hf_fastattn.assets import AssetUnavailable
    from hf_fastattn.training import GateTrainingConfig
    from hf_fastattn.training import train_gates as run_training

    overrides = {field.name: getattr(args, field.name, None) for field in dataclasses.fields(GateTrainingConfig)}
    try:
        if args.config:
            config = GateTrainingConfig.from_file(args.config, **overrides)
        else:
            config = GateTrainingConfig(**{name: value for name, value in overrides.items() if value is not None})
        gates = run_training(config=config)
    except (AssetUnavailable, ArtifactError, ValueError, TypeError, OSError) as error:
        return _user_error("train-gates", error)
    if PartialState().is_main_process:  # under `accelerate launch`, the process that wrote the gates
        print(f"gates written to {gates}; use patch(model, 'seer', gates='{gates}') or --config seer.gates={gates}")
    return 0


def _add_train_gates_parser(commands) -> None:
    parser = commands.add_parser(
        "train-gates",
        help="train SeerAttention gates (frozen model, KL to the exact block attention map)",
        description="Train SeerAttention gates with transformers' Trainer on the training split (never the "
        "evaluation text). Settings come from --config (JSON or YAML, see recipes/configs/) and flags, flags "
        "winning. Runs unchanged under `accelerate launch`; the effective batch is --global-batch-size whatever "
        "the number of processes.",
    )
    parser.add_argument("--config", help="JSON or YAML file of GateTrainingConfig settings")
    parser.add_argument("--model", help="asset name, local folder or hub id (default: smollm2)")
    parser.add_argument("--data", help="default (Austen train + Python docs), austen or pydocs")
    parser.add_argument("--sequence-length", type=int, help="tokens per training window (default: 8192)")
    parser.add_argument("--samples", type=int, help="training windows (default: 192)")
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    parser.add_argument("--global-batch-size", type=int, help="windows per optimizer step over all processes")
    parser.add_argument("--per-device-batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--block-size", type=int, help="gate block size (default: 64)")
    parser.add_argument("--gate-dim", type=int, help="gate projection size (default: 128)")
    parser.add_argument("--save-steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--output-dir", "--out", dest="output_dir", metavar="DIR",
                        help="checkpoints, and the gate artifact in DIR/gates")  # fmt: skip
    parser.add_argument("--no-resume", dest="resume", action="store_const", const=False,
                        help="start afresh even if DIR holds checkpoints")  # fmt: skip
    parser.add_argument("--device", help="default: the process's accelerate device")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")


def _mean_skip(calibration) -> list[float]:
    per_layer = list(calibration.skip_fraction.values())
    return [sum(values) / len(per_layer) for values in zip(*per_layer)]


def _user_error(command: str, error: BaseException) -> int:
    message = " ".join(str(error).split())  # one line, whatever the library wrote
    print(f"hf-fastattn {command}: {message}", file=sys.stderr)
    return 2


def _method_config(items: list[str] | None) -> dict[str, dict]:
    """``["bsfa.thresholds=DIR", "bsfa.k=16"]`` -> ``{"bsfa": {"thresholds": "DIR", "k": 16}}``."""
    from hf_fastattn.evaluation.suite import split_label

    config: dict[str, dict] = {}
    for item in items or []:
        method, dot, setting = item.partition(".")
        if not dot or "=" not in setting:
            raise ValueError(f"--config takes METHOD.KEY=VALUE, got {item!r}")
        config.setdefault(method, {}).update(split_label(f"{method}:{setting}")[1])
    return config


def _add_calibrate_parser(commands) -> None:
    calibration = commands.add_parser(
        "calibrate", help="calibrate a method's per-layer state (BSFA thresholds, Seer budgets)"
    )
    methods = calibration.add_subparsers(dest="method", required=True, metavar="{bsfa,seer}")
    bsfa = methods.add_parser(
        "bsfa",
        help="BSFA thresholds per (layer, head, query tile) from tile maxima on training text",
        description="Calibrate BSFA thresholds on the training split (never the evaluation text) and save an "
        "artifact for patch(model, 'bsfa', thresholds=DIR) or --config bsfa.thresholds=DIR.",
    )
    bsfa.add_argument("--model", default="smollm2", help="asset name, local folder or hub id (default: smollm2)")
    bsfa.add_argument("--data", default="default", help="default (Austen train + Python docs), austen or pydocs")
    bsfa.add_argument("--k", type=int, nargs="+", help="kept skippable tiles per query tile (default: 4 8 16 32 64)")
    bsfa.add_argument("--target-skip", type=float, help="pick k per layer to skip this fraction of skippable tiles")
    bsfa.add_argument("--samples", type=int, default=16, help="calibration windows (default: 16)")
    bsfa.add_argument("--seq-len", type=int, help="tokens per window (default: the model's maximum, at most 8192)")
    bsfa.add_argument("--aggregate", choices=["mean", "median"], default="mean")
    bsfa.add_argument("--block-m", type=int, default=128, help="query tile rows (default: 128)")
    bsfa.add_argument("--block-n", type=int, default=64, help="key tile columns (default: 64)")
    bsfa.add_argument("--out", required=True, metavar="DIR", help="artifact folder (created)")
    bsfa.add_argument("--device", help="default: cuda if available, else cpu")
    bsfa.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    seer = methods.add_parser(
        "seer",
        help="SeerAttention budget weights per (layer, KV head) from the ground-truth block map on training text",
        description="Calibrate how a model-wide block budget is shared between layers and KV heads, on the training "
        "split (never the evaluation text), and save an artifact for patch(model, 'seer', budgets=DIR) or "
        "--config seer.budgets=DIR.",
    )
    seer.add_argument("--model", default="smollm2", help="asset name, local folder or hub id (default: smollm2)")
    seer.add_argument("--data", default="default", help="default (Austen train + Python docs), austen or pydocs")
    seer.add_argument("--samples", type=int, default=4, help="calibration windows (default: 4)")
    seer.add_argument("--seq-len", type=int, help="tokens per window (default: the model's maximum, at most 8192)")
    seer.add_argument("--sparsities", type=float, nargs="+", help="grid of sparsities (default: 0 0.3 0.5-0.9 0.95)")
    seer.add_argument("--block-size", type=int, default=64, help="block size of the gates (default: 64)")
    seer.add_argument("--sink-blocks", type=int, default=1, help="always-kept first blocks (default: 1)")
    seer.add_argument("--local-blocks", type=int, default=1, help="always-kept local blocks (default: 1)")
    seer.add_argument("--out", required=True, metavar="DIR", help="artifact folder (created)")
    seer.add_argument("--device", help="default: cuda if available, else cpu")
    seer.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (and exit code 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _list_of(item_type):
    """An argparse type for comma-separated values: ``256,512`` (several flags' values are also accepted)."""

    def parse(text: str) -> list:
        try:
            return [item_type(item) for item in text.split(",") if item]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {item_type.__name__} values, got {text!r}"
            ) from None

    parse.__name__ = f"list of {item_type.__name__}"
    return parse


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class _Extend(argparse.Action):
    """``--flag 256,512`` or ``--flag 256 512``: one flat list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [item for value in values for item in value])


def _add_eval_parser(commands) -> None:
    from hf_fastattn.evaluation.suite import DEFAULT_METHODS, DEFAULTS, TASKS

    def default(task: str, name: str) -> str:
        cpu, gpu = (_shown(DEFAULTS[task][kind][name]) for kind in ("cpu", "gpu"))
        return f"default: {cpu}" if cpu == gpu else f"default: {cpu} on CPU, {gpu} on GPU"

    def add_list(parser, flag: str, task: str, name: str, item_type, help: str) -> None:
        parser.add_argument(
            flag,
            dest=name,
            type=_list_of(item_type),
            nargs="+",
            action=_Extend,
            metavar="NAME" if item_type is str else "N",
            help=f"{help} ({default(task, name)})",
        )

    def add_value(parser, flag: str, task: str, name: str, value_type, help: str) -> None:
        parser.add_argument(flag, dest=name, type=value_type, metavar="N", help=f"{help} ({default(task, name)})")

    evaluation = commands.add_parser(
        "eval",
        help="methods side by side on one task: quality, density, time, memory; JSON, summary.md, plots",
        description="Run one task with several attention methods on the same cases; with no task, niah.",
    )
    tasks = evaluation.add_subparsers(dest="task", metavar="{" + ",".join(TASKS) + "}")
    helps = {
        "niah": "needle-in-a-haystack grid (gkamradt): context length x depth",
        "passkey": "passkey retrieval grid: context length x depth",
        "ruler": "RULER-lite needle tasks (single, multikey, multivalue, multiquery), string_match_all",
        "ppl": "perplexity on held-out text per context length, with position buckets",
        "encoder": "encoder fidelity vs dense: MiniLM embeddings + retrieval, DINOv2 CLS/patch cosine, kNN",
    }
    for task in TASKS:
        parser = tasks.add_parser(task, help=helps[task], description=helps[task])
        models = "comma-separated models, at most one text and one vision" if task == "encoder" else "the model"
        parser.add_argument(
            "--model",
            type=_list_of(str) if task == "encoder" else str,
            metavar="NAME",
            help=f"{models}: asset name (smollm2, minilm, dinov2-s), local folder or hub id ({default(task, 'model')})",
        )
        parser.add_argument(
            "--methods",
            type=_list_of(str),
            nargs="+",
            action=_Extend,
            metavar="METHOD",
            default=list(DEFAULT_METHODS),
            help=f"dense/sdpa (the model's SDPA), eager, or fastattn_<method> (default: {_shown(DEFAULT_METHODS)})",
        )
        parser.add_argument(
            "--config",
            action="append",
            metavar="METHOD.KEY=VALUE",
            help="a setting for every label of METHOD, e.g. bsfa.thresholds=DIR (repeatable); per label: bsfa:k=16",
        )
        parser.add_argument("--out", metavar="DIR", help=f"output folder, created (default: eval_results/{task})")
        if task != "passkey":
            parser.add_argument("--text", default="essays", metavar="NAME", help="held-out text: essays or austen")
            parser.add_argument("--text-file", metavar="PATH", help="a local UTF-8 text file instead of --text")
        if task != "encoder":
            add_list(parser, "--context-lengths", task, "context_lengths", int, "context lengths in tokens")
        parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of every case (default: 0)")
        parser.add_argument("--device", help="default: cuda if available, else cpu")
        parser.add_argument(
            "--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU"
        )
        if task == "niah":
            add_list(parser, "--depths", task, "depth_percents", float, "needle depths in percent")
            add_value(parser, "--needles", task, "needles_per_cell", int, "needles per grid cell")
        elif task == "passkey":
            add_list(parser, "--depths", task, "depths", float, "pass key depths as fractions in [0, 1]")
            add_value(parser, "--trials", task, "trials", int, "pass keys per grid cell")
        elif task == "ruler":
            add_list(parser, "--tasks", task, "tasks", str, "RULER-lite tasks")
            add_value(parser, "--samples", task, "samples", int, "samples per task and length")
            add_value(parser, "--max-new-tokens", task, "max_new_tokens", int, "generated tokens (None: RULER's 128)")
        elif task == "ppl":
            add_value(parser, "--stride", task, "stride", int, "HF strided protocol step (None: non-overlapping)")
            add_value(parser, "--bucket-size", task, "bucket_size", int, "positions per perplexity bucket")
            add_value(parser, "--max-tokens", task, "max_tokens", int, "text tokens scored (None: the whole text)")
        else:
            add_value(parser, "--sentences", task, "sentences", int, "held-out sentences embedded")
            add_value(parser, "--retrieval-documents", task, "retrieval_documents", int, "retrieval check size")
            add_list(parser, "--image-sizes", task, "image_sizes", int, "DINOv2 fidelity image sizes in px")
            add_value(parser, "--images", task, "images", int, "Fashion-MNIST test images per size")
            add_value(parser, "--knn-image-size", task, "knn_image_size", int, "kNN image size in px")
            add_value(parser, "--knn-train", task, "knn_train", int, "kNN training images")
            add_value(parser, "--knn-test", task, "knn_test", int, "kNN test images")
            add_value(parser, "--k", task, "k", int, "kNN neighbours")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _Parser(prog="hf-fastattn", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device, registered methods and capabilities")
    check = commands.add_parser("selftest", help="tiny random models: each method vs eager attention")
    check.add_argument("--tolerance", type=float, default=1e-4, help="max abs error on fp32 hidden states")
    _add_eval_parser(commands)
    _add_calibrate_parser(commands)
    _add_train_gates_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "eval":
        if args.task is None:  # `hf-fastattn eval` alone: the main job's task, on the default model and text
            args = parser.parse_args([*argv, "niah"])
        return evaluate(args)
    if args.command == "calibrate":
        return calibrate(args)
    if args.command == "train-gates":
        return train_gates(args)
    return selftest(args.tolerance)


if __name__ == "__main__":
    sys.exit(main())
