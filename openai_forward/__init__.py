"""openai-forward: an async reverse proxy for OpenAI-style LLM APIs."""

__version__ = "1.0.0"
