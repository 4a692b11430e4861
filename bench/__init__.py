"""Benchmarks of the execution engine against the bare SDK and arq (``python -m bench``)."""
