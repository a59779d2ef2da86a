"""Flax models written for LoRA: every projection runs through lora_jax.ops."""
