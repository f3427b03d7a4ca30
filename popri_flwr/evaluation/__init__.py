"""Evaluation: the downstream LM, distribution metrics, final synthetic sets, the benchmark
and its plots. No Flower imports."""
