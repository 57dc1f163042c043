"""vllama: an Ollama-style manager for vLLM."""

__version__ = "0.1.0"
