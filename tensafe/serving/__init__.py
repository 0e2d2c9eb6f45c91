"""Serving: engines, the OpenAI-compatible API, the adapter registry and the HE-LoRA hook."""
