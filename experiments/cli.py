"""What every binary in ``experiments/`` does around its ``main``.

Bad input ends in one line, ``<binary>: error: <message>``, and exit status 1:
flag errors (an unknown flag, a mistyped value, an unknown ``--config.X``
field) without absl's usage text, and errors raised by ``main`` without a
traceback. A binary ends with::

  if __name__ == "__main__":
    cli.run(main, "suite")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from absl import app
from absl import flags

# What a binary reports as bad input (anything else is a bug: traceback).
BAD_INPUT = (ValueError, OSError, ImportError, app.UsageError)


def one_line(name: str, e: BaseException | str) -> str:
  """``<name>: error: <message>`` with the message's whitespace collapsed."""
  msg = e if isinstance(e, str) else str(e)
  if not isinstance(e, str) and not msg.strip():
    msg = type(e).__name__
  return f"{name}: error: " + " ".join(msg.split())


def parse_flags(name: str) -> Callable[[list[str]], list[str]]:
  """absl's flag parsing, with its errors as one line naming the flag."""

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: no such field
      field = str(e.args[0] if e.args else e).strip("\"'")
      given = [
          a.split("=", 1)[0]
          for a in argv
          if a.startswith("--config.")
          and field in a.split("=", 1)[0].split(".")
      ]
      where = given[0] if given else "--config"
      raise SystemExit(
          one_line(name, f"{where}: the config has no field {field!r}")
      ) from None
    except (flags.Error, TypeError, ValueError) as e:
      raise SystemExit(one_line(name, e)) from None

  return parse


def run(
    main: Callable[[Sequence[str]], None],
    name: str,
    *,
    errors: tuple[type[BaseException], ...] = BAD_INPUT,
) -> None:
  """``app.run(main)``; ``errors`` raised by ``main`` become one line."""

  def wrapped(argv: Sequence[str]) -> None:
    try:
      main(argv)
    except errors as e:
      raise SystemExit(one_line(name, e)) from None

  app.run(wrapped, flags_parser=parse_flags(name))
