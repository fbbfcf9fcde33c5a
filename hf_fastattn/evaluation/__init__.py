"""Evaluation harnesses: each takes a model object plus its tokenizer and local text, and returns JSON-able records.

Every record carries quality next to attention density, time and peak memory (evaluation conventions:
``../shared/reference/evaluation.md`` §6.3). The top-level ``eval/`` scripts and the CLI are thin entry points.
"""
