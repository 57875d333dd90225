"""Folders written atomically: staged beside the target, renamed into place.

A writer fills a *staging* folder ``.<name>.partial-<random>/`` beside the
target ``<name>``; :meth:`Staging.commit` renames its payload onto the
target (an existing target, only with ``overwrite``, is first moved into the
staging folder and removed once the new one is in place), so readers see the
old folder or the new one, never a half-written one.

Every staging folder carries a marker, ``mtx-partial.json``, naming the
process that owns it (host, pid, the process's start time and a random
token) and the target's real path. A process killed mid-write (``kill -9``)
leaves its staging folder behind; :func:`reclaim` (run by :func:`stage`
before it creates a new one) removes the staging folders of the same target
whose owner is gone, and only those: folders without the marker, folders of
another target, and folders owned by a live process or by another host are
left alone. A target that was moved aside but not yet replaced when its
writer died is moved back first.

>>> import os, tempfile
>>> d = tempfile.mkdtemp()
>>> with stage(os.path.join(d, "out")) as s:
...   with open(os.path.join(s.path, "x.txt"), "w") as f:
...     _ = f.write("hi")
...   s.commit()
>>> sorted(os.listdir(d)), sorted(os.listdir(os.path.join(d, "out")))
(['out'], ['x.txt'])
"""

from __future__ import annotations

from collections.abc import Iterable
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time

PathLike = str | os.PathLike
MARKER = "mtx-partial.json"
_PAYLOAD = "payload"
_OLD = "old"
_log = logging.getLogger(__name__)


def occupied(path: PathLike) -> bool:
  """Whether ``path`` exists and is not an empty folder (which a rename
  replaces atomically)."""
  path = os.fspath(path)
  if not os.path.lexists(path):
    return False
  return not (
      os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)
  )


def umask() -> int:
  """The process's file-creation mask."""
  mask = os.umask(0)
  os.umask(mask)
  return mask


def fsync_dir(path: PathLike) -> None:
  """Flushes a folder's entries (renames) to disk where the OS allows."""
  try:
    fd = os.open(os.fspath(path), os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.unlink(path)


def move_into_place(
    tmp: PathLike,
    target: PathLike,
    overwrite: bool,
    *,
    aside: str | None = None,
) -> None:
  """Renames folder ``tmp`` to ``target``.

  An existing ``target`` (only with ``overwrite``) is renamed to ``aside``
  (default: a hidden name beside it) first, and removed once ``tmp`` is in
  place; if the rename of ``tmp`` fails, it is moved back.

  Raises:
    FileExistsError: ``target`` exists and not ``overwrite``.
  """
  tmp, target = os.fspath(tmp), os.fspath(target)
  old = None
  if occupied(target):
    if not overwrite:
      raise FileExistsError(
          f"{target} exists; pass overwrite=True (--overwrite) to replace it"
      )
    old = aside
    if old is None:
      old = tempfile.mkdtemp(
          dir=os.path.dirname(target),
          prefix=f".{os.path.basename(target)}.old-",
      )
      os.rmdir(old)
    os.rename(target, old)
  try:
    os.rename(tmp, target)
  except BaseException:
    if old is not None:
      os.rename(old, target)
    raise
  fsync_dir(os.path.dirname(target))
  if old is not None:
    _remove(old)


def overlapping(a: PathLike, b: PathLike) -> bool:
  """Whether the real paths of ``a`` and ``b`` are equal or one is inside
  the other (symlinks resolved, however the paths are spelt)."""
  ra, rb = os.path.realpath(os.fspath(a)), os.path.realpath(os.fspath(b))
  if ra == rb:
    return True
  return ra.startswith(rb.rstrip(os.sep) + os.sep) or rb.startswith(
      ra.rstrip(os.sep) + os.sep
  )


def check_disjoint(out: PathLike, inputs: Iterable[PathLike]) -> None:
  """Raises ``ValueError`` if the output ``out`` overlaps an input (the
  same real path, or one inside the other)."""
  for src in inputs:
    if overlapping(out, src):
      raise ValueError(
          f"the output {os.fspath(out)} overlaps the input {os.fspath(src)} "
          f"(real paths {os.path.realpath(os.fspath(out))} and "
          f"{os.path.realpath(os.fspath(src))}); write the output elsewhere"
      )


# ----------------------------------------------------------------------------
# Staging folders and their owners.


def _start_time(pid: int) -> str | None:
  """The start time of process ``pid`` (clock ticks since boot, from
  /proc), which tells a pid reused by another process apart; None where
  /proc is not available."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      stat = f.read()
  except OSError:
    return None
  return stat.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, owned by another user
  now = _start_time(pid)
  return start is None or now is None or now == start


def _prefix(target: str) -> str:
  return f".{os.path.basename(target)}.partial-"


def read_marker(folder: PathLike) -> dict | None:
  """The owner marker of a staging folder, or None (no marker, unreadable)."""
  try:
    with open(os.path.join(os.fspath(folder), MARKER), encoding="utf-8") as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  return marker if isinstance(marker, dict) else None


def reclaim(target: PathLike) -> list[str]:
  """Removes stale staging folders of ``target``; returns their paths.

  Stale: in ``target``'s folder, named ``.<name>.partial-*``, holding a
  marker for the same real target, written on this host by a process that
  has exited. A target moved aside into such a folder (its writer died
  between moving it aside and moving the new one in) is moved back first.
  Each removal is logged.
  """
  target = os.path.abspath(os.fspath(target))
  parent = os.path.dirname(target)
  try:
    names = sorted(os.listdir(parent))
  except OSError:
    return []
  real = os.path.realpath(target)
  host = socket.gethostname()
  removed = []
  for name in names:
    if not name.startswith(_prefix(target)):
      continue
    folder = os.path.join(parent, name)
    if os.path.islink(folder) or not os.path.isdir(folder):
      continue
    marker = read_marker(folder)
    if marker is None:
      _log.info("leaving %s: no %s (not made by mtx)", folder, MARKER)
      continue
    if marker.get("target") != real:
      continue
    if marker.get("host") != host:
      _log.info(
          "leaving %s: written on host %s, which may still be running",
          folder,
          marker.get("host"),
      )
      continue
    pid = marker.get("pid")
    if not isinstance(pid, int) or _alive(pid, marker.get("start")):
      continue
    old = os.path.join(folder, _OLD)
    if os.path.isdir(old) and not occupied(target):
      if os.path.lexists(target):
        os.rmdir(target)  # an empty folder
      os.rename(old, target)
      _log.warning("restored %s from the interrupted run's %s", target, old)
    shutil.rmtree(folder, ignore_errors=True)
    _log.warning(
        "removed %s, left by an interrupted run (pid %d on %s)",
        folder,
        pid,
        host,
    )
    removed.append(folder)
  return removed


class Staging:
  """A staging folder for ``target``; write into :attr:`path`, then
  :meth:`commit` (or :meth:`abort`). Made by :func:`stage`."""

  def __init__(self, target: str, overwrite: bool):
    self.target = target
    self.overwrite = overwrite
    parent = os.path.dirname(target)
    self.folder = tempfile.mkdtemp(dir=parent, prefix=_prefix(target))
    self.marker = {
        "target": os.path.realpath(target),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _start_time(os.getpid()),
        "token": secrets.token_hex(8),
        "created": time.time(),
    }
    with open(os.path.join(self.folder, MARKER), "w", encoding="utf-8") as f:
      json.dump(self.marker, f)
    self.path = os.path.join(self.folder, _PAYLOAD)
    os.mkdir(self.path)
    self.done = False

  def commit(self) -> None:
    """Moves the payload onto the target (see :func:`move_into_place`)."""
    if os.path.isdir(self.path):
      os.chmod(self.path, 0o777 & ~umask())
    move_into_place(
        self.path,
        self.target,
        self.overwrite,
        aside=os.path.join(self.folder, _OLD),
    )
    self.done = True
    shutil.rmtree(self.folder, ignore_errors=True)

  def abort(self) -> None:
    """Removes the staging folder; the target is untouched."""
    self.done = True
    shutil.rmtree(self.folder, ignore_errors=True)

  def __enter__(self) -> Staging:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if not self.done:
      self.abort()


def stage(target: PathLike, *, overwrite: bool = False) -> Staging:
  """Reclaims ``target``'s stale staging folders (:func:`reclaim`) and
  opens a new one; use as a context manager (leaving it without
  :meth:`Staging.commit` removes it).

  Raises:
    FileExistsError: ``target`` exists and not ``overwrite`` (checked again
      at commit).
  """
  target = os.path.abspath(os.fspath(target))
  if occupied(target) and not overwrite:
    raise FileExistsError(
        f"{target} exists; pass overwrite=True (--overwrite) to replace it"
    )
  os.makedirs(os.path.dirname(target), exist_ok=True)
  reclaim(target)
  return Staging(target, overwrite)


__all__ = [
    "MARKER",
    "Staging",
    "check_disjoint",
    "fsync_dir",
    "move_into_place",
    "occupied",
    "overlapping",
    "read_marker",
    "reclaim",
    "stage",
    "umask",
]
