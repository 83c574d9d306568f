"""The shared inference path: view aggregation, metrics and confusion matrix against hand-computed values."""
import csv
import math

import pytest
import torch

from pks4.data.items import Batch
from pks4.engine.infer import (aggregate_views, compute_metrics, confusion_matrix, evaluate, mean_class_accuracy,
                               run_views, save_confusion_matrix, topk_accuracy, topk_labels)
from pks4.models.registry import create_model


def test_aggregate_views_golden():
    # one video, two views, two classes: softmax per view then mean (NOT softmax of the mean logits)
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), 0.0]]])  # view probs [.25,.75] and [.75,.25]
    assert aggregate_views(logits)[0].tolist() == pytest.approx([0.5, 0.5])
    logits = torch.tensor([[[10.0, 0.0], [0.0, 0.0]]])
    p0 = 1 / (1 + math.exp(-10))
    assert aggregate_views(logits)[0].tolist() == pytest.approx([(p0 + 0.5) / 2, ((1 - p0) + 0.5) / 2])
    with pytest.raises(ValueError, match=r"\(N, V, K\)"):
        aggregate_views(torch.zeros(2, 3))


def test_topk_mean_class_and_confusion_golden():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0],   # true 0, pred 0
                          [0.1, 0.6, 0.3, 0.0],   # true 2, pred 1 (2nd best)
                          [0.2, 0.3, 0.1, 0.4],   # true 2, pred 3 (4th best)
                          [0.1, 0.1, 0.1, 0.7]])  # true 3, pred 3
    labels = torch.tensor([0, 2, 2, 3])
    acc = topk_accuracy(probs, labels, (1, 2, 5))
    assert acc == {1: pytest.approx(50.0), 2: pytest.approx(75.0), 5: pytest.approx(100.0)}
    # classes present: 0 (1/1), 2 (0/2), 3 (1/1) -> mean 2/3
    assert mean_class_accuracy(probs, labels, 4) == pytest.approx(200 / 3)
    cm = confusion_matrix(probs.argmax(1), labels, 4)
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0, 0] = expected[2, 1] = expected[2, 3] = expected[3, 3] = 1
    assert torch.equal(cm, expected)
    assert compute_metrics(probs, labels, 4) == {"top1": 50.0, "top5": 100.0, "mean_class": pytest.approx(200 / 3)}


def test_topk_labels_and_confusion_files(tmp_path):
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    top = topk_labels(probs, ["a", "b", "c"], 5)[0]
    assert [t["label"] for t in top] == ["b", "c", "a"] and top[0]["score"] == pytest.approx(0.6)
    cm = torch.tensor([[2, 1], [0, 3]])
    save_confusion_matrix(cm, ["left", "right"], tmp_path / "cm.csv", tmp_path / "cm.png")
    rows = list(csv.reader(open(tmp_path / "cm.csv")))
    assert rows == [["true\\pred", "left", "right"], ["left", "2", "1"], ["right", "0", "3"]]
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


def test_run_views_equals_per_view_forward_and_evaluate_dedups():
    model = create_model("pks4_vit_tiny", num_classes=3, image_size=32, use_module=False).eval()
    views = torch.randn(2, 3, 4, 3, 32, 32)  # N=2 videos, V=3 views, T=4
    logits = run_views(model, views, chunk=4)  # chunks cut across videos on purpose
    with torch.no_grad():
        ref = torch.stack([model(views[:, v]) for v in range(3)], dim=1)
    assert logits.shape == (2, 3, 3)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    # a padded shard repeats index 0 (as DistributedSampler does): evaluate keeps it once, ordered by index
    batches = [Batch(views[[1]], torch.tensor([2]), torch.tensor([7])),
               Batch(views[[0, 0]], torch.tensor([1, 1]), torch.tensor([3, 3]))]
    out = evaluate(model, batches)
    assert out.indices.tolist() == [3, 7] and out.labels.tolist() == [1, 2]
    torch.testing.assert_close(out.probs, aggregate_views(ref)[[0, 1]], rtol=1e-5, atol=1e-6)
