"""mtx's absl binaries and their flag-free libraries.

Every binary runs both as ``python experiments/X.py`` and as
``python -m experiments.X`` from the repository root, and imports its
libraries as ``from experiments import X_lib``. A binary starts with::

  if __package__ in (None, ""):  # run as a script: python experiments/X.py
    import pathlib, sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

so that the script form finds the ``experiments`` package too.
"""
