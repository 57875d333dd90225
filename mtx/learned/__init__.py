"""Data-driven merging: the statistics it consumes.

Modules:
  statistics: empirical diagonal Fisher information (Fisher merging) and
    Gram matrices of layer inputs (RegMean), as pure functions of params and
    examples.
"""

from mtx.learned import statistics
from mtx.learned.statistics import fisher_diagonal
from mtx.learned.statistics import gram_matrices

__all__ = ["fisher_diagonal", "gram_matrices", "statistics"]
