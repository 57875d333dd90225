"""Reading and writing the safetensors format with numpy only.

A safetensors file is an 8-byte little-endian header length ``n``, ``n``
bytes of JSON mapping each tensor name to its ``dtype``, ``shape`` and
``data_offsets`` (``[begin, end)`` relative to the end of the header; an
optional ``"__metadata__"`` entry maps strings to strings), then the raw
little-endian tensor bytes, packed with no gaps. bfloat16 and the float8
types come from ``ml_dtypes``.

Reading: opening a checkpoint reads and validates the headers only (a
hostile or damaged header is a ``ValueError`` naming the file); a tensor is
read when it is indexed, with ``pread`` into a private 64-byte aligned array,
never memory-mapped, so a file truncated or rewritten while it is read is a
``ValueError`` naming the file, not a SIGBUS. Row ranges of large tensors
are read with :meth:`Checkpoint.read_rows` (or a :class:`LazyTensor`).

Integrity: mtx's writers record each tensor's SHA-256 (over its dtype name,
shape and bytes) in ``__metadata__["mtx.sha256"]`` (a JSON string
``{name: hex}``); readers check every whole-tensor read against it when it
is there (``verify=False`` opts out), and :func:`verify_file` checks a file,
folder or sharded checkpoint in bounded memory. Files from other tools carry
no hashes and are read unchecked.

Writing is atomic: a file is written to a temporary sibling, fsynced and
renamed into place; a sharded checkpoint is written into a temporary
directory renamed into place at the end, so a failure never leaves a partial
checkpoint behind. Files written with ``hashes=False`` are byte-identical to
what the ``safetensors`` package writes for the same tensors and metadata
(tensors ordered by decreasing dtype width, then name; compact JSON padded
with spaces to a multiple of 8 bytes); with hashes, the same but for the
order of the ``__metadata__`` keys, and both it and ``transformers`` read
them.

The implementation lives in ``_st_header`` (format, header validation,
hashes), ``_st_read`` (safe reads, verification) and ``_st_write`` (atomic
writers); this module is the public surface.

>>> import os, tempfile, numpy as np
>>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
>>> write(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
...       metadata={"format": "np"})
>>> ckpt = open_checkpoint(path)
>>> ckpt.info("w").shape, ckpt.info("w").dtype, ckpt.metadata
((2, 3), dtype('float32'), {'format': 'np'})
>>> ckpt["w"].tolist()
[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
>>> verify_file(path)
True
"""

from __future__ import annotations

from mtx.io._st_header import dtype_name
from mtx.io._st_header import HASH_KEY
from mtx.io._st_header import INDEX_NAME
from mtx.io._st_header import MAX_HEADER_BYTES
from mtx.io._st_header import numpy_dtype
from mtx.io._st_header import parse_size
from mtx.io._st_header import PathLike
from mtx.io._st_header import read_header
from mtx.io._st_header import SINGLE_NAME
from mtx.io._st_header import tensor_hash
from mtx.io._st_header import TensorInfo
from mtx.io._st_read import Checkpoint
from mtx.io._st_read import LazyTensor
from mtx.io._st_read import open_checkpoint
from mtx.io._st_read import read
from mtx.io._st_read import resolve
from mtx.io._st_read import verify_file
from mtx.io._st_write import ShardedWriter
from mtx.io._st_write import write
from mtx.io._st_write import write_sharded

__all__ = [
    "Checkpoint",
    "HASH_KEY",
    "INDEX_NAME",
    "LazyTensor",
    "MAX_HEADER_BYTES",
    "PathLike",
    "SINGLE_NAME",
    "ShardedWriter",
    "TensorInfo",
    "dtype_name",
    "numpy_dtype",
    "open_checkpoint",
    "parse_size",
    "read",
    "read_header",
    "resolve",
    "tensor_hash",
    "verify_file",
    "write",
    "write_sharded",
]
