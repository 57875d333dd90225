"""Models as pairs of pure functions; the only package that imports flax.

Every model is a :class:`Model`: ``init(key) -> params`` and
``apply(params, *inputs) -> outputs``, both pure, so they jit, vmap,
differentiate, shard and linearise (:func:`mtx.ntk.linearize`) like any JAX
function. Encoders return features; a classifier pairs an encoder with a
separate head, ``params = {"encoder": ..., "head": ...}``, so heads can be
frozen, refitted or swapped without touching the encoder.

>>> import jax, mtx
>>> model = mtx.models.get("mlp", hidden=(16,))
>>> params = model.init(jax.random.key(0), jax.numpy.zeros((1, 8)))
>>> model.apply(params, jax.numpy.ones((2, 8))).shape
(2, 16)
>>> clf = mtx.models.classifier(model, num_classes=3)
>>> p = clf.init(jax.random.key(0), jax.numpy.zeros((1, 8)))
>>> sorted(p), clf.apply(p, jax.numpy.ones((2, 8))).shape
(['encoder', 'head'], (2, 3))
"""

from mtx.models import bert
from mtx.models import clip
from mtx.models import cnn
from mtx.models import heads
from mtx.models import lm
from mtx.models import mlp
from mtx.models import moe_transformer
from mtx.models import vit
from mtx.models._base import Model
from mtx.models._base import classifier
from mtx.models._base import count_params

# Model name -> factory(config) -> Model. Each factory's module has a
# ``Config`` dataclass and a ``CONFIGS`` dict of named presets.
MODELS = {
    "mlp": mlp,
    "cnn": cnn,
    "vit": vit,
    "bert": bert,
    "clip": clip,
    "lm": lm,
    "moe_transformer": moe_transformer,
}


def get(name: str, preset: str | None = None, **overrides) -> Model:
  """Builds a registered model from a named preset and/or field overrides.

  Args:
    name: a key of :data:`MODELS`.
    preset: a key of the model module's ``CONFIGS`` (default: its
      ``Config()`` defaults).
    **overrides: ``Config`` fields to replace.

  Returns:
    The :class:`Model`.

  Raises:
    ValueError: unknown model, preset or config field.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
  module = MODELS[name]
  if preset is None:
    config = module.Config()
  elif preset in module.CONFIGS:
    config = module.CONFIGS[preset]
  else:
    raise ValueError(
        f"unknown {name} preset {preset!r}; known: {sorted(module.CONFIGS)}"
    )
  fields = set(config.__dataclass_fields__)
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(
        f"unknown {name} config field(s) {bad}; known: {sorted(fields)}"
    )
  if overrides:
    import dataclasses  # pylint: disable=g-import-not-at-top

    config = dataclasses.replace(config, **overrides)
  return module.model(config)


__all__ = [
    "MODELS",
    "Model",
    "bert",
    "classifier",
    "clip",
    "cnn",
    "count_params",
    "get",
    "heads",
    "lm",
    "mlp",
    "moe_transformer",
    "vit",
]
