"""Merging checkpoints on disk tensor by tensor, in bounded memory.

The public entry point of the streaming merge; the work is split by what
changes together:

* :mod:`mtx.io.models`: opening models (safetensors read lazily, orbax
  restored, both checked against their recorded content hashes) and
  checking that they fit together;
* :mod:`mtx.io.plan`: what to do with each tensor (:class:`Spec`, plans);
* :mod:`mtx.io.engine`: the merge itself (checks, statistics, then tensor
  by tensor with the kernels of :func:`mtx.merging.merge`, bit for bit),
  and whole models placed on a device mesh;
* :mod:`mtx.io.output`: writing the outputs, atomically
  (:mod:`mtx.io.atomic`), as working copies of the pretrained folder.

Memory holds a few tensors times ``T`` rather than ``T + 1`` models (see
:mod:`mtx.io.engine`). Tensor names: a safetensors checkpoint is a flat dict
``{tensor name: array}`` (the leaf path is the tensor name, e.g.
``model.layers.0.mlp.weight``); an orbax checkpoint keeps its nested tree
(leaf paths ``/``-joined, e.g. ``encoder/layers_0/kernel``). A merged orbax
checkpoint has the pretrained model's structure; safetensors outputs name
tensors by leaf path. Models compared with each other must have the same
leaf paths.

>>> import os, tempfile, numpy as np
>>> from mtx.io import safetensors as st
>>> d = tempfile.mkdtemp()
>>> for name, w in [("pre", 0.0), ("a", 1.0), ("b", 3.0)]:
...   st.write(f"{d}/{name}.safetensors", {"w": np.full(3, w, np.float32)})
>>> out = merge_checkpoints(f"{d}/pre.safetensors",
...                         [f"{d}/a.safetensors", f"{d}/b.safetensors"],
...                         Spec.of("task_arithmetic", scales=[0.5]),
...                         f"{d}/merged")
>>> st.read(f"{d}/merged")["w"].tolist()
[2.0, 2.0, 2.0]
"""

from mtx.io.engine import load_sharded
from mtx.io.engine import merge_on_mesh
from mtx.io.engine import merge_tensors
from mtx.io.engine import PART_ENTRIES
from mtx.io.engine import Progress
from mtx.io.engine import row_parts
from mtx.io.models import check_compatible
from mtx.io.models import Model
from mtx.io.models import open_model
from mtx.io.output import copy_side_files
from mtx.io.output import merge_checkpoints
from mtx.io.plan import Plan
from mtx.io.plan import Spec
from mtx.sharding import default_spec
from mtx.sharding import shardings_for

__all__ = [
    "Model",
    "PART_ENTRIES",
    "Plan",
    "Progress",
    "Spec",
    "check_compatible",
    "copy_side_files",
    "default_spec",
    "load_sharded",
    "merge_checkpoints",
    "merge_on_mesh",
    "merge_tensors",
    "open_model",
    "row_parts",
    "shardings_for",
]
