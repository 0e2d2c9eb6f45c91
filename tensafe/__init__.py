"""TenSafe: privacy-preserving LLM adapter fine-tuning and serving, driven by Hydra configs."""

__version__ = "0.1.0"
