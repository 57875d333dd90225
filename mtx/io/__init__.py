"""Checkpoint input and output: safetensors files, MergeKit configs, streaming
merges of models larger than memory, folders written atomically."""

from mtx.io import atomic
from mtx.io import hf
from mtx.io import mergekit
from mtx.io import safetensors
from mtx.io import streaming

__all__ = ["atomic", "hf", "mergekit", "safetensors", "streaming"]
