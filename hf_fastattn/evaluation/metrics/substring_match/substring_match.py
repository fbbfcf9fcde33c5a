"""Substring match: a prediction scores 1 when it contains its reference verbatim (case-sensitive), else 0.

The needle-in-a-haystack rule (MInference style): the needle's number must appear in the generated text. This file is
a self-contained ``evaluate`` metric module, loaded from its folder with ``evaluate.load(path)`` (see
``hf_fastattn.evaluation.metrics.load_metric``), so it imports nothing from ``hf_fastattn``.
"""

import datasets
import evaluate

_DESCRIPTION = "1 when the reference string appears in the prediction (case-sensitive substring search), else 0."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts.
    references (list of str): one expected string per prediction.
Returns:
    score (float): the mean of ``per_sample``, in [0, 1].
    per_sample (list of int): 1 where the prediction contains its reference, else 0.
Examples:
    >>> metric = evaluate.load("hf_fastattn/evaluation/metrics/substring_match")
    >>> metric.compute(predictions=["The number is 1234567."], references=["1234567"])
    {'score': 1.0, 'per_sample': [1]}
"""


class SubstringMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict:
        if not predictions:
            raise ValueError("substring_match needs at least one prediction")
        per_sample = [int(reference in prediction) for prediction, reference in zip(predictions, references)]
        return {"score": sum(per_sample) / len(per_sample), "per_sample": per_sample}
