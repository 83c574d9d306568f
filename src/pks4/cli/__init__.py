"""The ``pks4`` command line: every parser lives in this package; each command is a thin call into the engine
with typed arguments.

    pks4 train CONFIG.yaml|RECIPE [--set key=value ...] [--out DIR] [--resume auto|PATH]
    pks4 train --model NAME --train-list FILE --val-list FILE --data-root DIR --num-classes K --frames T ...
    pks4 pretrain CONFIG.yaml [--teacher CLIP_WEIGHTS] [--set key=value ...] [--out DIR] [--resume auto|PATH]
    pks4 pretrain CONFIG.yaml --task video-text [--set key=value ...] [--out DIR] [--resume auto|PATH]
    pks4 recipes [NAME]
    pks4 eval --checkpoint CKPT_OR_RUNDIR [--data LIST] [--views 8x2x3] [--frame-order ORDER] [--json]
              [--frames T] [--size S] [--patch-policy native|static_tokens|P]
    pks4 eval --checkpoint CKPT_OR_RUNDIR --grid frames=8,16,32,64 size=96,128,224 [--out DIR]
    pks4 predict VIDEO... --checkpoint CKPT_RUNDIR_OR_FOLDER [--topk 5] [--json] [--frames T] [--size S]
    pks4 predict LONG.mp4 --checkpoint ... --window 8 --stride 4 [--fps F] [--json | --csv] [--out DIR]
    pks4 stream FILE_OR_CAMERA --checkpoint CAUSAL_RUN [--frame-step N] [--every N] [--topk 5] [--json]
    pks4 export-pretrained RUN_OR_CKPT OUT_DIR     (config.json + model.safetensors + README.md)
    pks4 export RUN_OR_CKPT OUT_FILE --format onnx|torchscript|exported-program [--batch dynamic|N]
    pks4 serve RUN_OR_FOLDER [--port 8000] [--examples DIR]     (needs pks4[web])
    pks4 retrieval | linear-probe | embed --checkpoint CKPT_OR_RUNDIR [--frames T] [--size S] ...
    pks4 text-retrieval --checkpoint VIDEO_TEXT_RUN [--captions FILE --format FORMAT] [--rerank K] [--json]
    pks4 data check LIST_OR_DIR | pks4 data synth OUT_DIR [--kind NAME] [--seed N] [--train-per-class N] ...
    pks4 data captions SYNTH_DIR [--no-vocab]
    pks4 models | pks4 profile MODEL | pks4 demo [--out DIR] [--task video-text]

Bad input (missing files, unreadable videos, unknown config keys, checkpoints that do not fit, an option out of
its range) ends with one line ``pks4: error: <file, key or option>: <problem>`` and exit code 2
(:mod:`pks4.errors`, :mod:`.checks`); ``--debug`` anywhere on the line (or PKS4_DEBUG=1) shows the traceback
instead. Commands that write check their destination before the work (:mod:`pks4.engine.rundir`).

Modules: :mod:`.training` (train, pretrain, recipes), :mod:`.evaluation` (eval, predict and the StretchySnake
protocols), :mod:`.deploy` (export-pretrained, serve, stream), :mod:`.export` (export), :mod:`.tools` (data, models,
profile, demo). Each registers its sub-commands with ``add_parsers``.
"""
from __future__ import annotations

import argparse
import os
import select
import sys
from typing import Sequence

from . import deploy, evaluation, export, tools, training

__all__ = ["main", "build_parser", "EXIT_READER_GONE"]

EXIT_READER_GONE = 141  # 128 + SIGPIPE: what a shell tool reports when the reader of its output has gone


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every sub-command."""
    from .checks import Parser

    p = Parser(prog="pks4", description="Efficient video understanding with PKS4 and SSMs.")
    p.add_argument("--debug", action="store_true", help="show the traceback of any error (also PKS4_DEBUG=1; "
                   "accepted anywhere on the line)")
    sub = p.add_subparsers(dest="command", required=True)
    training.add_parsers(sub)
    evaluation.add_parsers(sub)
    deploy.add_parsers(sub)
    export.add_parsers(sub)
    tools.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pks4`` script; returns the exit code (2 for a user error, see pks4.errors)."""
    from pks4.errors import run_guarded, split_debug_flag

    argv, debug = split_debug_flag(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        args = build_parser().parse_args(argv)  # a bad command line is a UsageError: one line, exit 2
        try:
            return args.func(args)
        except BrokenPipeError:
            if not _stdout_reader_gone():
                raise  # another pipe (a worker's, a socket's): sorted by the boundary
            # `pks4 predict *.mp4 | head -1`: the reader has what it wanted, so stop quietly as shell tools do;
            # Python's flush of stdout at exit must not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_READER_GONE

    return run_guarded(run, debug=debug)


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end is closed (the poll of a write end reports an error)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no file descriptor (captured output), no poll on this system
        return False
