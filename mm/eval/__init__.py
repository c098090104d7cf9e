"""Metrics, evaluation of the shipped model on held-out data, and benchmarks against the references."""
