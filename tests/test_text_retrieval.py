"""Retrieval metrics (R@1/5/10, median rank, both directions, several captions per video, re-ranking) on
hand-made similarity matrices."""
import pytest
import torch

from pks4.engine.retrieval_metrics import (recall_summary, rerank_top_k, retrieval_metrics, text_to_video_ranks,
                                           video_to_text_ranks)

# 4 captions, 3 videos; captions 0 and 1 describe video 0, caption 2 video 1, caption 3 video 2
SIM = torch.tensor([[0.9, 0.1, 0.0],   # caption 0: its video first            -> rank 1
                    [0.2, 0.8, 0.5],   # caption 1: video 0 is third           -> rank 3
                    [0.7, 0.6, 0.1],   # caption 2: video 1 second             -> rank 2
                    [0.3, 0.2, 0.25]])  # caption 3: video 2 second             -> rank 2
TRUTH = torch.tensor([0, 0, 1, 2])


def test_text_to_video_ranks_by_hand():
    assert text_to_video_ranks(SIM, TRUTH).tolist() == [1, 3, 2, 2]


def test_video_to_text_takes_each_videos_best_placed_caption():
    # video 0 ranks captions by column 0: 0.9 (c0), 0.7, 0.3, 0.2 -> its caption 0 first: rank 1
    # video 1: 0.8 (c1), 0.6 (c2 = own), ... -> rank 2; video 2: 0.5 (c1), 0.25 (c3 = own) -> rank 2
    ranks, uncaptioned = video_to_text_ranks(SIM, TRUTH)
    assert ranks.tolist() == [1, 2, 2] and uncaptioned == 0


def test_recalls_and_median_rank_by_hand():
    m = retrieval_metrics(SIM, TRUTH)
    assert m["t2v_r1"] == pytest.approx(25.0) and m["t2v_r5"] == 100.0 and m["t2v_r10"] == 100.0
    assert m["t2v_mdr"] == 2.0 and m["t2v_mnr"] == pytest.approx(2.0)
    assert m["v2t_r1"] == pytest.approx(100 / 3) and m["v2t_mdr"] == 2.0
    assert (m["texts"], m["videos"], m["videos_without_caption"]) == (4.0, 3.0, 0.0)
    assert recall_summary(torch.tensor([1, 2, 3, 10]))["mdr"] == 2.5  # even count: mean of the middle two
    assert recall_summary(torch.tensor([1, 6, 11]), recall_at=(5, 10)) == pytest.approx(
        {"r5": 100 / 3, "r10": 200 / 3, "mdr": 6.0, "mnr": 6.0})


def test_ties_count_against_the_query():
    flat = torch.ones(3, 3)
    m = retrieval_metrics(flat, torch.arange(3))
    assert m["t2v_r1"] == 0.0 and m["t2v_mdr"] == 3.0 and m["v2t_r1"] == 0.0


def test_videos_without_captions_are_left_out_of_video_to_text():
    ranks, uncaptioned = video_to_text_ranks(SIM[:, :3], torch.tensor([0, 0, 0, 2]))
    assert uncaptioned == 1 and ranks.tolist() == [1, 2]
    assert retrieval_metrics(SIM, torch.tensor([0, 0, 0, 2]))["videos_without_caption"] == 1.0


def test_rerank_reorders_the_top_k_only():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.0]])
    prefer_lower = lambda row, cols: -cols.float()  # the matching head prefers lower column numbers
    out = rerank_top_k(sim, 3, lambda row, cols: cols.float())
    assert out[0].argsort(descending=True).tolist() == [2, 1, 0, 3, 4]
    out = rerank_top_k(sim, 2, prefer_lower)
    assert out[0].argsort(descending=True).tolist() == [0, 1, 2, 3, 4]
    # the true video at plain rank 3 moves to rank 1 when the head likes it
    truth = torch.tensor([2])
    assert text_to_video_ranks(sim, truth).tolist() == [3]
    boosted = rerank_top_k(sim, 3, lambda row, cols: (cols == 2).float())
    assert text_to_video_ranks(boosted, truth).tolist() == [1]
    assert text_to_video_ranks(rerank_top_k(sim, 2, lambda r, c: (c == 2).float()), truth).tolist() == [3]


@pytest.mark.parametrize("sim, truth, match", [
    (torch.zeros(3), torch.zeros(3, dtype=torch.long), "matrix"),
    (torch.zeros(2, 2), torch.zeros(3, dtype=torch.long), "one video per text"),
    (torch.zeros(2, 2), torch.tensor([0, 2]), "outside"),
])
def test_bad_shapes(sim, truth, match):
    with pytest.raises(ValueError, match=match):
        text_to_video_ranks(sim, truth)


def test_rerank_rejects_bad_scores():
    with pytest.raises(ValueError, match="returned"):
        rerank_top_k(torch.zeros(1, 4), 2, lambda row, cols: torch.zeros(3))
    with pytest.raises(ValueError, match="k=0"):
        rerank_top_k(torch.zeros(1, 4), 0, lambda row, cols: cols)
