"""Serving PIIP-LLaVA: the vLLM plugin and the web chat page (`piip-llava serve --web`)."""
