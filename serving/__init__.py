"""The OpenAI-compatible HTTP layer over AsyncLLM (routes in serving.app; start it with `python -m jpaged.serve`)."""
