"""The Lightning module, trainer factory and callbacks for LoRA fine-tuning."""
