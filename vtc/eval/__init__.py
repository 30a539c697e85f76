"""Accuracy, kept visual tokens and latency of vtc compression methods on standard VLM benchmarks."""
