"""The error boundary: user errors are one line with exit code 2, internal errors keep their traceback and ask
for a report, ``--debug`` / PKS4_DEBUG / PKS4_TRACEBACK re-raise."""
import errno
import io
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from pks4.cli import main
from pks4.data.video import VideoError
from pks4.engine.checkpoint import CheckpointError
from pks4.engine.config import ConfigError
from pks4.errors import (EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USER, UserError, describe_os_error,
                         require_regular_file, run_guarded, split_debug_flag, user_message)


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    for name in ("PKS4_DEBUG", "PKS4_TRACEBACK"):
        monkeypatch.delenv(name, raising=False)


def _raised(action):
    try:
        action()
    except OSError as exc:
        return exc
    raise AssertionError("no OSError")


def _guarded(func, **kwargs):
    out = io.StringIO()
    code = run_guarded(func, stream=out, **kwargs)
    return code, out.getvalue()


# ------------------------------------------------------------------------------------------ OS errors


def test_real_os_errors_become_one_line_naming_the_path(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    os.mkfifo(tmp_path / "fifo")
    cases = {
        "missing": (lambda: open(tmp_path / "missing"), "no such file or directory"),
        "directory": (lambda: open(tmp_path), "is a directory"),
        "not a directory": (lambda: open(tmp_path / "file" / "x"), "not a directory"),
        "symlink loop": (lambda: open(tmp_path / "loop"), "symbolic links"),
        "name too long": (lambda: open(tmp_path / ("n" * 300)), "file name too long (its longest part has 300"),
        # a FIFO opened for writing without a reader: the kernel answers ENXIO at once instead of blocking
        "FIFO without a reader": (lambda: os.open(tmp_path / "fifo", os.O_WRONLY | os.O_NONBLOCK), "FIFO"),
    }
    for name, (action, words) in cases.items():
        exc = _raised(action)
        message = user_message(exc)
        assert message is not None and words in message, (name, message)
        assert str(tmp_path) in message, (name, message)


@pytest.mark.parametrize("code, words", [
    (errno.EACCES, "permission denied"), (errno.ENOSPC, "no space left on device"),
    (errno.EROFS, "read-only file system"), (errno.ENODEV, "no such device"), (errno.EDQUOT, "quota"),
    (errno.EIO, "input/output error"),
])
def test_os_errors_root_cannot_provoke_are_mapped_too(code, words):
    # Root reads any file and writes any folder, and these machines need a full or read-only disk to provoke
    # the rest; the mapping itself is what is tested here (test_rundir.py fills a disk for real).
    exc = OSError(code, os.strerror(code), "/data/run/state.pt")
    assert user_message(exc) == f"/data/run/state.pt: {describe_os_error(exc).split(': ', 1)[1]}"
    assert words in user_message(exc)


def test_rename_errors_name_both_paths(tmp_path):
    exc = _raised(lambda: os.rename(tmp_path / "gone", tmp_path / "there"))
    assert user_message(exc) == f"{tmp_path / 'gone'} -> {tmp_path / 'there'}: no such file or directory"


def test_os_errors_of_the_machine_stay_internal():
    assert user_message(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")) is None
    assert user_message(OSError(errno.ENOMEM, "Cannot allocate memory")) is None


def test_require_regular_file_names_what_the_path_is(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "ok.yaml").write_text("a: 1\n")
    assert require_regular_file(tmp_path / "ok.yaml") == tmp_path / "ok.yaml"
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for path, words in ((tmp_path / "fifo", "is a FIFO"), (tmp_path, "is a directory"), ("/dev/null", "is a device"),
                        (tmp_path / "nope", "config file not found"), (tmp_path / "loop", "symbolic links")):
        with pytest.raises(UserError, match=words) as err:
            require_regular_file(path, "config file")
        assert str(path) in str(err.value)


# -------------------------------------------------------------------------------------- classification


def _numpy_value_error():
    np.stack([np.zeros(2), np.zeros(3)])


def test_project_errors_are_user_errors():
    for exc in (VideoError("clip.mp4", "file is empty (0 bytes)"), ConfigError("train.lr: expected float"),
                CheckpointError("ckpt: truncated")):
        assert isinstance(exc, UserError)
        assert user_message(exc) == str(exc)


def test_value_error_is_a_user_error_only_when_pks4_raised_it():
    from pks4.data.sampling import parse_views

    with pytest.raises(ValueError) as ours:
        parse_views("8x0x3")
    assert "8x0x3" in user_message(ours.value)
    with pytest.raises(ValueError) as theirs:
        _numpy_value_error()
    assert user_message(theirs.value) is None  # raised inside numpy: a case pks4 failed to check


def test_parse_errors_of_user_files():
    import json

    import yaml

    with pytest.raises(json.JSONDecodeError) as bad_json:
        json.loads("{'single': 'quotes'}")
    assert user_message(bad_json.value).startswith("not valid JSON")
    with pytest.raises(yaml.YAMLError) as bad_yaml:
        yaml.safe_load("a: [1, 2\n")
    assert user_message(bad_yaml.value).startswith("not valid YAML")
    with pytest.raises(UnicodeDecodeError) as binary:
        b"\x89PNG\r\n".decode("utf-8")
    assert "not UTF-8 text (byte 0x89" in user_message(binary.value)


class _BadVideos(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise VideoError("/videos/cut.mp4", "decoding failed (Invalid data); file is corrupt or truncated")


def test_a_user_error_raised_in_a_dataloader_worker_stays_one_line():
    loader = DataLoader(_BadVideos(), batch_size=1, num_workers=1)
    with pytest.raises(Exception) as wrapped:
        next(iter(loader))
    assert "Original Traceback" in str(wrapped.value)  # torch re-raises it with the worker's traceback inside
    expected = "/videos/cut.mp4: decoding failed (Invalid data); file is corrupt or truncated"
    assert user_message(wrapped.value) == expected


# ------------------------------------------------------------------------------------------ the boundary


def test_user_error_is_one_line_with_exit_code_2():
    code, text = _guarded(lambda: (_ for _ in ()).throw(ConfigError("cfg.yaml: train.lr=0; expected > 0")))
    assert code == EXIT_USER == 2
    assert text == "pks4: error: cfg.yaml: train.lr=0; expected > 0\n"


def test_internal_error_keeps_its_traceback_and_asks_for_a_report():
    def bug():
        return len(None)  # TypeError: a bug, not an input

    code, text = _guarded(bug)
    assert code == EXIT_INTERNAL == 1
    assert "Traceback (most recent call last)" in text and "TypeError" in text
    assert "internal error (TypeError)" in text and "please report it" in text
    code, text = _guarded(_numpy_value_error)
    assert code == EXIT_INTERNAL and "Traceback" in text


def test_debug_flag_and_environment_reraise(monkeypatch):
    error = ConfigError("x: bad")

    def fail():
        raise error

    with pytest.raises(ConfigError):
        run_guarded(fail, debug=True)
    for name in ("PKS4_DEBUG", "PKS4_TRACEBACK"):
        monkeypatch.setenv(name, "1")
        with pytest.raises(ConfigError):
            run_guarded(fail)
        monkeypatch.setenv(name, "0")  # an explicit 0 means off
        assert _guarded(fail)[0] == EXIT_USER
        monkeypatch.delenv(name)


def test_interrupt_exits_130():
    def interrupted():
        raise KeyboardInterrupt

    assert _guarded(interrupted) == (EXIT_INTERRUPTED, "pks4: interrupted\n")


def test_split_debug_flag_anywhere_before_the_separator():
    assert split_debug_flag(["train", "--debug", "cfg.yaml"]) == (["train", "cfg.yaml"], True)
    assert split_debug_flag(["--debug", "models"]) == (["models"], True)
    assert split_debug_flag(["predict", "--", "--debug"]) == (["predict", "--", "--debug"], False)


def test_cli_debug_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing.yaml")
    assert main(["train", missing]) == 2
    err = capsys.readouterr().err
    assert err.count("pks4: error:") == 1 and "missing.yaml" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="missing.yaml"):
        main(["train", missing, "--debug"])
    with pytest.raises(ConfigError):
        main(["--debug", "train", missing])


def test_cli_internal_error_exits_1_with_a_report_line(monkeypatch, capsys):
    import pks4.cli.tools as tools

    monkeypatch.setattr(tools, "_models_cmd", lambda args: torch.zeros(2) @ torch.zeros(3))
    assert main(["models"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback" in err and "please report it" in err
