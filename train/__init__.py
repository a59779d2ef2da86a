"""The training job of lora_jax: ``python -m train.run --config configs/X.yaml [key=value ...]``."""
