"""Window-store drivers, found by URL scheme through the `tokenguard.drivers` entry points."""
