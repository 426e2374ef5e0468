"""Benchmarks and quality evaluation (`facert bench SCENARIO`). Speed is measured here, side by
side in one run on one machine, never in unit tests."""
