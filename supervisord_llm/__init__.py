"""llm-supervisor: a host supervisor for self-hosted LLM inference servers."""

__version__ = "0.1.0"

# first: the request path loads compiled, or (all of it) from source
from . import native as native
