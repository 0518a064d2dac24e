"""The shared window-store suite and the Redis driver's own tests."""
