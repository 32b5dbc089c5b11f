"""Caption metrics on hand-computed cases: exact match, token accuracy, BLEU, edit distance, CER and WER."""

import pytest
import torch

from mmeff import metrics


def test_exact_match_strips_whitespace_and_counts_pairs():
    assert metrics.exact_match(["417", " 12 ", "9"], ["417", "12", "8"]) == pytest.approx(2 / 3)
    assert metrics.exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        metrics.exact_match(["a", "b"], ["a"])


def test_token_accuracy_skips_ignored_targets():
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])  # argmax 1, 0, 1
    targets = torch.tensor([[1, 1, -100]])
    assert metrics.token_accuracy(logits, targets) == (1, 2)


def test_bleu_of_identical_texts_is_100_and_of_disjoint_ones_0():
    refs = ["three digits: 4, 1 and 7 from left to right", "417", "one digit: 5"]
    assert metrics.bleu(refs, refs) == pytest.approx(100.0)
    assert metrics.bleu(["x y z w"], ["a b c d"]) == pytest.approx(0.0)
    assert 0 < metrics.bleu(["the cat sat on a mat"], ["the cat sat on the mat"]) < 100


def test_edit_distance_and_error_rates():
    assert metrics.edit_distance("kitten", "sitting") == 3
    assert metrics.edit_distance("", "abc") == metrics.edit_distance("abc", "") == 3
    assert metrics.edit_distance([1, 2, 3], [1, 3]) == 1
    # "417" -> "47": one deletion; "12" -> "13": one substitution; 5 reference characters.
    assert metrics.cer(["47", "13"], ["417", "12"]) == pytest.approx(2 / 5)
    assert metrics.cer(["417"], ["417"]) == 0.0
    assert metrics.cer(["4177"], ["4"]) == pytest.approx(3.0)  # insertions can push it past 1
    assert metrics.wer(["four one seven", "two"], ["four one", "two"]) == pytest.approx(1 / 3)
