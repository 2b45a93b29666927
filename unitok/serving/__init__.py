"""Serving: the vLLM plugin (imported only here) and the OpenAI-compatible image/video server."""
