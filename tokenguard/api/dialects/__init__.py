"""The API dialects, one module each: OpenAI's chat completions, legacy completions and
embeddings (and what the OpenAI family shares); see :mod:`tokenguard.api.dialect`."""
