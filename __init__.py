"""loraplex: many LoRA adapters on one base model, batched together."""

__version__ = "0.1.0"
