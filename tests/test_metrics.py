import numpy as np
import pytest

from polysense.modalities import nonempty_subsets, subset_key
from polysense.tools.metrics import classification_metrics


def test_metrics_by_hand():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    m = classification_metrics(y_true, y_pred, num_classes=4)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # precision: class0 1/2, class1 2/3, class2 1/1; recall: 1/2, 1, 1/2 (class 3 never occurs: not averaged)
    assert m["macro_precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["macro_recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    f1 = [2 * p * r / (p + r) for p, r in [(1 / 2, 1 / 2), (2 / 3, 1), (1, 1 / 2)]]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["confusion_matrix"][0] == [1, 1, 0, 0]
    assert m["count"] == 6


def test_subset_keys_follow_canonical_order():
    assert subset_key(["audio", "image"]) == "image+audio"
    keys = [subset_key(s) for s in nonempty_subsets(["audio", "text", "image"])]
    assert keys == ["image", "text", "audio", "image+text", "image+audio", "text+audio", "image+text+audio"]
