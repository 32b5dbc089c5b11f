"""Metrics: text generation (exact match, token accuracy, corpus BLEU, edit distance, CER, WER) and multi-label classification."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torchmetrics import MetricCollection


def exact_match(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of hypotheses equal to their reference (after stripping surrounding whitespace)."""
    _check(hyps, refs)
    if not refs:
        return 0.0
    return sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / len(refs)


def token_accuracy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> tuple[int, int]:
    """(correct, counted) next-token argmax predictions of `logits` [..., V] against `targets` [...], skipping `ignore_index`."""
    keep = targets != ignore_index
    correct = (logits.argmax(-1) == targets) & keep
    return int(correct.sum()), int(keep.sum())


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of `hyps` against one reference each: sacrebleu's defaults (13a tokenization), with
    `effective_order` so that n-gram orders longer than every sentence do not zero it (identical texts give 100)."""
    import sacrebleu

    _check(hyps, refs)
    if not refs:
        return 0.0
    return float(sacrebleu.BLEU(effective_order=True).corpus_score(list(hyps), [list(refs)]).score)


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one cost) between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def error_counts(hyps: Sequence[str], refs: Sequence[str], unit: str = "char") -> tuple[int, int]:
    """(summed edit distance, summed reference length) over pairs, in characters or whitespace-split words."""
    _check(hyps, refs)
    split = (lambda s: list(s.strip())) if unit == "char" else (lambda s: s.split())
    edits = sum(edit_distance(split(h), split(r)) for h, r in zip(hyps, refs))
    return edits, sum(len(split(r)) for r in refs)


def cer(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Character error rate: total edit distance over total reference characters (can exceed 1)."""
    edits, length = error_counts(hyps, refs, "char")
    return edits / max(1, length)


def wer(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Word error rate: total word-level edit distance over total reference words."""
    edits, length = error_counts(hyps, refs, "word")
    return edits / max(1, length)


def multilabel(num_labels: int) -> MetricCollection:
    """Multi-label metrics fed (probabilities [N, L], multi-hot targets [N, L]): `exact`, the fraction of samples whose
    predicted set (probability > 0.5) equals the true set, and `map`, the mean over labels of the average precision."""
    # Imported here: torchmetrics takes seconds to import, and only multi-label runs need it.
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MultilabelAveragePrecision, MultilabelExactMatch

    class ExactMatch(MultilabelExactMatch):
        """MultilabelExactMatch that takes an empty batch as no samples (torchmetrics cannot reshape one). A padded
        eval batch updates with no samples rather than not at all: a rank of padding only would hold no `map` state,
        which torchmetrics gathers as a 1-D empty tensor against the other ranks' [N, labels], breaking the sync."""

        def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
            if len(preds):
                super().update(preds, target)

    return MetricCollection(
        {"exact": ExactMatch(num_labels, threshold=0.5), "map": MultilabelAveragePrecision(num_labels, average="macro")}
    )


def _check(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
