"""Benchmarks: the interleaved timing harness (``harness``) and the comparisons of ``streamdiff bench`` (``suites``)."""
