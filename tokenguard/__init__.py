"""tokenguard: an exact, fast rate limiter for OpenAI-compatible LLM APIs."""

__version__ = "0.1.0"
