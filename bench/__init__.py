"""Benchmarks that print markdown tables: `python -m bench.<name> --help`."""
