"""mtx.data: loaders on real files, IDX parsing, splits, batches, augment."""

import gzip
import pathlib
import struct

import jax
import numpy as np
import pytest

from mtx import data

_FASHION = data.IDX_LOCATIONS["fashion_mnist"][0]


def _write_idx(path, array, code=0x08, gz=False):
  header = bytes([0, 0, code, array.ndim]) + struct.pack(
      f">{array.ndim}I", *array.shape
  )
  raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  (gzip.open if gz else open)(path, "wb").write(raw)


def test_digits():
  ds = data.load_digits()
  assert ds.images.shape == (1797, 8, 8, 1) and ds.images.dtype == np.float32
  assert 0.0 <= ds.images.min() and ds.images.max() == 1.0
  assert sorted(np.unique(ds.labels)) == list(range(10))


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
  a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  p = tmp_path / ("x.gz" if gz else "x")
  _write_idx(p, a, gz=gz)
  np.testing.assert_array_equal(data.read_idx(p), a)
  f = np.linspace(-1, 1, 6).astype(np.float32).reshape(6)
  _write_idx(tmp_path / "f", f, code=0x0D)
  np.testing.assert_array_equal(data.read_idx(tmp_path / "f"), f)


def test_read_idx_errors(tmp_path):
  (tmp_path / "bad").write_bytes(b"\x01\x00\x08\x01")
  with pytest.raises(ValueError, match="bad magic"):
    data.read_idx(tmp_path / "bad")
  a = np.zeros((3, 2), np.uint8)
  _write_idx(tmp_path / "t", a)
  (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-1])
  with pytest.raises(ValueError, match="truncated"):
    data.read_idx(tmp_path / "t")
  with pytest.raises(FileNotFoundError):
    data.read_idx(tmp_path / "missing")


def test_load_idx_layout_and_missing_files(tmp_path):
  for prefix, n in (("train", 5), ("t10k", 3)):
    _write_idx(
        tmp_path / f"{prefix}-images-idx3-ubyte",
        np.full((n, 4, 4), 255, np.uint8),
    )
    _write_idx(
        tmp_path / f"{prefix}-labels-idx1-ubyte",
        np.arange(n, dtype=np.uint8) % 3,
        gz=False,
    )
  out = data.load_idx(tmp_path, name="mine")
  assert out["train"].images.shape == (5, 4, 4, 1)
  assert out["train"].images.max() == 1.0 and out["test"].num_classes == 3
  with pytest.raises(FileNotFoundError, match="apt-get install"):
    data.load_idx(tmp_path / "empty", name="fashion_mnist")
  with pytest.raises(ValueError, match="unknown data set"):
    data.load("imagenet")


@pytest.mark.skipif(
    not (pathlib.Path(_FASHION) / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST files absent: apt-get install dataset-fashion-mnist",
)
def test_fashion_mnist_real_files():
  d = data.load("fashion_mnist")
  assert d["train"].images.shape == (60000, 28, 28, 1)
  assert d["test"].images.shape == (10000, 28, 28, 1)
  assert np.bincount(d["train"].labels).tolist() == [6000] * 10
  assert d["train"].class_names[0] == "T-shirt/top"


def test_split_deterministic_stratified_disjoint():
  ds = data.load_digits()
  a = data.split(ds, validation=0.1, test=0.2, seed=3)
  b = data.split(ds, validation=0.1, test=0.2, seed=3)
  c = data.split(ds, validation=0.1, test=0.2, seed=4)
  for k in a:
    np.testing.assert_array_equal(a[k].labels, b[k].labels)
    np.testing.assert_array_equal(a[k].images, b[k].images)
  assert not np.array_equal(a["test"].images, c["test"].images)
  assert sum(len(v) for v in a.values()) == len(ds)
  # Stratified: each class keeps its share in validation within 1 example.
  counts = np.bincount(ds.labels)
  np.testing.assert_allclose(
      np.bincount(a["validation"].labels), 0.1 * counts, atol=1
  )
  # A partition: tag every example with its index and check the union.
  tagged = data.Dataset(
      np.arange(len(ds), dtype=np.float32), ds.labels, ds.num_classes
  )
  parts = data.split(tagged, validation=0.1, test=0.2, seed=3)
  ids = np.concatenate([parts[k].images for k in parts]).astype(int)
  assert sorted(ids.tolist()) == list(range(len(ds)))
  with pytest.raises(ValueError, match="fractions"):
    data.split(ds, validation=0.6, test=0.5)


def test_batches_resume_and_epochs():
  ds = data.load_digits().take(slice(0, 100))
  stream = data.batches(ds, 32, shuffle=True, seed=1)
  first = [next(stream)[1] for _ in range(7)]
  resumed = data.batches(ds, 32, shuffle=True, seed=1, start_step=4)
  for i in range(4, 7):
    np.testing.assert_array_equal(next(resumed)[1], first[i])
  # Within an epoch (3 batches) no example repeats.
  idx = np.concatenate(
      [data.batch_indices(100, 32, s, seed=1) for s in range(3)]
  )
  assert len(set(idx.tolist())) == 96
  ordered = list(data.batches(ds, 32))
  assert [len(b[1]) for b in ordered] == [32, 32, 32, 4]
  assert [len(b[1]) for b in data.batches(ds, 32, drop_remainder=True)] == [
      32,
      32,
      32,
  ]


def test_augment_shifts_and_is_deterministic():
  img = np.zeros((2, 5, 5, 1), np.float32)
  img[:, 2, 2] = 1.0
  out = data.augment(jax.random.key(0), img, max_shift=1)
  again = data.augment(jax.random.key(0), img, max_shift=1)
  np.testing.assert_array_equal(out, again)
  assert out.shape == img.shape
  # The single bright pixel moved by at most one in each direction.
  for o in np.asarray(out):
    r, c = np.argwhere(o[..., 0] == 1.0)[0]
    assert abs(r - 2) <= 1 and abs(c - 2) <= 1 and o.sum() == 1.0
  assert data.augment(jax.random.key(0), img, max_shift=0).sum() == 2.0


def _fake_fashion(directory, n_train=40, n_test=20):
  directory.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    _write_idx(
        directory / f"{prefix}-images-idx3-ubyte",
        rng.integers(0, 255, (n, 28, 28)).astype(np.uint8),
    )
    _write_idx(
        directory / f"{prefix}-labels-idx1-ubyte.gz",
        (np.arange(n) % 10).astype(np.uint8),
        gz=True,
    )


def test_idx_directory_order_data_dir_env_default(tmp_path, monkeypatch):
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  default = pathlib.Path(_FASHION)
  assert data.idx_directory("fashion_mnist") == default
  # A root holding the files itself, or a fashion-mnist/ subfolder.
  flat, nested = tmp_path / "flat", tmp_path / "nested"
  _fake_fashion(flat)
  _fake_fashion(nested / "fashion-mnist")
  assert data.idx_directory("fashion_mnist", flat) == flat
  monkeypatch.setenv(data.DATA_DIR_ENV, str(nested))
  assert data.idx_directory("fashion_mnist") == nested / "fashion-mnist"
  # The explicit directory wins over the environment.
  assert data.idx_directory("fashion_mnist", flat) == flat
  # A root without the files falls through to the next candidate.
  assert (
      data.idx_directory("fashion_mnist", tmp_path / "empty")
      == nested / "fashion-mnist"
  )
  loaded = data.load("fashion_mnist")
  assert loaded["train"].images.shape == (40, 28, 28, 1)
  with pytest.raises(ValueError, match="no default location for IDX"):
    data.idx_directory("kmnist")


def test_suite_reads_fashion_from_data_dir(tmp_path, monkeypatch):
  from mtx.data import tasks  # pylint: disable=g-import-not-at-top

  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  monkeypatch.setitem(
      data.IDX_LOCATIONS,
      "fashion_mnist",
      (str(tmp_path / "nowhere"), "install dataset-fashion-mnist"),
  )
  names = ["digits", "fashion_footwear"]
  lines = []
  out, skipped = tasks.load_suite(names, image_size=8, log=lines.append)
  assert list(out) == ["digits"] and set(skipped) == {"fashion_footwear"}
  assert str(tmp_path / "nowhere") in skipped["fashion_footwear"]
  _fake_fashion(tmp_path / "mine" / "fashion-mnist", n_train=100, n_test=50)
  out, skipped = tasks.load_suite(
      names, image_size=8, data_dir=tmp_path / "mine"
  )
  assert list(out) == names and not skipped
  assert out["fashion_footwear"]["test"].num_classes == 3
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "mine"))
  out, skipped = tasks.load_suite(names, image_size=8)
  assert list(out) == names and not skipped


def test_load_suite_says_where_idx_data_came_from(tmp_path, monkeypatch):
  """MTX_DATA_DIR (or data_dir) pointing at a folder without the files used
  to fall back to the packaged location without a word."""
  from mtx.data import tasks  # pylint: disable=g-import-not-at-top

  packaged = tmp_path / "packaged"
  _fake_fashion(packaged, n_train=100, n_test=50)
  monkeypatch.setitem(
      data.IDX_LOCATIONS, "fashion_mnist", (str(packaged), "install it")
  )
  empty = tmp_path / "empty"
  empty.mkdir()
  names = ["digits", "fashion_footwear"]

  def lines_for(**kw):
    lines = []
    tasks.load_suite(names, image_size=8, log=lines.append, **kw)
    return [x for x in lines if x.startswith("fashion_mnist read from")]

  monkeypatch.setenv(data.DATA_DIR_ENV, str(empty))
  (line,) = lines_for()
  assert line.startswith(f"fashion_mnist read from {packaged}")
  assert f"FALLBACK: no fashion_mnist IDX files in $MTX_DATA_DIR={empty}" in (
      line
  )
  (line,) = lines_for(data_dir=empty)
  assert f"data_dir={empty}, $MTX_DATA_DIR={empty}" in line
  # Found where the user pointed: no fallback named.
  mine = tmp_path / "mine"
  _fake_fashion(mine / "fashion-mnist", n_train=100, n_test=50)
  monkeypatch.setenv(data.DATA_DIR_ENV, str(mine))
  (line,) = lines_for()
  assert line == f"fashion_mnist read from {mine / 'fashion-mnist'}"
  # data_dir first: an empty data_dir is named even when the env var holds
  # the files.
  (line,) = lines_for(data_dir=empty)
  assert line.endswith(
      f"(FALLBACK: no fashion_mnist IDX files in data_dir={empty})"
  )
  monkeypatch.delenv(data.DATA_DIR_ENV)
  (line,) = lines_for()
  assert line == f"fashion_mnist read from {packaged}"
