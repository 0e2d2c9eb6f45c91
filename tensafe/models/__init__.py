"""Load base models (embedded GGUF, hub, random-init) and attach LoRA with PEFT."""
