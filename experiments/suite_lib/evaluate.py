"""Stage 4: every merging method, TALL retrieval, cosines and ξ, per mode.

Every merged model is evaluated with each task's own frozen head, as in the
CLIP benchmark; accuracy is top-1, normalized accuracy is accuracy divided by
the individual fine-tuned model's accuracy on the same split. Hyperparameters
come from ``config.grids`` and are chosen on validation: structural ones
(``config.grids.structural.<method>``) compile separately, ``scale`` and the
continuous coefficients (``config.grids.coefficients.<method>``) are swept
by one vmapped program. Each row records its per-example test hits so that
rows can be compared with paired tests (:mod:`.checks`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import mtx
from mtx import checkpoint
from mtx import data as data_lib
from mtx import learned
from mtx import models
from mtx import ntk
from mtx import task_vectors as tv_lib
from mtx import tree as mtree
from mtx.data import tasks as tasks_lib
from mtx.models import intermediates

from experiments.suite_lib import cache
from experiments.suite_lib import checks as checks_lib
from experiments.suite_lib.data import Suite

Log = cache.Log
# Methods whose published form has no scale (a weighted average of the
# models): evaluated at scale 1 only.
SCALE_FREE = (
    "average",
    "weighted_average",
    "model_stock",
    "fisher",
    "regmean",
    "slerp",
)
# Methods whose grid is merged point by point (jax.lax.map) inside the one
# compiled program instead of vmapped: RegMean's batched linear solves, eight
# or more in one program, deadlock XLA's CPU runtime on a 2-thread pool
# (jaxlib 0.10; avoided by XLA_FLAGS=
# --xla_cpu_enable_concurrency_optimized_scheduler=false).
SEQUENTIAL_SWEEP = ("regmean",)


def feature_fn(encoder: models.Model, linearized: bool):
  """``f(params0, params, x) -> features``: the encoder or its linearisation
  at ``params0``."""
  if linearized:
    return ntk.linearize(encoder.apply)
  return lambda params0, params, x: encoder.apply(params, x)


_HITS: dict[Any, Callable] = {}


class Evaluator:
  """Per-example hits and accuracies of stacked encoders ``[S, ...]`` on
  every task of one split, each task through its own frozen head (one
  jitted program per mode)."""

  def __init__(
      self,
      features: Callable,
      params0: Any,
      heads: dict[str, dict],
      data: dict[str, data_lib.Dataset],
      *,
      batch_size: int,
  ):
    self.tasks = list(data)
    t = len(self.tasks)
    cmax = max(h["kernel"].shape[1] for h in heads.values())
    dim = next(iter(heads.values()))["kernel"].shape[0]
    w = np.zeros((t, dim, cmax), np.float32)
    b = np.full((t, cmax), -1e9, np.float32)  # absent classes never win
    for i, n in enumerate(self.tasks):
      k, c = np.asarray(heads[n]["kernel"]), heads[n]["kernel"].shape[1]
      w[i, :, :c] = k
      b[i, :c] = np.asarray(heads[n]["bias"])
    self.w, self.b = jnp.asarray(w), jnp.asarray(b)
    self.params0 = params0
    x = np.concatenate([data[n].images for n in self.tasks])
    y = np.concatenate([data[n].labels for n in self.tasks]).astype(np.int32)
    tid = np.concatenate(
        [np.full(len(data[n]), i, np.int32) for i, n in enumerate(self.tasks)]
    )
    self.tid = tid
    self.n = len(y)
    self.counts = np.bincount(tid, minlength=t).astype(np.float64)
    bs = min(batch_size, len(y))
    pad = (-len(y)) % bs
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y, tid = np.pad(y, (0, pad)), np.pad(tid, (0, pad))
    self.batches = [
        (x[i : i + bs], y[i : i + bs], tid[i : i + bs])
        for i in range(0, len(y), bs)
    ]

    def hits(params0, params_s, w, b, x, y, tid):
      def one(p):
        z = features(params0, p, x)
        logits = jnp.einsum("nd,tdc->ntc", z.astype(jnp.float32), w) + b
        logits = jnp.take_along_axis(logits, tid[:, None, None], 1)[:, 0]
        return jnp.argmax(logits, -1) == y

      return jax.lax.map(one, params_s)

    key = (id(features), t)
    if key not in _HITS:
      _HITS.clear()  # one mode at a time
      _HITS[key] = jax.jit(hits)
    self._hits = _HITS[key]

  def hits(self, params_s) -> np.ndarray:
    """``[S, N]`` per-example hits of stacked encoder params ``[S, ...]``."""
    out = [
        np.asarray(self._hits(self.params0, params_s, self.w, self.b, *batch))
        for batch in self.batches
    ]
    return np.concatenate(out, axis=1)[:, : self.n]

  def accuracies(self, hits: np.ndarray) -> np.ndarray:
    """``[S, T]`` accuracies from ``[S, N]`` hits."""
    per = [
        np.bincount(
            self.tid, weights=h.astype(np.float64), minlength=len(self.tasks)
        )
        for h in np.atleast_2d(hits)
    ]
    return np.asarray(per) / self.counts

  def by_task(self, hits: np.ndarray) -> dict[str, np.ndarray]:
    """``{task: hits}`` of one model's ``[N]`` hits."""
    return {n: hits[self.tid == i] for i, n in enumerate(self.tasks)}

  def own_task(self, hits_s: np.ndarray) -> dict[str, np.ndarray]:
    """``{task t: hits of model t on task t}`` from ``[T, N]`` hits."""
    return {n: hits_s[i][self.tid == i] for i, n in enumerate(self.tasks)}

  def __call__(self, params_s) -> np.ndarray:
    """``[S, T]`` accuracies of stacked encoder params ``[S, ...]``."""
    return self.accuracies(self.hits(params_s))

  def one(self, params) -> np.ndarray:
    """``[N]`` hits of one encoder."""
    return self.hits(jax.tree.map(lambda a: jnp.asarray(a)[None], params))[0]


def method_grid(name: str, config) -> tuple[list[dict], dict[str, list]]:
  """``(structural settings, {coefficient: values})`` of a method, from
  ``config.grids.structural.<name>`` and ``config.grids.coefficients.<name>``.

  Structural settings are compiled separately; coefficients (and ``scale``)
  are traced and swept together in one vmapped program.
  """
  g = config.grids
  structural = [dict(h) for h in (g.structural.get(name) or ({},))]
  coeffs = g.coefficients.get(name) or {}
  return structural, {k: list(v) for k, v in dict(coeffs).items()}


def _grid_points(scales, coeffs: dict[str, list]) -> list[dict[str, float]]:
  pts = [{"scale": float(s)} for s in scales]
  for k, vals in coeffs.items():
    pts = [{**p, k: float(v)} for p in pts for v in vals]
  return pts


def fmt(h: dict) -> str:
  return ", ".join(
      f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in h.items()
  )


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def cap(ds: data_lib.Dataset, n: int | None) -> data_lib.Dataset:
  return tasks_lib.subsample(ds, n or None, seed=0) if n else ds


def _fisher_loss(features):
  def loss(p, example, p0, head):
    x, y = example
    logits = models.heads.apply(head, features(p0, p, x[None]))[0]
    return -jax.nn.log_softmax(logits)[y]

  return loss


class ModeEval:
  """Everything evaluated for one fine-tuning mode."""

  def __init__(
      self, config, suite: Suite, runs: dict[str, Path], mode: str, log: Log
  ):
    self.config, self.mode, self.log = config, mode, log
    self.lin = mode == "linearized"
    self.names = list(suite.tasks)
    self.encoder = suite.encoder
    starts = {n: checkpoint.restore(runs[n] / "pretrained") for n in self.names}
    self.heads = {n: starts[n]["head"] for n in self.names}
    self.params0 = starts[self.names[0]]["encoder"]
    for n in self.names[1:]:  # one shared pretrained encoder
      mtree.assert_same_structure(
          self.params0, starts[n]["encoder"], names=("pretrained", n)
      )
    self.finetuned = [
        checkpoint.restore(runs[n] / "finetuned")["encoder"] for n in self.names
    ]
    self.tvs = [mtree.sub(f, self.params0) for f in self.finetuned]
    self.stacked = mtree.stack(self.tvs)
    self.features = feature_fn(self.encoder, self.lin)
    val = {
        n: cap(suite.tasks[n]["validation"], config.max_val_eval)
        for n in self.names
    }
    self.test_data = {n: suite.tasks[n]["test"] for n in self.names}
    self.train_data = suite.tasks
    kw = dict(batch_size=config.eval_batch_size)
    self.val = Evaluator(self.features, self.params0, self.heads, val, **kw)
    self.test = Evaluator(
        self.features, self.params0, self.heads, self.test_data, **kw
    )
    # Reference hits and accuracies.
    self.pre_hits = self.test.by_task(self.test.one(self.params0))
    ft = mtree.stack(self.finetuned)
    self.ind_val = np.diagonal(self.val(ft)).copy()
    # transfer[t, s]: the model fine-tuned on task t, on task s (test).
    transfer_hits = self.test.hits(ft)
    self.transfer = self.test.accuracies(transfer_hits)
    self.ind_hits = self.test.own_task(transfer_hits)
    self.ind_test = np.diagonal(self.transfer).copy()

  def row(self, hits: dict[str, np.ndarray], hparams=None, **extra) -> dict:
    """A results row from per-task test hits: accuracies, means, binomial
    standard errors of the means, and the packed hits (paired tests)."""
    accs = np.asarray([hits[n].mean() for n in self.names], np.float64)
    counts = np.asarray([len(hits[n]) for n in self.names], np.float64)
    r = {
        "per_task": {n: float(a) for n, a in zip(self.names, accs)},
        "absolute": float(np.mean(accs)),
        "normalized": float(np.mean(accs / self.ind_test)),
        "absolute_se": float(
            np.sqrt(np.sum(accs * (1 - accs) / counts)) / len(accs)
        ),
        "normalized_se": float(
            np.sqrt(np.sum(accs * (1 - accs) / counts / self.ind_test**2))
            / len(accs)
        ),
        "hparams": hparams or {},
        "test_examples": {n: len(hits[n]) for n in self.names},
        "hits": {n: checks_lib.pack_hits(hits[n]) for n in self.names},
    }
    r.update(extra)
    return r

  def _normalized_val(self, accs_st: np.ndarray) -> np.ndarray:
    return np.mean(accs_st / np.maximum(self.ind_val, 1e-12)[None], axis=1)

  def statistics(self, needed: set[str]) -> dict[str, Any]:
    """Fisher / Gram statistics of the fine-tuned encoders (train data),
    by :mod:`mtx.learned.statistics`."""
    out = {}
    n_stat = self.config.statistics_examples
    if "fisher" in needed:
      loss = _fisher_loss(self.features)
      fishers = []
      for i, n in enumerate(self.names):
        d = cap(self.train_data[n]["train"], n_stat)
        fishers.append(
            learned.fisher_diagonal(
                loss,
                self.finetuned[i],
                (d.images, d.labels),
                self.params0,
                self.heads[n],
                batch_size=32,
            )
        )
      out["fisher"] = {"fishers": fishers}
    if "regmean" in needed:
      apply = self.encoder.apply
      inputs_fn = _dense_inputs_fn(apply)
      grams = []
      for i, n in enumerate(self.names):
        d = cap(self.train_data[n]["train"], n_stat)
        # Linearised models: the layer inputs at the linearisation point.
        p = self.params0 if self.lin else self.finetuned[i]
        grams.append(learned.gram_matrices(inputs_fn, p, d.images))
      out["regmean"] = {"grams": grams}
    return out

  def _sweep_fn(self, merger, stats, key):
    """One jitted program: coefficient points ``[S]`` -> merged encoders."""

    @jax.jit
    def merged(stacked, params0, c):
      def one(c1):
        kw = {k: v for k, v in c1.items() if k != "scale"}
        tv = merger.combine(
            stacked,
            stats,
            scale=c1["scale"],
            key=key,
            pretrained=params0 if merger.needs_pretrained else None,
            **kw,
        )
        return jax.tree.map(lambda p, t: (p + t).astype(p.dtype), params0, tv)

      if merger.name in SEQUENTIAL_SWEEP:
        return jax.lax.map(one, c)
      return jax.vmap(one)(c)

    return merged

  def _chunks(self, points: list[dict]) -> tuple[int, list[dict]]:
    """The grid as padded chunks of one compiled size."""
    names = sorted(points[0])
    chunk = min(self.config.sweep_chunk, _pow2(len(points)))
    out = []
    for i in range(0, len(points), chunk):
      part = points[i : i + chunk]
      part = part + [part[-1]] * (chunk - len(part))
      out.append(
          {k: jnp.asarray([p[k] for p in part], jnp.float32) for k in names}
      )
    return chunk, out

  def sweep(self, merged, points: list[dict]) -> np.ndarray:
    """Validation accuracies ``[len(points), T]``: every chunk of grid
    points is merged by one vmapped program and evaluated at once."""
    _, parts = self._chunks(points)
    out = [self.val(merged(self.stacked, self.params0, c)) for c in parts]
    return np.concatenate(out)[: len(points)]

  def method(self, name: str, data: dict[str, Any]) -> dict:
    """One method: grid on validation, the best setting on test."""
    t0 = time.time()
    structurals, coeff_grid = method_grid(name, self.config)
    scales = [1.0] if name in SCALE_FREE else list(self.config.grids.scales)
    points = _grid_points(scales, coeff_grid)
    key = jax.random.key(self.config.seed)
    best = None
    for hp in structurals:
      merger = mtx.merging.get(name, **hp, **(data.get(name) or {}))
      k = key if merger.needs_key else None
      stats = merger.prepare(self.stacked, key=k)
      merged = self._sweep_fn(merger, stats, k)
      val = self._normalized_val(self.sweep(merged, points))
      i = int(np.argmax(val))
      if best is None or val[i] > best[0]:
        best = (float(val[i]), hp, points[i], merged)
    score, hp, point, merged = best
    # The chosen point through the same compiled program (padded chunk).
    _, (c,) = self._chunks([point] * min(len(points), self.config.sweep_chunk))
    params = jax.tree.map(
        lambda a: a[:1], merged(self.stacked, self.params0, c)
    )
    hits = self.test.by_task(self.test.hits(params)[0])
    return self.row(
        hits,
        {**hp, **point},
        val_normalized=score,
        grid_size=len(structurals) * len(points),
        seconds=time.time() - t0,
    )

  def tall_retrieval(self) -> dict:
    """TALL masks: per task ``θ0 + m_t ⊙ τMTL``, λ_t on task t's validation."""
    lams = list(self.config.grids.tall_lambda)
    t = len(self.names)

    @jax.jit
    def retrieved(stacked, params0, lam):
      mtl = tv_lib.multitask_vector(stacked)
      masks = tv_lib.tall_masks(stacked, mtl, lam)
      models_ = jax.tree.map(
          lambda p, v, m: (p[None] + jnp.where(m, v[None], 0)).astype(p.dtype),
          params0,
          mtl,
          masks,
      )
      kept = sum(jnp.sum(m) for m in jax.tree.leaves(masks))
      return models_, kept

    val = np.zeros((len(lams), t))
    for j, lam in enumerate(lams):
      ps, _ = retrieved(self.stacked, self.params0, jnp.full((t,), lam))
      val[j] = np.diagonal(self.val(ps))
    chosen = np.asarray([lams[b] for b in np.argmax(val, axis=0)], np.float32)
    ps, kept = retrieved(self.stacked, self.params0, jnp.asarray(chosen))
    hits = self.test.own_task(self.test.hits(ps))
    self.tall_lambdas = chosen
    return self.row(
        hits,
        {"tall_lambda": [float(x) for x in chosen]},
        mask_density=float(kept) / (t * mtree.num_elements(self.params0)),
    )

  def disentanglement(self, pair: tuple[str, str]) -> dict:
    """ξ(α1, α2) on a grid for two tasks (test images, each its own head),
    with each example's disagreement rate over the grid (paired tests)."""
    a, b = pair
    ia, ib = self.names.index(a), self.names.index(b)
    n = self.config.xi_examples
    xa = cap(self.test_data[a], n).images
    xb = cap(self.test_data[b], n).images
    alphas = np.asarray(self.config.xi_alphas, np.float32)

    def with_head(name):
      head = self.heads[name]
      return lambda p, x: models.heads.apply(head, self.encoder.apply(p, x))

    e1, e2 = ntk.disentanglement_error(
        with_head(a),
        self.params0,
        self.tvs[ia],
        self.tvs[ib],
        xa,
        xb,
        alphas,
        alphas,
        linearized=self.lin,
        apply_fn2=with_head(b),
        per_example=True,
    )
    grid = e1.mean(-1) + e2.mean(-1)
    u1, u2 = e1.mean((0, 1)), e2.mean((0, 1))
    se = float(np.sqrt(u1.var(ddof=1) / len(u1) + u2.var(ddof=1) / len(u2)))
    return {
        "pair": [a, b],
        "alphas": alphas.tolist(),
        "grid": grid.tolist(),
        "mean": float(grid.mean()),
        "se": se,
        "per_example": [u1.tolist(), u2.tolist()],
    }


_DENSE_INPUTS: dict[int, Callable] = {}


def _dense_inputs_fn(apply):
  """One ``inputs_fn`` object per encoder, so Gram programs compile once."""
  if id(apply) not in _DENSE_INPUTS:
    _DENSE_INPUTS.clear()
    _DENSE_INPUTS[id(apply)] = lambda p, x: intermediates.dense_inputs(
        apply, p, x
    )[1]
  return _DENSE_INPUTS[id(apply)]


def task_limits(name: str, t: int) -> str | None:
  """Why method ``name`` cannot merge ``t`` models (None if it can)."""
  lo, hi = mtx.merging.task_limits(name)
  if t >= lo and (hi is None or t <= hi):
    return None
  if hi == lo:
    takes = f"exactly {lo}"
  elif hi is None:
    takes = f"at least {lo}"
  else:
    takes = f"{lo} to {hi}"
  return f"merges {takes} models; the suite has {t}"


def evaluate_mode(config, suite: Suite, runs, mode: str, log: Log) -> dict:
  """Stage 4 for one mode."""
  ev = ModeEval(config, suite, runs, mode, log)
  rows = {
      "pretrained": ev.row(ev.pre_hits),
      "individual": ev.row(ev.ind_hits),
  }
  log(
      f"[evaluate {mode}] pretrained {rows['pretrained']['absolute']:.3f},"
      f" individual {rows['individual']['absolute']:.3f} (test, mean)"
  )
  methods = cache.as_list(config.methods) or list(mtx.merging.METHODS)
  unknown = sorted(set(methods) - set(mtx.merging.METHODS))
  if unknown:
    raise ValueError(f"unknown merging method(s) {unknown}")
  skipped, runnable = {}, []
  for name in methods:
    why = task_limits(name, len(ev.names))
    if why:
      skipped[name] = why
    else:
      runnable.append(name)
  # TALL masks first: Consensus uses the per-task λ chosen here.
  t0 = time.time()
  rows["tall_mask_retrieval"] = ev.tall_retrieval()
  rows["tall_mask_retrieval"]["seconds"] = time.time() - t0
  data = ev.statistics(set(runnable))
  if "consensus" in runnable:
    data["consensus"] = {"tall_lambda": jnp.asarray(ev.tall_lambdas)}
  t_start = time.time()
  for i, name in enumerate(runnable):
    r = ev.method(name, data)
    if name == "consensus":
      r["hparams"]["tall_lambda"] = [float(x) for x in ev.tall_lambdas]
    rows[name] = r
    el = time.time() - t_start
    hp = {k: v for k, v in r["hparams"].items() if not isinstance(v, list)}
    log(
        f"[evaluate {mode} {i + 1}/{len(runnable)}: {name}] {fmt(hp)}"
        f" -> test abs {r['absolute']:.3f} norm {r['normalized']:.3f};"
        f" ETA {el / (i + 1) * (len(runnable) - i - 1):.0f}s"
    )
  cos = np.asarray(tv_lib.cosine_matrix(ev.tvs))
  xi = [ev.disentanglement(p) for p in xi_pairs(config, ev.names)]
  return {
      "rows": rows,
      "skipped_methods": skipped,
      "cosine": cos.tolist(),
      "transfer": ev.transfer.tolist(),
      "xi": xi,
      "task_vector_norms": [float(mtree.l2_norm(x)) for x in ev.tvs],
  }


def xi_pairs(config, names: Sequence[str]) -> list[tuple[str, str]]:
  pairs = []
  for p in cache.as_list(config.xi_pairs):
    a, b = p.split(":")
    if a in names and b in names:
      pairs.append((a, b))
  return pairs or [(names[0], names[1])]
