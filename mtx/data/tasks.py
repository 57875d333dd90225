"""Multi-task benchmark suites: named tasks with train/validation/test splits.

The offline suite ``offline8`` is a small replica of the field's 8-task
benchmark (CLIP ViT-B/32 on SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB,
MNIST, DTD), built from real data that needs no download: scikit-learn's 8x8
digits and Fashion-MNIST (Debian package ``dataset-fashion-mnist``). Its
tasks differ the way the real ones do: in source (handwriting vs clothing
photos), in label set (10 digits, parity, 10 garments, 4 upper-body
garments, 3 kinds of footwear) and in input statistics (inverted intensities,
mirrored images). Every image is resized to a common resolution. The
upper-body garments of ``fashion_tops`` are the confusable Fashion-MNIST
classes, so that task gains most from fine-tuning.

| task | source | classes | input shift | labels | in `offline8` |
|---|---|---|---|---|---|
| `digits` | digits | 10 | none | digit 0-9 | yes |
| `digits_inverted` | digits | 10 | 1 - x | digit 0-9 | yes |
| `digits_mirrored` | digits | 10 | left-right flip | digit 0-9 | yes |
| `digits_parity` | digits | 2 | none | even / odd | yes |
| `fashion` | fashion_mnist | 10 | none | 10 garments | yes |
| `fashion_inverted` | fashion_mnist | 10 | 1 - x | 10 garments | yes |
| `fashion_tops` | fashion_mnist | 4 | none | T-shirt / pullover / coat / shirt | yes |
| `fashion_footwear` | fashion_mnist | 3 | none | sandal / sneaker / ankle boot | yes |
| `fashion_coarse` | fashion_mnist | 4 | none | upper body / lower body or dress / footwear / bag | no |

Splits: validation is carved from the source's train split (stratified,
seeded, :func:`mtx.data.split`); test is the source's test split (digits: the
fixed 20% that :func:`mtx.data.load` holds out). Optional caps subsample
train and test (stratified, deterministic) to fit a CPU budget. Tasks whose
source is missing (Fashion-MNIST not installed) are skipped with the reason;
``digits4`` is the four digits tasks alone.

The canonical benchmark itself (``CLIP8``) is read from image folders
``<data_dir>/<task>/<split>/<class_name>/*.png`` (:func:`load_image_folder`)
or, if ``tensorflow_datasets`` is installed, from TFDS (:func:`load_tfds`).

>>> tasks, skipped = load_suite(["digits", "digits_parity"], image_size=8)
>>> sorted(tasks), tasks["digits_parity"]["train"].class_names
(['digits', 'digits_parity'], ('even', 'odd'))
>>> [len(tasks["digits"][s]) for s in ("train", "validation", "test")]
[1295, 143, 359]
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mtx.data import _core
from mtx.data._core import Dataset


@dataclasses.dataclass(frozen=True)
class Task:
  """A task: a source data set, an input shift and a label map.

  Attributes:
    name: the task's name.
    source: a data set :func:`mtx.data.load` knows (``"digits"``,
      ``"fashion_mnist"``).
    transform: an input shift from :data:`mtx.data.TRANSFORMS`.
    label_map: source label -> task label, ``-1`` drops the class; None keeps
      the source's labels.
    class_names: the task's class names (None: the source's).
    description: one line for tables.
  """

  name: str
  source: str
  transform: str = "none"
  label_map: tuple[int, ...] | None = None
  class_names: tuple[str, ...] | None = None
  description: str = ""


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("digits", "digits", description="handwritten digits 0-9"),
        Task(
            "digits_inverted",
            "digits",
            "invert",
            description="digits, inverted intensities",
        ),
        Task(
            "digits_mirrored",
            "digits",
            "flip_lr",
            description="digits, mirrored left-right",
        ),
        Task(
            "digits_parity",
            "digits",
            label_map=(0, 1) * 5,
            class_names=("even", "odd"),
            description="parity of the digit",
        ),
        Task("fashion", "fashion_mnist", description="10 kinds of garment"),
        Task(
            "fashion_inverted",
            "fashion_mnist",
            "invert",
            description="garments, inverted intensities",
        ),
        Task(
            "fashion_tops",
            "fashion_mnist",
            label_map=(0, -1, 1, -1, 2, -1, 3, -1, -1, -1),
            class_names=("T-shirt/top", "Pullover", "Coat", "Shirt"),
            description="4 confusable upper-body garments",
        ),
        Task(
            "fashion_coarse",
            "fashion_mnist",
            # T-shirt, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker,
            # Bag, Ankle boot.
            label_map=(0, 1, 0, 1, 0, 2, 0, 2, 3, 2),
            class_names=(
                "upper body",
                "lower body or dress",
                "footwear",
                "bag",
            ),
            description="4 coarse garment groups",
        ),
        Task(
            "fashion_footwear",
            "fashion_mnist",
            label_map=(-1, -1, -1, -1, -1, 0, -1, 1, -1, 2),
            class_names=("sandal", "sneaker", "ankle boot"),
            description="3 kinds of footwear",
        ),
    )
}

SUITES: dict[str, tuple[str, ...]] = {
    "offline8": (
        "digits",
        "digits_inverted",
        "digits_mirrored",
        "digits_parity",
        "fashion",
        "fashion_inverted",
        "fashion_tops",
        "fashion_footwear",
    ),
    "digits4": (
        "digits",
        "digits_inverted",
        "digits_mirrored",
        "digits_parity",
    ),
}


def relabel(
    ds: Dataset,
    label_map: Sequence[int],
    class_names: Sequence[str] | None = None,
) -> Dataset:
  """Maps labels through ``label_map`` (``-1`` drops the example).

  >>> ds = Dataset(np.zeros((4, 1, 1, 1)), np.array([0, 1, 2, 1]), 3)
  >>> r = relabel(ds, (-1, 0, 1))
  >>> r.labels.tolist(), r.num_classes
  ([0, 1, 0], 2)
  """
  m = np.asarray(label_map, np.int64)
  if len(m) < ds.num_classes:
    raise ValueError(
        f"label_map has {len(m)} entries, {ds.name!r} has"
        f" {ds.num_classes} classes"
    )
  mapped = m[ds.labels]
  keep = np.flatnonzero(mapped >= 0)
  num_classes = int(m.max()) + 1
  if class_names is not None and len(class_names) != num_classes:
    raise ValueError(
        f"{len(class_names)} class names for {num_classes} classes"
    )
  return Dataset(
      ds.images[keep],
      mapped[keep].astype(np.int32),
      num_classes,
      ds.name,
      tuple(class_names or ()),
  )


def subsample(ds: Dataset, n: int | None, *, seed: int = 0) -> Dataset:
  """About ``n`` examples, stratified and deterministic (all if ``n`` is
  None or at least ``len(ds)``)."""
  if n is None or n >= len(ds):
    return ds
  if n < 1:
    raise ValueError(f"cannot subsample {ds.name!r} to {n} examples")
  drop = 1.0 - n / len(ds)
  out = _core.split(ds, validation=0.0, test=drop, seed=seed)["train"]
  return dataclasses.replace(out, name=ds.name)


def _seed(*parts) -> int:
  return int.from_bytes(
      hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little"
  )


def source_missing(
    source: str, data_dir: str | os.PathLike | None = None
) -> str | None:
  """Why ``source`` cannot be loaded here (None if it can); IDX sources are
  looked for as :func:`mtx.data.idx_directory` does."""
  if source == "digits":
    try:
      import sklearn  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      return "scikit-learn is not installed (pip install scikit-learn)"
    return None
  if source in _core.IDX_LOCATIONS:
    hint = _core.IDX_LOCATIONS[source][1]
    directory = _core.idx_directory(source, data_dir)
    stem = Path(directory) / "train-images-idx3-ubyte"
    if stem.exists() or stem.with_name(stem.name + ".gz").exists():
      return None
    looked = [str(directory)]
    for root in (data_dir, os.environ.get(_core.DATA_DIR_ENV)):
      if root and str(root) not in looked:
        looked.insert(0, str(root))
    return f"no {source} files in {', '.join(looked)} ({hint})"
  return f"unknown source {source!r}"


def make_task(
    task: Task,
    raw: dict[str, Dataset],
    *,
    image_size: int | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    validation: float = 0.1,
    seed: int = 0,
) -> dict[str, Dataset]:
  """A task's ``{"train", "validation", "test"}`` from its source's splits.

  Relabels, subsamples (``max_train`` caps train + validation), carves the
  validation split from train, applies the input shift and resizes.
  """
  out = {}
  parts = {"train": raw["train"], "test": raw["test"]}
  if task.label_map is not None:
    parts = {
        k: relabel(v, task.label_map, task.class_names)
        for k, v in parts.items()
    }
  train = subsample(parts["train"], max_train, seed=_seed(task.source, seed))
  s = _core.split(train, validation=validation, seed=seed)
  out = {
      "train": s["train"],
      "validation": s["validation"],
      "test": subsample(parts["test"], max_test, seed=_seed(task.source, seed)),
  }
  names = tuple(task.class_names or raw["train"].class_names)
  for k, v in out.items():
    v = _core.transform(v, task.transform)
    if image_size is not None:
      v = _core.resize(v, image_size)
    out[k] = dataclasses.replace(v, name=f"{task.name}/{k}", class_names=names)
  return out


def load_suite(
    names: str | Sequence[str] = "offline8",
    *,
    image_size: int | None = 16,
    max_train: int | None = None,
    max_test: int | None = None,
    validation: float = 0.1,
    seed: int = 0,
    tasks: dict[str, Task] | None = None,
    log: Callable[[str], None] | None = None,
    data_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, dict[str, Dataset]], dict[str, str]]:
  """Loads a suite's tasks; tasks whose source is missing are skipped.

  Args:
    names: a key of :data:`SUITES` or a list of task names.
    image_size: common square resolution (None keeps each source's).
    max_train: cap on train + validation examples per task (stratified
      subsample); None uses everything.
    max_test: cap on test examples per task.
    validation: fraction of train carved out as validation.
    seed: split and subsample seed.
    tasks: task definitions (default :data:`TASKS`).
    log: called with a line for each skipped task, and for each IDX
      source with the folder it was read from (saying so when a given
      ``data_dir`` or ``$MTX_DATA_DIR`` did not hold it).
    data_dir: where IDX sources are looked for first (then
      ``$MTX_DATA_DIR``, then the packaged location; see
      :func:`mtx.data.idx_directory`).

  Returns:
    ``(tasks, skipped)``: ``{name: {"train", "validation", "test"}}`` in
    suite order, and ``{name: reason}`` for the tasks left out.

  Raises:
    ValueError: an unknown suite or task name.
  """
  defs = TASKS if tasks is None else tasks
  if isinstance(names, str):
    if names not in SUITES:
      raise ValueError(f"unknown suite {names!r}; known: {sorted(SUITES)}")
    names = SUITES[names]
  unknown = [n for n in names if n not in defs]
  if unknown:
    raise ValueError(f"unknown task(s) {unknown}; known: {sorted(defs)}")
  sources, out, skipped = {}, {}, {}
  for n in names:
    t = defs[n]
    if t.source not in sources:
      why = source_missing(t.source, data_dir)
      sources[t.source] = (
          why if why else _core.load(t.source, data_dir=data_dir)
      )
      if not why and log is not None and t.source in _core.IDX_LOCATIONS:
        log(_core.idx_origin(t.source, data_dir))
    raw = sources[t.source]
    if isinstance(raw, str):
      skipped[n] = raw
      if log is not None:
        log(f"skipping task {n}: {raw}")
      continue
    out[n] = make_task(
        t,
        raw,
        image_size=image_size,
        max_train=max_train,
        max_test=max_test,
        validation=validation,
        seed=seed,
    )
  return out, skipped


# ----------------------------------------------------------------------------
# The canonical 8-task CLIP benchmark, from files the user has.

CLIP8 = (
    "SUN397",
    "Cars",
    "RESISC45",
    "EuroSAT",
    "SVHN",
    "GTSRB",
    "MNIST",
    "DTD",
)

# TFDS names of the CLIP8 data sets (None: not in the TFDS catalog).
TFDS_NAMES = {
    "SUN397": "sun397",
    "Cars": "cars196",
    "RESISC45": "resisc45",
    "EuroSAT": "eurosat/rgb",
    "SVHN": "svhn_cropped",
    "GTSRB": None,
    "MNIST": "mnist",
    "DTD": "dtd",
}

# One prompt template per task, from the task-vectors reference's lists; the
# zero-shot head averages the text embeddings over a task's templates.
TEMPLATES = {
    "SUN397": ("a photo of a {}.", "a photo of the {}."),
    "Cars": (
        "a photo of a {}.",
        "a photo of my {}.",
        "a photo of the {}, a type of car.",
    ),
    "RESISC45": ("satellite imagery of {}.", "aerial imagery of {}."),
    "EuroSAT": ("a centered satellite photo of {}.",),
    "SVHN": ('a photo of the number: "{}".',),
    "GTSRB": ('a zoomed in photo of a "{}" traffic sign.',),
    "MNIST": ('a photo of the number: "{}".',),
    "DTD": ("a photo of a {} texture.", "a photo of a {} pattern."),
}
DEFAULT_TEMPLATES = ("a photo of a {}.",)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _read_image(path: Path, size: int | None, channels: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(path) as im:
    im = im.convert("RGB" if channels == 3 else "L")
    if size is not None and im.size != (size, size):
      im = im.resize((size, size), Image.BICUBIC)
    a = np.asarray(im, np.float32) / 255.0
  return a[..., None] if channels == 1 else a


def load_image_folder(
    root: str | os.PathLike,
    *,
    image_size: int | None = None,
    channels: int = 3,
    max_per_split: int | None = None,
    seed: int = 0,
) -> dict[str, Dataset]:
  """Reads ``<root>/<split>/<class_name>/*.png`` (or .jpg...) image folders.

  Class names are the sorted union of the class folders over all splits
  (``_`` read as a space), so labels agree across splits. Images are
  converted to RGB (``channels=3``) or grey, resized (bicubic) to
  ``image_size`` and scaled to [0, 1].

  Returns:
    ``{split: Dataset}`` for every split folder found.

  Raises:
    FileNotFoundError: no split folders or no images, naming the folder.
  """
  root = Path(root)
  splits = (
      sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
  )
  if not splits:
    raise FileNotFoundError(
        f"{root}: expected image folders <split>/<class_name>/*.png"
    )
  classes = sorted({c.name for s in splits for c in s.iterdir() if c.is_dir()})
  out = {}
  for s in splits:
    files, labels = [], []
    for i, c in enumerate(classes):
      d = s / c
      if d.is_dir():
        f = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += f
        labels += [i] * len(f)
    if not files:
      raise FileNotFoundError(f"{s}: no images in its class folders")
    labels = np.asarray(labels, np.int32)
    idx = np.arange(len(files))
    if max_per_split is not None and len(files) > max_per_split:
      idx = np.sort(
          np.random.default_rng([seed, len(files)]).permutation(len(files))[
              :max_per_split
          ]
      )
    images = np.stack(
        [_read_image(files[i], image_size, channels) for i in idx]
    )
    out[s.name] = Dataset(
        images,
        labels[idx],
        len(classes),
        f"{root.name}/{s.name}",
        tuple(c.replace("_", " ") for c in classes),
    )
  return out


def load_tfds(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    max_per_split: int | None = None,
) -> dict[str, Dataset]:
  """A TFDS image-classification data set as ``{"train", "test"}``.

  Needs ``tensorflow_datasets`` (not a dependency of mtx) and the data
  prepared in ``data_dir`` (``tfds build`` or ``tfds.load(download=True)``).
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "reading TFDS data needs tensorflow_datasets: pip install"
        " tensorflow-datasets (or provide image folders"
        " <data_dir>/<task>/<split>/<class_name>/*.png)"
    ) from e
  from PIL import Image  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(name, data_dir=data_dir)
  names = tuple(builder.info.features["label"].names)
  out = {}
  for split in ("train", "test"):
    ds = tfds.as_numpy(
        builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    )
    images, labels = [], []
    for x, y in ds:
      im = Image.fromarray(x.squeeze(-1) if x.shape[-1] == 1 else x)
      im = im.convert("RGB")
      if image_size is not None:
        im = im.resize((image_size, image_size), Image.BICUBIC)
      images.append(np.asarray(im, np.float32) / 255.0)
      labels.append(int(y))
      if max_per_split is not None and len(labels) >= max_per_split:
        break
    out[split] = Dataset(
        np.stack(images),
        np.asarray(labels, np.int32),
        len(names),
        f"{name}/{split}",
        tuple(n.replace("_", " ") for n in names),
    )
  return out


def load_folder_suite(
    data_dir: str | os.PathLike,
    names: Sequence[str] = CLIP8,
    *,
    image_size: int | None = None,
    channels: int = 3,
    validation: float = 0.1,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, Dataset]]:
  """The tasks ``names`` from ``data_dir`` (image folders, else TFDS).

  For each task, ``<data_dir>/<task>/{train,test}[/validation]`` image
  folders are used if present; otherwise the task's TFDS data set (when
  ``tensorflow_datasets`` is installed). Without a validation folder,
  validation is carved from train.

  Raises:
    FileNotFoundError: a task with neither, saying how to provide it.
  """
  data_dir = Path(data_dir)
  out = {}
  for n in names:
    folder = data_dir / n
    if folder.is_dir():
      raw = load_image_folder(
          folder,
          image_size=image_size,
          channels=channels,
          max_per_split=None,
          seed=seed,
      )
    else:
      tfds_name = TFDS_NAMES.get(n)
      try:
        import tensorflow_datasets  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import

        have_tfds = True
      except ImportError:
        have_tfds = False
      if tfds_name is None or not have_tfds:
        raise FileNotFoundError(
            f"task {n}: no image folders at {folder}"
            " (expected <split>/<class_name>/*.png with splits train and test)"
            + (
                ""
                if tfds_name is None
                else f", and tensorflow_datasets is not installed to read"
                f" TFDS {tfds_name!r} (pip install tensorflow-datasets)"
            )
        )
      raw = load_tfds(tfds_name, data_dir=data_dir, image_size=image_size)
    missing = {"train", "test"} - set(raw)
    if missing:
      raise FileNotFoundError(
          f"task {n}: no {sorted(missing)} split in {folder}"
      )
    if "validation" in raw:
      parts = {k: raw[k] for k in ("train", "validation", "test")}
      parts["train"] = subsample(parts["train"], max_train, seed=seed)
    else:
      train = subsample(raw["train"], max_train, seed=seed)
      s = _core.split(train, validation=validation, seed=seed)
      parts = {"train": s["train"], "validation": s["validation"]}
      parts["test"] = raw["test"]
    parts["test"] = subsample(parts["test"], max_test, seed=seed)
    out[n] = {
        k: dataclasses.replace(v, name=f"{n}/{k}") for k, v in parts.items()
    }
  return out
