"""Offline datasets, deterministic splits, batching and augmentation.

Real data that ships with packages, no downloads: scikit-learn's 8x8 digits
(:func:`load_digits`) and IDX files (:func:`read_idx`, :func:`load_idx`) —
Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, and the same
reader serves MNIST / KMNIST / EMNIST files a user has. Images are float32 in
``[0, 1]`` with a trailing channel axis, ``[N, H, W, 1]``.

>>> ds = load_digits()
>>> ds.images.shape, ds.num_classes
((1797, 8, 8, 1), 10)
>>> s = split(ds, validation=0.1, test=0.2, seed=0)
>>> [len(s[k]) for k in ("train", "validation", "test")]
[1259, 179, 359]
"""

from mtx.data._core import DATA_DIR_ENV
from mtx.data._core import Dataset
from mtx.data._core import IDX_LOCATIONS
from mtx.data._core import TRANSFORMS
from mtx.data._core import augment
from mtx.data._core import batch_indices
from mtx.data._core import batches
from mtx.data._core import idx_directory
from mtx.data._core import idx_origin
from mtx.data._core import load
from mtx.data._core import load_digits
from mtx.data._core import load_idx
from mtx.data._core import read_idx
from mtx.data._core import resize
from mtx.data._core import rotation_prediction
from mtx.data._core import split
from mtx.data._core import transform
from mtx.data import tasks

__all__ = [
    "DATA_DIR_ENV",
    "IDX_LOCATIONS",
    "TRANSFORMS",
    "Dataset",
    "augment",
    "batch_indices",
    "batches",
    "idx_directory",
    "idx_origin",
    "load",
    "load_digits",
    "load_idx",
    "read_idx",
    "resize",
    "rotation_prediction",
    "split",
    "tasks",
    "transform",
]
