"""``run_eval`` end to end on the real offline assets, at tiny sizes: every task, dense and fastattn_dense side by side.

The suite's job is the plumbing: one model, each method in turn on the same cases, rows of one schema, the JSON,
the summary table and the plots. The harnesses themselves are tested in their own files. SmolLM2 (30 layers) would take
minutes per forward in Triton's interpreter, so ``fastattn_dense`` takes its PyTorch reference path here (as in the
notebook test); the kernels are checked against it elsewhere. Assets missing: the tests skip, saying what to install
(CI installs them).
"""

from __future__ import annotations

import json

import pytest

import hf_fastattn
from hf_fastattn.assets.cache import AssetUnavailable
from hf_fastattn.assets.models import load_model
from hf_fastattn.evaluation.suite import DEFAULTS, ROW_KEYS, TASKS, method_labels, run_eval

METHODS = ["dense", "fastattn_dense"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("real_model_on_cpu")  # see tests/conftest.py


def _load_or_skip(name: str):
    try:
        return load_model(name)
    except AssetUnavailable as error:
        pytest.skip(f"asset not installed: {error}")


@pytest.fixture(scope="module")
def smollm2():
    return _load_or_skip("smollm2")


def _check_rows(result: dict, task: str, metric: str, lengths: list[int | None]) -> None:
    rows = result["rows"]
    assert all(tuple(row) == ROW_KEYS for row in rows)
    for method in METHODS:
        mine = [row for row in rows if row["method"] == method]
        assert [row["context_length"] for row in mine] == lengths
        for row in mine:
            assert row["task"] == task and row["quality_metric"] == metric and row["setting"] is None
            assert row["density"] == 1.0 and row["device"] == "cpu" and row["peak_memory_mib"] is None
            assert row["tokens"] > 0 and row["seconds"] > 0
            assert row["tokens_per_second"] == pytest.approx(row["tokens"] / row["seconds"])
    implementations = {row["method"]: row["implementation"] for row in rows}
    assert implementations == {"dense": "sdpa", "fastattn_dense": "fastattn_dense"}


def _check_files(output_dir, task: str, pngs: list[str]) -> None:
    payload = json.loads((output_dir / f"{task}.json").read_text())
    assert set(payload) == {"environment", "task", "settings", "rows", "records"}
    assert payload["settings"]["methods"] == METHODS
    summary = (output_dir / "summary.md").read_text()
    assert "| method | setting | ctx | quality metric |" in summary and "transformers" in summary.splitlines()[0]
    assert summary.count("| fastattn_dense |") == sum(row["method"] == "fastattn_dense" for row in payload["rows"])
    for name in pngs:
        assert (output_dir / name).read_bytes().startswith(PNG_SIGNATURE), name


def _cases(record: dict, cases: str) -> list[tuple]:
    """What each case asked: its answer(s) and prompt length, in order."""
    return [
        (str(case.get("answer", case.get("references"))), case["prompt_tokens"])
        for cell in record["cells"]
        for case in cell[cases]
    ]


def test_niah_grid_heatmaps_and_same_cases(smollm2, tmp_path):
    result = run_eval(
        "niah", model=smollm2, methods=METHODS, output_dir=tmp_path, context_lengths=[128, 160],
        depth_percents=[50], progress=False,
    )  # fmt: skip
    _check_rows(result, "niah", "needle_accuracy", [128, 160, None])
    dense, fast = (result["records"][method] for method in METHODS)
    assert list(dense) == ["128", "160"]
    for length in dense:
        assert _cases(dense[length], "responses") == _cases(fast[length], "responses")
        # The same model in fp32: SDPA and the reference path answer alike.
        assert dense[length]["mean_score"] == fast[length]["mean_score"]
    _check_files(tmp_path, "niah", ["needle_dense.png", "needle_fastattn_dense.png", "pareto.png"])


def test_passkey(smollm2, tmp_path):
    result = run_eval(
        "passkey", model=smollm2, methods=METHODS, output_dir=tmp_path, context_lengths=[128], depths=[0.5],
        trials=1, progress=False,
    )  # fmt: skip
    _check_rows(result, "passkey", "passkey_accuracy", [128, None])
    dense, fast = (result["records"][method]["128"] for method in METHODS)
    assert _cases(dense, "responses") == _cases(fast, "responses")
    _check_files(tmp_path, "passkey", ["pareto.png"])


def test_ruler(smollm2, tmp_path):
    result = run_eval(
        "ruler", model=smollm2, methods=METHODS, output_dir=tmp_path, context_lengths=[256],
        tasks=["niah_single_1", "niah_multivalue"], samples=1, max_new_tokens=8, progress=False,
    )  # fmt: skip
    _check_rows(result, "ruler", "ruler_string_match_all", [256, None])
    dense, fast = (result["records"][method]["256"] for method in METHODS)
    assert _cases(dense, "samples") == _cases(fast, "samples")
    _check_files(tmp_path, "ruler", ["pareto.png"])


def test_perplexity(smollm2, tmp_path):
    result = run_eval(
        "ppl", model=smollm2, methods=METHODS, output_dir=tmp_path, context_lengths=[64, 96], max_tokens=300,
        bucket_size=32, progress=False,
    )  # fmt: skip
    _check_rows(result, "ppl", "perplexity", [64, 96])
    dense, fast = ([row["quality"] for row in result["rows"] if row["method"] == method] for method in METHODS)
    assert fast == pytest.approx(dense, rel=1e-4)
    record = result["records"]["dense"]["64"]
    assert record["input_tokens"] == 300 and record["buckets"]  # non-overlapping windows read each token once
    assert result["rows"][0]["tokens"] == 300
    _check_files(tmp_path, "ppl", ["perplexity_vs_context.png", "pareto.png"])


def test_encoder_fidelity_text_and_vision(tmp_path):
    text, vision = _load_or_skip("minilm"), _load_or_skip("dinov2-s")
    try:
        result = run_eval(
            "encoder", model=[text, vision], methods=METHODS, output_dir=tmp_path, sentences=4, retrieval_documents=3,
            image_sizes=[28, 42], images=2, knn_image_size=28, knn_train=20, knn_test=10, k=3, progress=False,
        )  # fmt: skip
    except AssetUnavailable as error:  # Fashion-MNIST is a Debian package
        pytest.skip(f"asset not installed: {error}")
    rows = result["rows"]
    assert all(tuple(row) == ROW_KEYS for row in rows)
    metrics = [
        "embedding_cosine_mean", "retrieval_top1_accuracy", "cls_cosine_mean_28", "patch_cosine_mean_28",
        "cls_cosine_mean_42", "patch_cosine_mean_42", "knn_accuracy",
    ]  # fmt: skip
    for method in METHODS:
        mine = [row for row in rows if row["method"] == method]
        assert [row["quality_metric"] for row in mine] == metrics
        assert all(row["density"] == 1.0 and row["tokens"] > 0 for row in mine)
        lengths = {row["quality_metric"]: row["context_length"] for row in mine}
        assert lengths["cls_cosine_mean_28"] == lengths["knn_accuracy"] == 1 + 2 * 2  # CLS + 2x2 patches of 14 px
        assert lengths["cls_cosine_mean_42"] == 1 + 3 * 3
        cosines = [row["quality"] for row in mine if "cosine" in row["quality_metric"]]
        assert min(cosines) > 0.9999  # fastattn_dense is exact attention; dense is the reference itself
    implementations = {row["method"]: row["implementation"] for row in rows}
    assert implementations == {"dense": "sdpa", "fastattn_dense": "fastattn_dense"}
    knn = result["records"]["fastattn_dense"]["knn"]
    assert knn["implementations"] == {"model": "fastattn_dense", "reference": "sdpa"}
    assert knn["train_images"] == 20 and knn["test_images"] == 10
    _check_files(tmp_path, "encoder", ["pareto.png"])


def test_models_attention_is_restored(smollm2, tmp_path):
    model, _ = smollm2
    run_eval(
        "ppl", model=smollm2, methods=["eager", "fastattn_dense", "sdpa"], output_dir=tmp_path,
        context_lengths=[32], max_tokens=64, progress=False,
    )  # fmt: skip
    assert model.config._attn_implementation == "sdpa" and not hf_fastattn.layer_states(model)


@pytest.mark.parametrize(
    ("task", "options", "message"),
    [
        ("nope", {}, "unknown task 'nope'; valid tasks: niah"),
        ("niah", {"methods": ["dense", "nope"]}, "unknown method(s) nope; valid methods: dense, sdpa, eager"),
        ("niah", {"methods": ["dense", "dense"]}, "given more than once"),
        ("niah", {"methods": []}, "no methods given"),
        ("niah", {"stride": 4}, "unknown option(s) ['stride'] for niah"),
        ("niah", {"dtype": "int8"}, "dtype must be"),
        ("niah", {"device": "tpu9"}, "unknown device 'tpu9'"),
    ],
)
def test_bad_input_is_refused_before_loading(task, options, message, tmp_path):
    with pytest.raises(ValueError) as caught:
        run_eval(task, output_dir=tmp_path / "out", model="not-loaded", **options)
    assert message in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_defaults_cover_every_task_for_cpu_and_gpu():
    assert set(DEFAULTS) == set(TASKS)
    for task in TASKS:
        assert set(DEFAULTS[task]) == {"cpu", "gpu"} and set(DEFAULTS[task]["cpu"]) == set(DEFAULTS[task]["gpu"])
    assert max(DEFAULTS["niah"]["gpu"]["context_lengths"]) <= 8192 and DEFAULTS["ppl"]["gpu"]["max_tokens"] is None
    assert {"dense", "sdpa", "eager", "fastattn_dense"} <= set(method_labels())
