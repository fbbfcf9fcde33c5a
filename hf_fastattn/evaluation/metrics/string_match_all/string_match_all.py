"""RULER's ``string_match_all``: per sample, the fraction of its reference strings found in the prediction.

Matching is case-insensitive substring search; the score is the mean over samples, × 100 (RULER's scale). This file
is a self-contained ``evaluate`` metric module, loaded from its folder with ``evaluate.load(path)`` (see
``hf_fastattn.evaluation.metrics.load_metric``), so it imports nothing from ``hf_fastattn``.
"""

import datasets
import evaluate

_DESCRIPTION = "RULER string_match_all: mean over samples of the fraction of references in the prediction, x 100."

_CITATION = """
@article{hsieh2024ruler,
  title={RULER: What's the Real Context Size of Your Long-Context Language Models?},
  author={Hsieh, Cheng-Ping and Sun, Simeng and Kriman, Samuel and Acharya, Shantanu and Rekesh, Dima and Jia, Fei
          and Zhang, Yang and Ginsburg, Boris},
  journal={arXiv preprint arXiv:2404.06654},
  year={2024}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts.
    references (list of list of str): the strings each prediction must contain (at least one per prediction).
Returns:
    score (float): 100 × the mean over samples of the fraction of references found, in [0, 100].
    per_sample (list of float): each sample's own score, 100 × its fraction of references found.
Examples:
    >>> metric = evaluate.load("hf_fastattn/evaluation/metrics/string_match_all")
    >>> metric.compute(predictions=["ABC and x"], references=[["abc", "y"]])
    {'score': 50.0, 'per_sample': [50.0]}
"""


class StringMatchAll(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            reference_urls=["https://github.com/NVIDIA/RULER"],
        )

    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict:
        if not predictions:
            raise ValueError("string_match_all needs at least one prediction")
        # A plain running sum, not sum() (compensated from Python 3.12 on): the same float on every Python version.
        total, per_sample = 0.0, []
        for prediction, sample_references in zip(predictions, references):
            if not sample_references:
                raise ValueError("every sample needs at least one reference string")
            prediction = prediction.lower()
            fraction = sum(reference.lower() in prediction for reference in sample_references) / len(sample_references)
            total += fraction
            per_sample.append(100.0 * fraction)
        return {"score": 100.0 * total / len(predictions), "per_sample": per_sample}
