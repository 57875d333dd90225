"""Checkpoint input and output: safetensors files, MergeKit configs, streaming
merges of models larger than memory."""

from mtx.io import hf
from mtx.io import safetensors

__all__ = ["hf", "safetensors"]
