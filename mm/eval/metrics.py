"""Evaluation metrics, from well-kept libraries where they exist: BLEU (sacrebleu), ROUGE-L (rouge-score),
WER/CER (jiwer); exact match and token F1 as in the SQuAD evaluation script.

Every function takes (predictions, references) in that order, one reference string (or a list of them, where
stated) per prediction, and returns a corpus figure in percent (0..100; WER and CER can exceed 100).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _check(predictions: Sequence, references: Sequence) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists of strings, not a single string")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")


def _ref_lists(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def normalize_text(text: str) -> str:
    """Lower case, punctuation removed, single spaces (for WER/CER)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and the articles a/an/the removed, single spaces."""
    return " ".join(_ARTICLES.sub(" ", _PUNCT.sub("", text.lower())).split())


def bleu4(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU-4 as sacrebleu computes it (13a tokenisation, exponential brevity penalty, no smoothing
    beyond sacrebleu's default 'exp'); several references per prediction allowed."""
    import sacrebleu

    _check(predictions, references)
    refs = _ref_lists(references)
    n_refs = max(len(r) for r in refs)
    # sacrebleu wants reference *streams*: stream k holds the k-th reference of every sentence (None if absent)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(n_refs)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean sentence ROUGE-L F-measure (rouge-score, no stemming); the best reference where there are several."""
    from rouge_score import rouge_scorer

    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = zip(predictions, _ref_lists(references))
    scores = [scorer.score_multi(refs, pred)["rougeL"].fmeasure for pred, refs in pairs]
    return 100.0 * sum(scores) / len(scores)


def _jiwer_rate(measure: str, predictions, references, normalize: bool) -> float:
    """jiwer's corpus `measure` ("wer" or "cer") in percent, on `normalize_text`-ed texts if `normalize`."""
    import jiwer

    _check(predictions, references)
    hyps = [normalize_text(p) if normalize else p for p in predictions]
    refs = [normalize_text(r) if normalize else r for r in references]
    for i, r in enumerate(refs):
        if not r.strip():
            raise ValueError(f"reference {i} is empty{' after normalisation' if normalize else ''}: {references[i]!r}")
    return 100.0 * float(getattr(jiwer, measure)(refs, hyps))


def wer(predictions: Sequence[str], references: Sequence[str], normalize: bool = True) -> float:
    """Corpus word error rate, (substitutions + deletions + insertions) / reference words, by jiwer."""
    return _jiwer_rate("wer", predictions, references, normalize)


def cer(predictions: Sequence[str], references: Sequence[str], normalize: bool = True) -> float:
    """Corpus character error rate (spaces count as characters), by jiwer."""
    return _jiwer_rate("cer", predictions, references, normalize)


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Percent of predictions equal to a reference after `normalize_answer` ("The red." == "red")."""
    _check(predictions, references)
    hits = [any(normalize_answer(p) == normalize_answer(r) for r in refs)
            for p, refs in zip(predictions, _ref_lists(references))]
    return 100.0 * sum(hits) / len(hits)


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:  # SQuAD: two empty answers agree, one empty answer scores zero
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean SQuAD token F1 (bag of normalised words; the best reference where there are several)."""
    _check(predictions, references)
    scores = [max(_f1(p, r) for r in refs) for p, refs in zip(predictions, _ref_lists(references))]
    return 100.0 * sum(scores) / len(scores)


def object_f1(predictions: Sequence[Sequence], references: Sequence[Sequence]) -> dict[str, float]:
    """Micro precision, recall and F1 (percent) of predicted objects against reference objects, item by item:
    an object is right when it equals an unmatched reference object of its item (multiset intersection)."""
    _check(predictions, references)
    right = sum(sum((Counter(p) & Counter(r)).values()) for p, r in zip(predictions, references))
    n_pred, n_ref = sum(map(len, predictions)), sum(map(len, references))
    precision, recall = 100 * right / max(1, n_pred), 100 * right / max(1, n_ref)
    return {"precision": precision, "recall": recall, "f1": 200 * right / max(1, n_pred + n_ref)}
