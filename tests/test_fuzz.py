"""Fuzzing the two text parsers users feed by hand: list files (``path label`` lines) and configs (YAML and
``--set key=value``). Whatever the text, the outcome is a result or the parser's own error type naming the
file or key, never another exception; well-formed input parses to exactly what was written."""
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pks4.data.datasets import DataConfig, check_dataset
from pks4.data.video import DataError
from pks4.engine.config import (ConfigError, RunConfig, apply_overrides, config_from_dict, config_to_dict,
                                format_config, load_config)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Characters that matter to the list parser (separators, comments, signs, dots), plus unicode.
LIST_CHARS = st.sampled_from(list("ab z09 ,;\t|#-+./_é空\\'\""))
LINE = st.text(LIST_CHARS, max_size=30)


@FAST
@given(st.lists(LINE, max_size=8))
def test_list_parser_never_crashes(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "list.txt"
        path.write_text("\n".join(lines), encoding="utf-8")
        try:
            report = check_dataset(path, DataConfig(root=tmp), max_videos=0)
        except DataError as exc:
            assert "list.txt" in str(exc) or tmp in str(exc)
            return
        assert report.ok is False or report.num_samples > 0
        for err in report.errors:  # every problem points at a line
            assert err.startswith("line ") or "no samples" in err or "annotation" in err


NAME = st.text(st.sampled_from(list("abcxyz019 _-.é空")), min_size=1, max_size=12).map(lambda s: "v" + s.strip())


@FAST
@given(st.lists(st.tuples(NAME, st.integers(0, 9)), min_size=1, max_size=8), st.sampled_from([" ", ","]),
       st.booleans())
def test_well_formed_lists_parse_to_what_was_written(rows, sep, header):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "list.txt"
        text = (f"path{sep}label\n" if header else "") + "\n".join(f"{n}{sep}{y}" for n, y in rows) + "\n"
        path.write_text(text, encoding="utf-8")
        report = check_dataset(path, DataConfig(root=tmp), max_videos=0)
        assert report.errors == []
        assert report.num_samples == len(rows)
        missing = [m.split(": ", 1)[1] for m in report.missing]  # nothing exists: every path is listed, in order
        assert missing == [str(Path(tmp) / n) for n, _ in rows]
        by_class = {c: 0 for c in report.classes}
        for _, y in rows:
            by_class[str(y)] += 1
        assert report.counts == by_class


# ---------------------------------------------------------------------------------------------- configs

KEYS = ["train.epochs", "train.batch_size", "train.amp", "train.nan_policy", "train.save_every_steps",
        "optim.lr", "optim.betas", "optim.clip_grad", "data.num_frames", "data.format", "data.scale",
        "data.rand_augment", "model.name", "model.overrides.image_size", "model.num_classes", "eval.views",
        "out", "train", "train.epochs.x", "nope", "data.mean"]
VALUE = st.one_of(st.text(max_size=12), st.integers(-5, 10**6).map(str), st.floats(allow_nan=True).map(str),
                  st.sampled_from(["[1, 2]", "[0.1, 0.9]", "null", "true", "off", "{a: 1}", "1e-3", "bf16",
                                   "stop", "skip", "m7-n4", "[", "8x2x3", "-1", ""]))


@FAST
@given(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), VALUE), max_size=4))
def test_overrides_give_a_config_or_a_config_error(pairs):
    try:
        cfg = apply_overrides(RunConfig(), [f"{k}={v}" for k, v in pairs])
    except ConfigError as exc:
        assert str(exc)
        return
    assert isinstance(cfg, RunConfig)
    assert config_from_dict(config_to_dict(cfg)) == cfg  # what is saved in a checkpoint rebuilds it


SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-3, 100), st.floats(allow_nan=False, width=32),
                   st.text(max_size=8))
TREE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                    st.dictionaries(st.sampled_from(
                                                        ["train", "data", "optim", "model", "eval", "epochs",
                                                         "lr", "size", "name", "views", "x"]), inner,
                                                        max_size=4)), max_leaves=12)


@FAST
@given(st.one_of(TREE.map(lambda t: yaml.safe_dump(t)), st.text(max_size=60)))
def test_yaml_configs_give_a_config_or_a_config_error_naming_the_file(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            assert "cfg.yaml" in str(exc)
            return
        assert load_config_text(format_config(cfg), tmp) == cfg  # the printed config loads back unchanged


def load_config_text(text: str, tmp: str) -> RunConfig:
    path = Path(tmp) / "printed.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)
