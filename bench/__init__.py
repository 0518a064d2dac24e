"""tokenguard's benchmarks: a load client with a built-in accuracy audit (``python -m bench``)."""
