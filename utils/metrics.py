"""Evaluation metrics: corpus-level BLEU-4 and exact match, and the one text normaliser that
evaluation, the GRPO rewards and `make_dpo_pairs` compare answers with."""
import unicodedata
from collections import defaultdict


def char_tokens(text: str) -> list[str]:
    # Chinese has no spaces: BLEU is taken over characters, spaces ignored.
    return [c for c in text if not c.isspace()]


def bleu4(references: list[str], hypotheses: list[str]) -> float:
    """Corpus-level BLEU-4 over characters, all rows pooled (not a mean of per-batch scores).

    Smoothing (nltk method1) keeps a row without any matching 4-gram from zeroing the corpus.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references for {len(hypotheses)} hypotheses")
    if not references:
        return 0.0
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu  # imported when scored: a second at start-up
    return float(corpus_bleu([[char_tokens(r)] for r in references], [char_tokens(h) for h in hypotheses],
                             smoothing_function=SmoothingFunction().method1))


def normalise(text: str) -> str:
    """The form answers are compared in: NFKC (full-width letters, digits and punctuation as their
    ASCII forms, e.g. "６" -> "6", "，" -> ","; CJK text is unchanged) with whitespace of every kind
    removed (spaces, tabs, newlines, U+3000)."""
    return "".join(unicodedata.normalize("NFKC", text).split())


def exact_match_by_group(references: list[str], hypotheses: list[str], groups: list[str] | None = None) -> dict:
    """{group: (correct, total)} plus "all"; answers compare as `normalise` leaves them."""
    counts = defaultdict(lambda: [0, 0])
    for i, (ref, hyp) in enumerate(zip(references, hypotheses)):
        for key in ("all", groups[i]) if groups else ("all",):
            counts[key][0] += normalise(ref) == normalise(hyp)
            counts[key][1] += 1
    return {k: tuple(v) for k, v in counts.items()}
