"""tokenguard's tests.

A package, so `tests/drivers` and `tests/bench` never shadow the real `drivers` and `bench`.
"""
