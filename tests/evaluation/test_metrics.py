"""The local ``evaluate`` metric modules: known values on hand-made cases, the loader's errors, and offline loading."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from hf_fastattn.evaluation.metrics import available_metrics, load_metric


def test_available_metrics():
    assert available_metrics() == ["string_match_all", "substring_match"]


def test_load_metric_is_cached():
    assert load_metric("substring_match") is load_metric("substring_match")


def test_unknown_metric_lists_the_available_ones():
    with pytest.raises(
        ValueError, match=r"unknown metric 'accuracy'; available metrics: string_match_all, substring_match"
    ):
        load_metric("accuracy")


# --------------------------------------------------------------------------------------------------------------------
# substring_match
# --------------------------------------------------------------------------------------------------------------------


def test_substring_match_known_values():
    metric = load_metric("substring_match")
    result = metric.compute(
        predictions=["The number is 1234567.", "", "no digits here", "Paris", "12345678"],
        references=["1234567", "1234567", "1234567", "paris", "1234567"],
    )
    # Empty prediction: no match. Case-sensitive: "Paris" does not contain "paris". Substring: "12345678" matches.
    assert result == {"score": pytest.approx(2 / 5), "per_sample": [1, 0, 0, 0, 1]}


def test_substring_match_all_or_nothing():
    metric = load_metric("substring_match")
    assert metric.compute(predictions=["a 1 b"], references=["1"]) == {"score": 1.0, "per_sample": [1]}
    assert metric.compute(predictions=["a b"], references=["1"]) == {"score": 0.0, "per_sample": [0]}


def test_substring_match_errors():
    metric = load_metric("substring_match")
    with pytest.raises(ValueError, match="at least one prediction"):
        metric.compute(predictions=[], references=[])
    with pytest.raises(ValueError, match=r"predictions \(2\) and references \(1\)"):
        metric.compute(predictions=["a", "b"], references=["a"])


# --------------------------------------------------------------------------------------------------------------------
# string_match_all
# --------------------------------------------------------------------------------------------------------------------


def test_string_match_all_known_values():
    metric = load_metric("string_match_all")
    references = ["1111111", "2222222", "3333333", "4444444"]
    result = metric.compute(
        predictions=["the numbers are 1111111 and 3333333", "", "ABC-def and X", "4444444 3333333 2222222 1111111"],
        references=[references, ["7"], ["abc-DEF", "x", "y"], references],
    )
    # Two of four references; an empty prediction finds nothing; case-insensitive, two of three; all four.
    assert result["per_sample"] == pytest.approx([50.0, 0.0, 200 / 3, 100.0])
    assert result["score"] == pytest.approx((50 + 0 + 200 / 3 + 100) / 4)


def test_string_match_all_errors():
    metric = load_metric("string_match_all")
    with pytest.raises(ValueError, match="at least one prediction"):
        metric.compute(predictions=[], references=[])
    with pytest.raises(ValueError, match="at least one reference string"):
        metric.compute(predictions=["a"], references=[[]])


def test_ruler_string_match_all_delegates_to_the_metric():
    from hf_fastattn.evaluation.ruler import string_match_all

    predictions, references = ["ABC-def", "x"], [["abc-DEF"], ["x", "y"]]
    expected = load_metric("string_match_all").compute(predictions=predictions, references=references)["score"]
    assert string_match_all(predictions, references) == expected == 75.0
    # Tuples are sequences too.
    assert string_match_all(("x",), (("x", "y"),)) == 50.0


# --------------------------------------------------------------------------------------------------------------------
# Offline
# --------------------------------------------------------------------------------------------------------------------


def test_metrics_load_offline_with_an_empty_cache(tmp_path):
    """HF_HUB_OFFLINE=1, a fresh HF_HOME and every socket connection refused: both metrics still load and score."""
    script = textwrap.dedent(
        """
        import socket

        def refuse(*args, **kwargs):
            raise OSError("network access attempted")

        socket.socket.connect = refuse
        socket.create_connection = refuse

        from hf_fastattn.evaluation.metrics import load_metric

        print(load_metric("substring_match").compute(predictions=["x 42"], references=["42"])["score"])
        print(load_metric("string_match_all").compute(predictions=["A b"], references=[["a", "c"]])["score"])
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    completed = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["1.0", "50.0"]
