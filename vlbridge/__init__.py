"""vlbridge: turn any Hugging Face causal LLM into a vision-language model."""

__version__ = "0.1.0"
