"""Command-line values checked where they are parsed: every numeric option states its range, every device option
is checked against this machine, and a mistake on the command line is one line through the error boundary
(:mod:`pks4.errors`), naming the sub-command and the option::

    pks4: error: predict --topk 0: expected an integer >= 1 (see `pks4 predict --help`)

Options that stand for config keys (``pks4 train --lr``) are checked by the config's own ranges, which name the
key (:data:`pks4.engine.config.FIELD_RULES`).
"""
from __future__ import annotations

import argparse
import math
import re
from typing import Callable

from pks4.errors import UserError

__all__ = ["UsageError", "Parser", "integer", "number", "views", "device"]


class UsageError(UserError):
    """A command line that does not parse: an unknown option, a missing argument, a value out of its range."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as one :class:`UsageError` line instead of usage text and ``exit(2)``
    (the sub-parsers are of the same class, so this holds for every sub-command)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("pks4").strip()
        match = re.fullmatch(r"argument ([^:]+): (.*)", message, flags=re.S)
        where, problem = (match.group(1), match.group(2)) if match else ("", message)
        head = " ".join(x for x in (command, where) if x)
        # a value this module checked reads "VALUE: expected ...": shown as "predict --topk 0: expected ..."
        joint = " " if where and re.match(r"\S+: expected ", problem) else ": "
        raise UsageError(f"{head + joint if head else ''}{problem} (see `{self.prog} --help`)")


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in [low, high]."""
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value}: expected {expected}")
        return value

    parse.__name__ = "integer"
    return parse


def number(low: float, *, above: bool = False, high: float | None = None) -> Callable[[str], float]:
    """An argparse ``type``: a finite number >= low (> low with ``above``), and <= high when given."""
    expected = f"a number {'>' if above else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}") from None
        if not math.isfinite(value) or value < low or (above and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text}: expected {expected}")
        return value

    parse.__name__ = "number"
    return parse


def views(text: str) -> str:
    """An argparse ``type``: FRAMESxCLIPSxCROPS, each >= 1 (kept as text, as the engine takes it)."""
    from pks4.data.sampling import parse_views

    try:
        parse_views(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def device(text: str) -> str:
    """An argparse ``type``: auto, cpu, cuda or cuda:N, and present on this machine."""
    from pks4.engine.runtime import device_problem

    problem = device_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text
