"""Benchmarks as library code: each measures hvdllm and a baseline side by side in one run
and reports the ratio (``hvdllm bench ...``, ``benchmarks/``). Not tests: numbers, not verdicts."""
