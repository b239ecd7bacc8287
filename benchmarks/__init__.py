"""Benchmarks: each module prints one table; run them as ``python -m benchmarks.<name>`` from the
repository root (see benchmarks/README.md). Shared pieces live in ``benchmarks.harness``."""
