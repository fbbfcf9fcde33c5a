"""Evaluation harnesses: each takes a model object plus its tokenizer and local text, and returns JSON-able records.

Every record carries quality next to attention density, time and peak memory (evaluation conventions:
``../shared/reference/evaluation.md`` §6.3). :func:`suite.run_eval` runs one of them for several attention methods
side by side (``hf-fastattn eval``); the top-level ``eval/`` scripts and the CLI are thin entry points to it. Under
``accelerate launch`` the needle, passkey, RULER-lite and perplexity harnesses share their cases out over the processes
and every process gets the records of a single process (``hf_fastattn._distributed.run_sharded``).
"""
