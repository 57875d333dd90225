"""Datasets as arrays; loaders, splits, batches, augmentation."""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Images ``[N, H, W, C]`` float32 in [0, 1] and int32 labels ``[N]``."""

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str = ""
  class_names: tuple[str, ...] = ()

  def __post_init__(self):
    if len(self.images) != len(self.labels):
      raise ValueError(
          f"dataset {self.name!r}: {len(self.images)} images but"
          f" {len(self.labels)} labels"
      )

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, index) -> Dataset:
    """The examples at ``index`` (an index array or slice)."""
    return dataclasses.replace(
        self, images=self.images[index], labels=self.labels[index]
    )


FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Where packaged IDX data sets live, and how to get them.
IDX_LOCATIONS = {
    "fashion_mnist": (
        "/usr/share/datasets/fashion-mnist",
        "install the Debian package (apt-get install dataset-fashion-mnist),"
        " or put the four IDX files in $MTX_DATA_DIR/fashion-mnist or"
        " --config.data_dir",
    ),
}
# The environment variable naming a directory of data sets.
DATA_DIR_ENV = "MTX_DATA_DIR"


def _has_idx(directory: Path) -> bool:
  stem = directory / "train-images-idx3-ubyte"
  return stem.exists() or stem.with_name(stem.name + ".gz").exists()


def idx_directory(name: str, data_dir: str | os.PathLike | None = None) -> Path:
  """Where the IDX data set ``name`` (a key of :data:`IDX_LOCATIONS`) is read.

  The first of: ``data_dir``, then ``$MTX_DATA_DIR``, then the packaged
  location. A given root holds the files itself or in a subfolder named
  like the packaged folder or like ``name`` (``fashion_mnist`` or
  ``fashion-mnist``). A root
  without the files falls through to the next candidate, so the returned
  directory may still lack them (:func:`load_idx` says how to get them).

  Raises:
    ValueError: ``name`` has no packaged location.
  """
  if name not in IDX_LOCATIONS:
    raise ValueError(
        f"no default location for IDX data set {name!r}; known:"
        f" {sorted(IDX_LOCATIONS)}"
    )
  default = Path(IDX_LOCATIONS[name][0])
  for root in (data_dir, os.environ.get(DATA_DIR_ENV)):
    if not root:
      continue
    root = Path(root).expanduser()
    for d in (
        root,
        root / default.name,
        root / name,
        root / name.replace("_", "-"),
    ):
      if _has_idx(d):
        return d
  return default


def idx_origin(source: str, data_dir: str | os.PathLike | None) -> str:
  """A log line: where IDX ``source`` is read from (:func:`idx_directory`),
  naming the roots given (``data_dir``, ``$MTX_DATA_DIR``) that did not hold
  it, a fallback the user should hear of."""
  directory = idx_directory(source, data_dir).absolute()
  line = f"{source} read from {directory}"
  given = [
      (what, root)
      for what, root in (
          ("data_dir", data_dir),
          (f"${DATA_DIR_ENV}", os.environ.get(DATA_DIR_ENV)),
      )
      if root
  ]
  passed = []  # given roots, in order of precedence, that lacked the files
  for what, root in given:
    r = Path(root).expanduser().absolute()
    if directory == r or r in directory.parents:
      break
    passed.append(f"{what}={root}")
  if passed:
    line += f" (FALLBACK: no {source} IDX files in {', '.join(passed)})"
  return line


_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (optionally gzipped), as used by MNIST and its kin.

  Format: two zero bytes, a dtype code, the number of dimensions, one
  big-endian uint32 per dimension, then the data.

  Raises:
    FileNotFoundError: no such file.
    ValueError: bad magic number, unknown dtype code or truncated data,
      naming the file.
  """
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise ValueError(f"{path}: cannot read IDX data ({e})") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise ValueError(f"{path}: not an IDX file (bad magic number)")
  code, ndim = raw[2], raw[3]
  if code not in _IDX_DTYPES:
    raise ValueError(f"{path}: unknown IDX dtype code {code:#x}")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"{path}: truncated IDX header")
  shape = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4"))
  dtype = np.dtype(_IDX_DTYPES[code])
  need = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - header != need:
    raise ValueError(
        f"{path}: expected {need} data bytes for shape {shape}, found"
        f" {len(raw) - header} (truncated or corrupt file)"
    )
  return np.frombuffer(raw, dtype, offset=header).reshape(shape).copy()


def _find(directory: Path, stem: str) -> Path:
  for name in (stem, stem + ".gz"):
    if (directory / name).exists():
      return directory / name
  raise FileNotFoundError(f"{directory}: missing {stem}[.gz]")


def load_idx(
    directory: str | os.PathLike | None = None,
    *,
    name: str = "fashion_mnist",
    class_names: Sequence[str] | None = None,
) -> dict[str, Dataset]:
  """Loads an MNIST-layout IDX data set: ``{"train": ..., "test": ...}``.

  Expects ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally
  ``.gz``) in ``directory``.

  Args:
    directory: where the files are (default: :func:`idx_directory`, i.e.
      ``$MTX_DATA_DIR`` or the packaged location of ``name``).
    name: data set name (selects the default directory and class names).
    class_names: optional class names.

  Raises:
    FileNotFoundError: files missing, with how to get them.
  """
  hint = IDX_LOCATIONS.get(name, (None, ""))[1]
  if directory is None:
    directory = idx_directory(name)
  directory = Path(directory)
  try:
    files = {
        split: (
            _find(directory, f"{prefix}-images-idx3-ubyte"),
            _find(directory, f"{prefix}-labels-idx1-ubyte"),
        )
        for split, prefix in (("train", "train"), ("test", "t10k"))
    }
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"{name}: {e}" + (f"; {hint}" if hint else "")
    ) from None
  if class_names is None and name == "fashion_mnist":
    class_names = FASHION_MNIST_CLASSES
  out = {}
  for split, (img_path, lbl_path) in files.items():
    images = read_idx(img_path)
    labels = read_idx(lbl_path).astype(np.int32)
    if images.ndim != 3:
      raise ValueError(
          f"{img_path}: expected [N, H, W] images, got {images.shape}"
      )
    out[split] = Dataset(
        (images.astype(np.float32) / 255.0)[..., None],
        labels,
        int(labels.max()) + 1,
        f"{name}/{split}",
        tuple(class_names or ()),
    )
  return out


def load_digits() -> Dataset:
  """scikit-learn's 1797 8x8 handwritten digits, scaled to [0, 1]."""
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "load_digits needs scikit-learn: pip install scikit-learn"
    ) from e
  d = datasets.load_digits()
  images = (d.images.astype(np.float32) / 16.0)[..., None]
  return Dataset(
      images,
      d.target.astype(np.int32),
      10,
      "digits",
      tuple(str(i) for i in range(10)),
  )


def load(
    name: str,
    directory: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
) -> dict:
  """Loads a named data set as ``{"train", "test"}`` splits.

  ``"digits"`` has no official test split: 20% (fixed seed) is held out.
  IDX data sets are read from ``directory``, else from
  :func:`idx_directory` (``data_dir``, ``$MTX_DATA_DIR``, the packaged
  location).
  """
  if name == "digits":
    s = split(load_digits(), validation=0.0, test=0.2, seed=0)
    return {"train": s["train"], "test": s["test"]}
  if directory is None and name in IDX_LOCATIONS:
    directory = idx_directory(name, data_dir)
  if name in IDX_LOCATIONS or directory is not None:
    return load_idx(directory, name=name)
  raise ValueError(
      f"unknown data set {name!r}; known: ['digits',"
      f" {', '.join(map(repr, IDX_LOCATIONS))}] or pass directory= for IDX"
      " files"
  )


def split(
    ds: Dataset, *, validation: float, test: float = 0.0, seed: int = 0
) -> dict[str, Dataset]:
  """Deterministic stratified split into train / validation / test.

  Per class, a seeded permutation puts ``round(test * n_c)`` examples in
  test and ``round(validation * n_c)`` in validation; the rest is train.
  The same seed always gives the same split, independent of anything else.
  """
  if not (0 <= validation < 1 and 0 <= test < 1 and validation + test < 1):
    raise ValueError(
        f"validation={validation} and test={test} must be fractions summing"
        " to less than 1"
    )
  rng = np.random.default_rng(seed)
  parts = {"train": [], "validation": [], "test": []}
  for c in np.unique(ds.labels):
    idx = rng.permutation(np.flatnonzero(ds.labels == c))
    n_test = int(round(test * len(idx)))
    n_val = int(round(validation * len(idx)))
    parts["test"].append(idx[:n_test])
    parts["validation"].append(idx[n_test : n_test + n_val])
    parts["train"].append(idx[n_test + n_val :])
  out = {}
  for k, v in parts.items():
    idx = np.sort(np.concatenate(v)) if v else np.zeros(0, int)
    sub = ds.take(idx)
    out[k] = dataclasses.replace(sub, name=f"{ds.name}/{k}")
  return out


def batch_indices(
    n: int, batch_size: int, step: int, *, seed: int = 0
) -> np.ndarray:
  """Indices of the examples in batch number ``step`` of an endless stream.

  Epoch ``e`` is a permutation seeded by ``(seed, e)``; batches never cross
  epochs (the last partial batch of each epoch is dropped). A pure function
  of ``step``, so a resumed run sees exactly the batches an uninterrupted
  one would.
  """
  if batch_size < 1 or n < batch_size:
    raise ValueError(f"batch_size={batch_size} must be in [1, {n}]")
  per_epoch = n // batch_size
  epoch, i = divmod(int(step), per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return perm[i * batch_size : (i + 1) * batch_size]


def batches(
    ds: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    start_step: int = 0,
    drop_remainder: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Batches ``(images, labels)``.

  ``shuffle=True`` gives the endless training stream of
  :func:`batch_indices` starting at ``start_step``; otherwise one ordered
  pass (evaluation), the last batch partial unless ``drop_remainder``.
  """
  if shuffle:
    step = start_step
    while True:
      idx = batch_indices(len(ds), batch_size, step, seed=seed)
      yield ds.images[idx], ds.labels[idx]
      step += 1
  else:
    stop = len(ds) - (len(ds) % batch_size if drop_remainder else 0)
    for i in range(0, stop, batch_size):
      yield ds.images[i : i + batch_size], ds.labels[i : i + batch_size]


def augment(
    key: jax.Array,
    images: jax.Array,
    *,
    max_shift: int = 1,
    noise: float = 0.0,
) -> jax.Array:
  """Random translation by up to ``max_shift`` pixels (zero fill) + noise.

  Pure and jittable; one shift per image drawn from ``key``.
  """
  b, h, w = images.shape[:3]
  k1, k2 = jax.random.split(key)
  if max_shift:
    shifts = jax.random.randint(k1, (b, 2), -max_shift, max_shift + 1)
    pad = [(0, 0), (max_shift, max_shift), (max_shift, max_shift)]
    pad += [(0, 0)] * (images.ndim - 3)
    padded = jnp.pad(images, pad)

    def crop(img, s):
      start = (max_shift - s[0], max_shift - s[1]) + (0,) * (images.ndim - 3)
      return jax.lax.dynamic_slice(img, start, images.shape[1:])

    images = jax.vmap(crop)(padded, shifts)
  if noise:
    images = images + noise * jax.random.normal(k2, images.shape, images.dtype)
  return images


# Input shifts that turn one data set into several tasks.
TRANSFORMS = {
    "none": lambda x: x,
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "flip_lr": lambda x: x[:, :, ::-1],
    "flip_ud": lambda x: x[:, ::-1],
    "invert": lambda x: 1.0 - x,
    "transpose": lambda x: np.swapaxes(x, 1, 2),
}


def transform(ds: Dataset, name: str) -> Dataset:
  """``ds`` with an input shift from :data:`TRANSFORMS` applied to images.

  >>> ds = Dataset(np.arange(4.0).reshape(1, 2, 2, 1), np.zeros(1, int), 1)
  >>> transform(ds, "flip_lr").images[0, ..., 0].tolist()
  [[1.0, 0.0], [3.0, 2.0]]
  """
  if name not in TRANSFORMS:
    raise ValueError(f"unknown transform {name!r}; known: {sorted(TRANSFORMS)}")
  images = np.ascontiguousarray(TRANSFORMS[name](ds.images), np.float32)
  suffix = "" if name == "none" else f"+{name}"
  return dataclasses.replace(ds, images=images, name=ds.name + suffix)


def resize(ds: Dataset, size: int | tuple[int, int]) -> Dataset:
  """``ds`` with its images resized to ``size`` (``int`` = square).

  Bilinear interpolation, antialiased when shrinking (so 28x28 Fashion-MNIST
  and 8x8 digits meet at a common resolution); values stay in [0, 1].

  >>> ds = Dataset(np.ones((2, 8, 8, 1), np.float32), np.zeros(2, int), 1)
  >>> resize(ds, 16).images.shape, float(resize(ds, 4).images.max())
  ((2, 16, 16, 1), 1.0)
  """
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  if h < 1 or w < 1:
    raise ValueError(f"size must be positive, got {size!r}")
  n, h0, w0, c = ds.images.shape
  if (h0, w0) == (h, w):
    return ds
  if n == 0:
    return dataclasses.replace(ds, images=np.zeros((0, h, w, c), np.float32))
  fn = jax.jit(
      lambda x: jax.image.resize(
          x, (x.shape[0], h, w, c), method="linear", antialias=True
      )
  )
  out = [
      np.asarray(fn(jnp.asarray(ds.images[i : i + 4096])))
      for i in range(0, n, 4096)
  ]
  images = np.clip(np.concatenate(out), 0.0, 1.0)
  return dataclasses.replace(ds, images=images.astype(np.float32))


def rotation_prediction(ds: Dataset) -> Dataset:
  """Self-supervised rotation prediction (Gidaris et al., 2018).

  Every image appears four times, rotated by k·90°, labelled k; a backbone
  pretrained on it learns features without the task labels.

  >>> ds = Dataset(np.zeros((2, 3, 3, 1), np.float32), np.zeros(2, int), 1)
  >>> r = rotation_prediction(ds)
  >>> len(r), r.num_classes, r.labels.tolist()
  (8, 4, [0, 0, 1, 1, 2, 2, 3, 3])
  """
  images = np.concatenate(
      [np.rot90(ds.images, k, axes=(1, 2)) for k in range(4)]
  )
  labels = np.repeat(np.arange(4, dtype=np.int32), len(ds))
  return Dataset(
      np.ascontiguousarray(images, np.float32),
      labels,
      4,
      f"{ds.name}+rotation",
      ("0", "90", "180", "270"),
  )
