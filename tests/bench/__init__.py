"""Benchmarks (``nox -s bench``): real nodes and clients on loopback, numbers printed."""
