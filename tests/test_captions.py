"""Caption datasets parsed from small files written in each published layout, their bad inputs, the clip
dataset over them, and the captions of the built-in benchmark."""
import json

import numpy as np
import pytest

from pks4.cli import main
from pks4.data.captions import UNLABELLED, CaptionDataset, read_captions, write_caption_json
from pks4.data.datasets import DataConfig, DatasetError, build_dataset, check_dataset
from pks4.data.items import Skipped, collate
from pks4.data.synth import CLASSES, generate_synth, render_clip, sample_params, write_video
from pks4.data.synth_captions import CAPTION_TEMPLATES, class_captions, object_colour, write_synth_captions
from pks4.data.video import DataError


def _touch(root, *names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")  # parsing checks that media exist; nothing decodes them here


# ---- published layouts ------------------------------------------------------------------------------
def test_msrvtt_1k_a_json_list(tmp_path):
    _touch(tmp_path, "video7020.mp4", "video9770.mp4")
    (tmp_path / "msrvtt_test1k.json").write_text(json.dumps([
        {"video": "video7020.mp4", "caption": "a woman creating a fondant baby and flower"},
        {"video": "video9770.mp4", "caption": "a person is connecting something to system"}]))
    c = read_captions(tmp_path / "msrvtt_test1k.json", "msrvtt")
    assert c.videos == [str(tmp_path / "video7020.mp4"), str(tmp_path / "video9770.mp4")]
    assert c.caption_video == [0, 1] and c.captions[1] == "a person is connecting something to system"


def test_msrvtt_jsfusion_csv_and_original_json_with_split(tmp_path):
    _touch(tmp_path / "videos", "video7579.mp4", "video0.mp4", "video1.mp4")
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr7579,video7579,a girl wearing red top is putting a sweater on a dog\n")
    c = read_captions(tmp_path / "MSRVTT_JSFUSION_test.csv", "msrvtt", root=tmp_path / "videos")
    assert c.videos == [str(tmp_path / "videos" / "video7579.mp4")] and c.where == ["line 2"]
    (tmp_path / "test_videodatainfo.json").write_text(json.dumps({
        "videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video1", "split": "test"}],
        "sentences": [{"caption": "a car drives", "video_id": "video0", "sen_id": 0},
                      {"caption": "a man sings", "video_id": "video1", "sen_id": 1},
                      {"caption": "someone is singing", "video_id": "video1", "sen_id": 2}]}))
    c = read_captions(tmp_path / "test_videodatainfo.json", "msrvtt", root=tmp_path / "videos", split="test")
    assert c.captions == ["a man sings", "someone is singing"] and c.caption_video == [0, 0]  # several per video
    with pytest.raises(DatasetError, match="no video has split 'val'"):
        read_captions(tmp_path / "test_videodatainfo.json", "msrvtt", root=tmp_path / "videos", split="val")


def test_didemo_is_read_paragraph_to_video(tmp_path):
    name = "10015567@N08_3655084291_d8b58466fa.mov"
    _touch(tmp_path, name + ".mp4", "other.mp4")  # converted copies keep the original name
    (tmp_path / "test_data.json").write_text(json.dumps([
        {"annotation_id": 1, "description": "a dog runs", "times": [[0, 0]], "video": name},
        {"annotation_id": 2, "description": "the dog stops", "times": [[2, 3]], "video": name},
        {"annotation_id": 3, "description": "a cat sleeps", "times": [[1, 1]], "video": "other.mp4"}]))
    c = read_captions(tmp_path / "test_data.json", "didemo")
    assert c.captions == ["a dog runs the dog stops", "a cat sleeps"] and c.caption_video == [0, 1]
    assert c.videos[0] == str(tmp_path / (name + ".mp4"))
    sentences = read_captions(tmp_path / "test_data.json", "didemo", paragraphs=False)
    assert len(sentences) == 3 and sentences.caption_video == [0, 0, 1]


def test_activitynet_captions_paragraphs_and_v_prefix(tmp_path):
    _touch(tmp_path, "QOlSCBRmfWY.mp4", "v_ehGHCYKzyZ8.mkv")
    (tmp_path / "val_1.json").write_text(json.dumps({
        "v_QOlSCBRmfWY": {"duration": 82.7, "timestamps": [[0.8, 19.9], [17.4, 60.8]],
                          "sentences": ["A young woman is seen standing.", " She then dances around."]},
        "v_ehGHCYKzyZ8": {"duration": 61.7, "timestamps": [[0, 61]], "sentences": ["A man plays a drum."]}}))
    c = read_captions(tmp_path / "val_1.json", "activitynet")
    assert c.captions[0] == "A young woman is seen standing. She then dances around."
    assert c.videos == [str(tmp_path / "QOlSCBRmfWY.mp4"), str(tmp_path / "v_ehGHCYKzyZ8.mkv")]


def test_lsmdc_tab_separated_with_movie_folders(tmp_path):
    clip = "1010_TITANIC_00.41.32.072-00.41.40.196"
    _touch(tmp_path, f"1010_TITANIC/{clip}.avi")
    (tmp_path / "LSMDC16_challenge_1000_publictect.csv").write_text(
        f"{clip}\t00.41.32.072\t00.41.40.196\t00.41.32.072\t00.41.40.196\tSomeone lies on a bed.\n")
    c = read_captions(tmp_path / "LSMDC16_challenge_1000_publictect.csv", "lsmdc")
    assert c.videos == [str(tmp_path / "1010_TITANIC" / f"{clip}.avi")] and c.captions == ["Someone lies on a bed."]


def test_msvd_several_captions_per_video_and_standard_split(tmp_path):
    _touch(tmp_path / "YouTubeClips", "-4wsuPCjDBc_5_15.avi", "zzit5b_-ukg_5_20.avi")
    (tmp_path / "AllVideoDescriptions.txt").write_text(
        "# MSVD descriptions\n-4wsuPCjDBc_5_15 a squirrel is eating a peanut\n-4wsuPCjDBc_5_15 a squirrel eats\n"
        "zzit5b_-ukg_5_20 a man plays a guitar\n")
    (tmp_path / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\nzzit5b_-ukg_5_20 vid1301\n")
    c = read_captions(tmp_path / "AllVideoDescriptions.txt", "msvd", root=tmp_path / "YouTubeClips")
    assert c.caption_video == [0, 0, 1] and c.where == ["line 2", "line 3", "line 4"]
    test = read_captions(tmp_path / "AllVideoDescriptions.txt", "msvd", root=tmp_path / "YouTubeClips", split="test")
    assert test.captions == ["a man plays a guitar"]


def test_webvid_csv(tmp_path):
    _touch(tmp_path, "006001_006050/1066692580.mp4")
    (tmp_path / "results_2M_val.csv").write_text(
        "videoid,contentUrl,duration,page_dir,name\n1066692580,https://example.invalid/v.mp4,PT00H00M18S,"
        '006001_006050,"Aerial shot of a river, at dawn"\n')
    c = read_captions(tmp_path / "results_2M_val.csv", "webvid")
    assert c.videos == [str(tmp_path / "006001_006050" / "1066692580.mp4")]
    assert c.captions == ["Aerial shot of a river, at dawn"]


def test_cc3m_tsv_finds_images_by_row_number_or_path(tmp_path):
    _touch(tmp_path, "00000/000000000.jpg", "00000/000000001.jpg", "local/cat.png")
    (tmp_path / "Validation_GCC-1.1.0-Validation.tsv").write_text(
        "author : a life in photography\thttps://example.invalid/a.jpg\n"
        "the player celebrates\thttps://example.invalid/b.jpg\nsleepy cat\tlocal/cat.png\n")
    c = read_captions(tmp_path / "Validation_GCC-1.1.0-Validation.tsv", "cc3m")
    assert c.images and c.videos == [str(tmp_path / "00000/000000000.jpg"), str(tmp_path / "00000/000000001.jpg"),
                                     str(tmp_path / "local/cat.png")]


# ---- bad input -------------------------------------------------------------------------------------------
def test_empty_captions_are_named_by_file_and_line(tmp_path):
    _touch(tmp_path, "a.mp4")
    (tmp_path / "AllVideoDescriptions.txt").write_text("a first caption\na\n")
    with pytest.raises(DatasetError, match=r"(?s)AllVideoDescriptions.txt: 1 problem\(s\).*line 2: empty caption"):
        read_captions(tmp_path / "AllVideoDescriptions.txt", "msvd")
    (tmp_path / "c.json").write_text(json.dumps([{"video": "a.mp4", "caption": ["fine", "  "]}]))
    with pytest.raises(DatasetError, match=r"(?s)c.json: .*entry 0 caption 1: empty caption"):
        read_captions(tmp_path / "c.json", "captions")


def test_missing_videos_are_listed_with_their_lines_or_skipped(tmp_path):
    _touch(tmp_path, "there.mp4")
    (tmp_path / "c.json").write_text(json.dumps([{"video": "there.mp4", "caption": "one"},
                                                 {"video": "gone.mp4", "caption": ["two", "three"]}]))
    with pytest.raises(DatasetError, match=r"(?s)c.json: 1 of 2 media .* not on disk.*entry 1 caption 0: .*gone.mp4"):
        read_captions(tmp_path / "c.json", "captions")
    with pytest.warns(UserWarning, match="dropping the captions of 1 missing"):
        c = read_captions(tmp_path / "c.json", "captions", skip_missing=True)
    assert c.captions == ["one"] and c.videos == [str(tmp_path / "there.mp4")]


@pytest.mark.parametrize("fmt, text, match", [
    ("lsmdc", "clip\t1\t2\tsentence\n", "line 1: expected 6 tab-separated fields"),
    ("cc3m", "only a caption\n", "line 1: expected 'caption<TAB>url'"),
    ("webvid", "id,text\n1,a\n", "expected WebVid's columns"),
    ("captions", '{"video": "a"}', "expected a JSON list"),
    ("didemo", "[1, 2", "not valid JSON"),
    ("activitynet", '{"v_1": {"sentences": []}}', "needs a non-empty 'sentences' list"),
])
def test_malformed_files_name_the_problem(tmp_path, fmt, text, match):
    (tmp_path / "captions.txt").write_text(text)
    with pytest.raises(DatasetError, match=match):
        read_captions(tmp_path / "captions.txt", fmt)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="caption format 'vatex'"):
        read_captions(tmp_path / "x.json", "vatex")
    with pytest.raises(DatasetError, match="annotation file not found"):
        read_captions(tmp_path / "x.json", "captions")


def test_long_captions_are_listed_with_their_lines(tmp_path):
    _touch(tmp_path, "a.mp4")
    write_caption_json(tmp_path / "c.json", ["a.mp4"], [["short one", "a much longer caption than the rest"]])
    c = read_captions(tmp_path / "c.json", "captions")
    assert c.long_captions(lambda text: len(text.split()) + 2, max_len=5) == ["entry 0 caption 1 (9 tokens)"]


# ---- clips ------------------------------------------------------------------------------------------------
def test_caption_dataset_gives_clips_per_caption_or_per_video(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    write_video(tmp_path / "a.mp4", frames, fps=6)
    write_video(tmp_path / "b.mp4", frames[::-1].copy(), fps=6)
    write_caption_json(tmp_path / "c.json", ["a.mp4", "b.mp4"], [["one", "uno"], ["two"]])
    c = read_captions(tmp_path / "c.json", "captions")
    cfg = DataConfig(num_frames=4, size=32, short_side=32, flip="off")
    per_caption = CaptionDataset(c, cfg, train=True)
    item = per_caption[1]
    assert len(per_caption) == 3 and item.extra == {"caption": "uno", "video_index": 0, "group": 0} and item.index == 1
    assert per_caption[2].video.shape == (4, 3, 32, 32) and per_caption[2].label == 1
    per_video = CaptionDataset(c, cfg, train=False, per="video")
    assert len(per_video) == 2 and per_video[1].extra == {"video_index": 1}
    batch = collate([per_caption[i] for i in range(3)])
    assert batch.extra["caption"] == ["one", "uno", "two"] and batch.extra["video_index"].tolist() == [0, 0, 1]
    assert batch.video.shape == (3, 4, 3, 32, 32)
    assert [s.path for s in per_caption.samples] == [str(tmp_path / n) for n in ("a.mp4", "a.mp4", "b.mp4")]


def test_an_unreadable_video_is_a_skipped_item_naming_it(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    write_caption_json(tmp_path / "c.json", ["bad.mp4"], [["one"]])
    data = CaptionDataset(read_captions(tmp_path / "c.json", "captions"), DataConfig(num_frames=4, size=32),
                          train=True)
    item = data[0]
    assert isinstance(item, Skipped) and item.path == str(tmp_path / "bad.mp4")
    with pytest.raises(DataError, match="bad.mp4"):
        collate([item]).raise_skipped()


def test_images_are_one_frame_clips(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((40, 48, 3), 200, dtype=np.uint8)).save(tmp_path / "000000000.jpg")
    (tmp_path / "cc3m.tsv").write_text("a grey picture\thttps://example.invalid/x.jpg\n")
    c = read_captions(tmp_path / "cc3m.tsv", "cc3m")
    item = CaptionDataset(c, DataConfig(num_frames=8, size=32, short_side=32), train=True)[0]
    assert item.video.shape == (1, 3, 32, 32) and item.extra["caption"] == "a grey picture"


# ---- caption files as dataset formats ---------------------------------------------------------------------
def test_a_caption_file_is_a_dataset_format_of_unlabelled_videos(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    write_video(tmp_path / "clips" / "a.mp4", frames, fps=6)
    write_video(tmp_path / "clips" / "b.mp4", frames, fps=6)
    (tmp_path / "webvid.csv").write_text("videoid,contentUrl,duration,page_dir,name\n"
                                         "a,http://x/a.mp4,PT00H00M05S,clips,a cat\n"
                                         "b,http://x/b.mp4,PT00H00M05S,clips,a dog\n")
    cfg = DataConfig(format="webvid", root=str(tmp_path), train="webvid.csv", num_frames=4, size=32, short_side=32)
    data = build_dataset(cfg, "train", train=True)
    assert data.classes == [UNLABELLED] and [s.path for s in data.samples] == \
        [str(tmp_path / "clips" / "a.mp4"), str(tmp_path / "clips" / "b.mp4")]
    assert data[1].video.shape == (4, 3, 32, 32) and data[1].label == 0
    report = check_dataset(tmp_path / "webvid.csv", cfg)
    assert report.ok and report.counts == {UNLABELLED: 2}


def test_a_selected_part_of_a_caption_file_and_a_missing_one(tmp_path):
    (tmp_path / "v0.mp4").write_bytes(b"x")
    (tmp_path / "v1.mp4").write_bytes(b"x")
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps({
        "videos": [{"video_id": "v0", "split": "train"}, {"video_id": "v1", "split": "test"}],
        "sentences": [{"video_id": "v0", "caption": "a"}, {"video_id": "v1", "caption": "b"}]}))
    assert read_captions(tmp_path / "MSRVTT_data.json#test", "msrvtt").videos == [str(tmp_path / "v1.mp4")]
    with pytest.raises(DatasetError, match="no video has split 'tset'"):
        read_captions(tmp_path / "MSRVTT_data.json#tset", "msrvtt")
    with pytest.raises(DatasetError, match="MSRVTT_data.json#test: 1 of 1 listed videos are missing"):
        (tmp_path / "v1.mp4").unlink()
        build_dataset(DataConfig(format="msrvtt", root=str(tmp_path), val="MSRVTT_data.json#test",
                                 train="MSRVTT_data.json#train"), "val", train=False)


# ---- the built-in benchmark's captions ------------------------------------------------------------------
def test_reversed_twins_differ_only_in_their_direction_words():
    for fwd, bwd in zip(CLASSES[::2], CLASSES[1::2]):
        for a, b in zip(class_captions(fwd, "red"), class_captions(bwd, "red")):
            assert a != b and a.split()[:2] == b.split()[:2]  # same subject, other direction
    assert class_captions("moving_right", "blue")[0] == "a blue object moves from left to right"
    assert class_captions("moving_left", "blue")[0] == "a blue object moves from right to left"
    assert all(len(set(t)) == len(t) == 3 for t in CAPTION_TEMPLATES.values())
    assert class_captions("spinning_top", "red") == ["a red object, spinning top", "something red spinning top",
                                                     "a red shape spinning top"]  # a kind without templates


@pytest.mark.parametrize("kind, label", [("translate_x", 0), ("scale", 4), ("rotate", 6), ("fade", 8)])
def test_object_colour_is_the_drawn_one(kind, label):
    import colorsys

    from pks4.data.synth_captions import COLOUR_NAMES, _hue_name

    borders, checked = [start for start, _ in COLOUR_NAMES] + [360], 0
    for k in range(8):
        params = sample_params(np.random.default_rng([7, label, k]), kind, 16, 64)
        hue = colorsys.rgb_to_hsv(*(x / 255 for x in params.color))[0] * 360
        if min(abs(hue - b) for b in borders) < 3:
            continue  # on a sector border the name may fall either way
        frames = render_clip(label, params, 16, 64)
        assert object_colour(frames) == _hue_name(hue), (kind, k, hue)
        checked += 1
    assert checked >= 4
    assert object_colour(np.full((2, 8, 8, 3), 90, dtype=np.uint8)) == ""  # nothing vivid: no colour


def test_synth_captions_file_and_cli(tmp_path, capsys):
    root = tmp_path / "synth"
    generate_synth(root, seed=2, num_train_per_class=1, num_val_per_class=1, num_frames=8, size=32)
    assert main(["data", "captions", str(root)]) == 0
    assert "captions_val.json" in capsys.readouterr().out
    c = read_captions(root / "captions_val.json", "captions")
    assert len(c.videos) == len(CLASSES) and len(c) == 3 * len(CLASSES)
    assert c.captions[0].endswith("moves from left to right") and c.videos[0].endswith("moving_right_000.mp4")
    words = set((root / "text" / "vocab.txt").read_text().split())
    assert {"clockwise", "counterclockwise", "left", "right"} <= words
    assert write_synth_captions(root, splits=("train",))["train"] == root / "captions_train.json"
    assert main(["data", "captions", str(tmp_path / "nothing")]) == 2
    assert "classes.txt" in capsys.readouterr().err
