"""MLLM backbones: family adapters and tiny random-init models."""

from sam4mllm.models.adapter import FAMILIES, Adapter, build_adapter

__all__ = ["FAMILIES", "Adapter", "build_adapter"]
