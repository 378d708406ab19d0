"""Datasets: the built-in synthetic arithmetic benchmark and JSONL rows of {prompt, target, reference}."""
