"""Promptable segmenters (SAM family and an offline GrabCut) behind one interface."""

from sam4mllm.sam.base import CheckpointNotFoundError, Prediction, Segmenter

__all__ = ["CheckpointNotFoundError", "Prediction", "Segmenter"]
