"""The ``pks4`` command line: every parser lives in this package; each command is a thin call into the engine
with typed arguments.

    pks4 train CONFIG.yaml|RECIPE [--set key=value ...] [--out DIR] [--resume auto|PATH]
    pks4 train --model NAME --train-list FILE --val-list FILE --data-root DIR --num-classes K --frames T ...
    pks4 pretrain CONFIG.yaml [--teacher CLIP_WEIGHTS] [--set key=value ...] [--out DIR] [--resume auto|PATH]
    pks4 recipes [NAME]
    pks4 eval --checkpoint CKPT_OR_RUNDIR [--data LIST] [--views 8x2x3] [--frame-order ORDER] [--json]
              [--frames T] [--size S] [--patch-policy native|static_tokens|P]
    pks4 eval --checkpoint CKPT_OR_RUNDIR --grid frames=8,16,32,64 size=96,128,224 [--out DIR]
    pks4 predict VIDEO... --checkpoint CKPT_OR_RUNDIR [--topk 5] [--json] [--frames T] [--size S]
    pks4 retrieval | linear-probe | embed --checkpoint CKPT_OR_RUNDIR [--frames T] [--size S] ...
    pks4 data check LIST_OR_DIR | pks4 data synth OUT_DIR [--seed N] [--train-per-class N] [--val-per-class N]
    pks4 models | pks4 profile MODEL | pks4 demo [--out DIR]

Bad input (missing files, unreadable videos, unknown config keys, checkpoints that do not fit) ends with one
line ``pks4: error: <file or key>: <problem>`` and a non-zero exit code; set PKS4_TRACEBACK=1 to see the trace.

Modules: :mod:`.training` (train, pretrain, recipes), :mod:`.evaluation` (eval, predict and the StretchySnake
protocols), :mod:`.tools` (data, models, profile, demo). Each registers its sub-commands with ``add_parsers``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from . import evaluation, tools, training

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every sub-command."""
    p = argparse.ArgumentParser(prog="pks4", description="Efficient video understanding with PKS4 and SSMs.")
    sub = p.add_subparsers(dest="command", required=True)
    training.add_parsers(sub)
    evaluation.add_parsers(sub)
    tools.add_parsers(sub)
    return p


def _expected_errors() -> tuple[type[BaseException], ...]:
    from pks4.data.video import DataError
    from pks4.engine.checkpoint import CheckpointError
    from pks4.engine.config import ConfigError
    from pks4.engine.runtime import TrainingError

    return (DataError, CheckpointError, ConfigError, TrainingError, FileNotFoundError, KeyError, ValueError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pks4`` script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("pks4: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - filtered just below
        if os.environ.get("PKS4_TRACEBACK") or not isinstance(exc, _expected_errors()):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"pks4: error: {msg}", file=sys.stderr)
        return 2
