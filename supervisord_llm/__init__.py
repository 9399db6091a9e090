"""llm-supervisor: a host supervisor for self-hosted LLM inference servers."""

__version__ = "0.1.0"
