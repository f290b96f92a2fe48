"""llmtrain: a minimal, fast LLM training toolkit."""

__version__ = "0.1.0"
