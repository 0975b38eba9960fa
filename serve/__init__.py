"""The OpenAI-compatible chat server (installed as `vlbridge.serve`)."""
