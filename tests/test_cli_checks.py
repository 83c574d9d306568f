"""Command-line values checked where they are parsed (pks4.cli.checks) and devices checked against this machine
(pks4.engine.runtime): the ranges, the one-line messages naming command and option, every sub-command's
numeric options covered."""
import argparse

import pytest
import torch

from pks4.cli import build_parser, checks, main
from pks4.engine.runtime import device_problem, resolve_device
from pks4.errors import UserError


@pytest.mark.parametrize("parse, good, bad", [
    (checks.integer(1), [("1", 1), ("64", 64)], [("0", "0: expected an integer >= 1"),
                                                 ("-3", "-3: expected an integer >= 1"),
                                                 ("2.5", "'2.5': expected an integer >= 1")]),
    (checks.integer(1, 65535), [("65535", 65535)], [("65536", "65536: expected an integer from 1 to 65535")]),
    (checks.number(0, above=True, high=1), [("1", 1.0), ("0.2", 0.2)],
     [("0", "0: expected a number > 0 and <= 1"), ("1.5", "1.5: expected a number > 0 and <= 1"),
      ("nan", "nan: expected"), ("x", "'x': expected")]),
    (checks.number(0), [("0", 0.0)], [("-1e-9", "-1e-9: expected a number >= 0"), ("inf", "inf: expected")]),
    (checks.views, [("8x2x3", "8x2x3"), ("8", "8")], [("8x0x3", "8x0x3"), ("eight", "FRAMESxCLIPSxCROPS")]),
])
def test_option_types_accept_their_range_and_name_what_they_expected(parse, good, bad):
    for text, value in good:
        assert parse(text) == value
    for text, words in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=words.replace("(", r"\(").replace("+", r"\+")):
            parse(text)


def test_devices_are_checked_against_this_machine():
    assert device_problem("auto") is None and device_problem("cpu") is None
    assert resolve_device("cpu") == torch.device("cpu")
    assert "is not a device; expected auto, cpu, cuda or cuda:N" in device_problem("gpu")
    assert "pks4 runs on cpu or cuda" in device_problem("meta")
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    assert "CUDA device" in device_problem(missing)
    with pytest.raises(UserError, match=rf"^--device '{missing}': this machine has"):
        resolve_device(missing)
    with pytest.raises(UserError, match=rf"^train.device='{missing}': this machine has"):
        resolve_device(missing, "train.device")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("argv, words", [
    (["predict", "a.mp4", "--checkpoint", "run", "--nope"], "unrecognized arguments: --nope (see `pks4 --help`)"),
    (["predict", "a.mp4"], "predict: the following arguments are required: --checkpoint"),
    (["predict", "a.mp4", "--checkpoint", "run", "--amp", "fp8"], "predict --amp: invalid choice: 'fp8'"),
    (["eval", "--checkpoint", "run", "--batch-size", "0"], "eval --batch-size 0: expected an integer >= 1 "
                                                           "(see `pks4 eval --help`)"),
    (["retrieval", "--checkpoint", "run", "--size", "-8"], "retrieval --size -8: expected an integer >= 1"),
    (["linear-probe", "--checkpoint", "run", "--weight-decay", "-1"], "linear-probe --weight-decay -1: expected a "
                                                                       "number >= 0"),
    (["profile", "pks4_vit_tiny", "--training-compute", "--epochs", "0"], "profile --epochs 0: expected a number > 0"),
    (["profile", "pks4_vit_tiny", "--device", "gpu"], "profile --device: 'gpu' is not a device"),
    (["nonsense"], "pks4: error: command: invalid choice: 'nonsense'"),
])
def test_a_bad_command_line_is_one_line_naming_command_and_option(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pks4: error: ") and len(err.splitlines()) == 1 and "usage:" not in err
    assert words in err


def test_every_numeric_option_of_every_command_states_its_range():
    """No sub-command keeps a bare int or float option: each goes through checks (or, for `pks4 train`, through
    the config key it stands for, whose range the config checks)."""
    bare = []
    sub = build_parser()._subparsers._group_actions[0].choices
    parsers = dict(sub)
    parsers.update({f"data {k}": v for k, v in sub["data"]._subparsers._group_actions[0].choices.items()})
    for name, parser in parsers.items():
        for action in parser._actions:
            if action.type in (int, float) and not (name == "train" or action.dest == "seed"):
                bare.append(f"{name} {action.option_strings}")
    # data synth keeps its own checks in the command (tested in test_cli); the rest use pks4.cli.checks
    assert [b for b in bare if not b.startswith("data synth")] == []


def test_output_to_a_reader_that_has_gone_ends_quietly():
    """`pks4 recipes | head -0`: the reader closed its end before anything was written; no traceback, no
    "internal error", the shell's SIGPIPE exit code."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "pks4.cli", "recipes"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr
