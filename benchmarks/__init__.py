"""Benchmarks: plain scripts (``python benchmarks/NAME.py``) and the performance benchmark
(``python -m benchmarks.performance``).

A package, so that its modules win over the unrelated top-level ``benchmarks`` package Opacus installs.
"""
