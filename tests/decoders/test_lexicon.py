"""The lexicon scorer (decoders.lexicon): the look-ahead unigram sums to log P(word) whatever the token split, words
outside the lexicon are barred (or cost P_unk), and a search with it spells a word the CTC posteriors slightly
misspell."""
import math

import pytest
import torch

from decoders.beam_search import weighted_beam_search
from decoders.lexicon import BOUNDARY, OOV, Lexicon, LexiconScorer
from decoders.scorers import CTCScorer

# token ids: 0 blank, 1 <s>, 2 </s> (eos), then pieces
PIECES = ["<unk>", "<s>", "</s>", "<0x41>", "▁", "▁t", "t", "h", "e", "he", "▁the", "▁then", "n", "▁a", "a", "▁at",
          "?"]
EOS = 2
WORDS = {"the": 5, "then": 2, "a": 2, "at": 1, "hen": 1, "ten": 1}
TOTAL = sum(WORDS.values())


def lexicon() -> Lexicon:
    return Lexicon(list(WORDS), list(WORDS.values()))


def spell(scorer: LexiconScorer, tokens: list[str]) -> float:
    """The scorer's total over `tokens` (piece strings) from the start of an utterance, scored one at a time."""
    state, total = [BOUNDARY], 0.0
    for piece in tokens:
        t = PIECES.index(piece)
        scores, scored = scorer.score(torch.zeros(1, 0, dtype=torch.long), state)
        total += float(scores[0, t])
        state = scorer.select(scored, torch.tensor([0]), torch.tensor([t]))
    return total


def test_tree_holds_each_words_probability():
    lex = lexicon()
    assert len(lex) == len(WORDS)
    for w, c in WORDS.items():
        assert w in lex and lex.log_prob(w) == pytest.approx(math.log(c / TOTAL))
    assert "th" not in lex and "thee" not in lex and lex.log_prob("x") == -math.inf
    assert Lexicon(["A", "a", "b"]).log_prob("a") == pytest.approx(math.log(2 / 3))  # lower-cased, merged
    zero = Lexicon(["a", "ab"], [1, 0])  # a word of count 0 is left out (no node of mass 0 to divide by)
    assert "ab" not in zero and len(zero) == 1 and zero.log_prob("a") == 0.0


@pytest.mark.parametrize("split", [["▁the"], ["▁t", "he"], ["▁t", "h", "e"], ["▁", "t", "he"], ["t", "he"]])
def test_a_words_tokens_sum_to_its_log_probability(split):
    scorer = LexiconScorer(lexicon(), PIECES, EOS)
    assert spell(scorer, split + ["</s>"]) == pytest.approx(math.log(5 / TOTAL))


def test_a_sentence_scores_the_sum_of_its_words():
    scorer = LexiconScorer(lexicon(), PIECES, EOS)
    got = spell(scorer, ["▁then", "▁a", "t", "▁t", "he", "n", "</s>"])  # "then at then"
    assert got == pytest.approx(math.log(2 / TOTAL) + math.log(1 / TOTAL) + math.log(2 / TOTAL))
    assert spell(scorer, ["</s>"]) == 0.0  # nothing said: nothing to score


def test_words_outside_a_closed_lexicon_are_barred():
    scorer = LexiconScorer(lexicon(), PIECES, EOS)
    assert spell(scorer, ["▁t", "h", "</s>"]) == -math.inf  # a prefix, not a word
    assert spell(scorer, ["▁t", "a"]) == -math.inf  # no word starts "ta"
    assert spell(scorer, ["▁", "▁the"]) == -math.inf  # an empty word
    assert spell(scorer, ["?"]) == -math.inf and spell(scorer, ["<0x41>"]) == -math.inf
    scores, _ = scorer.score(torch.zeros(1, 0, dtype=torch.long), [BOUNDARY])
    assert scores[0, 0] == -math.inf and scores[0, 1] == -math.inf  # blank and <s> are not text


def test_an_open_lexicon_charges_an_unknown_word_p_unk_once():
    scorer = LexiconScorer(lexicon(), PIECES, EOS, unk_prob=1e-3)
    # "tat": leaves the tree after "t"; what the look-ahead gave "t" is taken back, so the word costs log P_unk
    assert spell(scorer, ["▁t", "a", "t", "</s>"]) == pytest.approx(math.log(1e-3))
    assert spell(scorer, ["▁t", "h", "▁a", "</s>"]) == pytest.approx(math.log(1e-3) + math.log(2 / TOTAL))
    assert scorer.select([OOV], torch.tensor([0]), torch.tensor([PIECES.index("e")])) == [OOV]


def test_a_search_with_the_lexicon_spells_what_the_ctc_head_nearly_misspells():
    """CTC posteriors that say "teh" a little more than "the": the CTC search alone writes "teh", with the
    lexicon it writes "the" (a word), and with a lexicon that lacks both it writes only the lexicon's words."""
    V, frames = len(PIECES), [("▁t", "▁t"), ("e", "h"), ("h", "e")]  # (best, runner-up) per frame
    lp = torch.full((1, 2 * len(frames) + 1, V), -12.0)
    for i, (best, second) in enumerate(frames):
        lp[0, 2 * i, PIECES.index(best)] = math.log(0.55)
        lp[0, 2 * i, PIECES.index(second)] = math.log(0.4)
        lp[0, 2 * i + 1, 0] = 0.0  # blank between
    lp[0, -1, 0] = 0.0
    lp = lp.log_softmax(-1)
    lengths = torch.tensor([lp.shape[1]])

    def search(lex):
        scorers = {"ctc": CTCScorer(lp, lengths, EOS)}
        weights = {"ctc": 1.0}
        if lex is not None:
            scorers["lexicon"], weights["lexicon"] = LexiconScorer(lex, PIECES, EOS), 0.5
        best = weighted_beam_search(scorers, weights, [len(frames)], vocab_size=V, eos=EOS, beam_size=8,
                                    pre_beam_score_key=None)[0][0]
        return "".join(PIECES[t] for t in best.tokens).replace("▁", " ").strip()

    assert search(None) == "teh"
    assert search(lexicon()) == "the"
    assert set(search(Lexicon(["ten", "a"])).split()) <= {"ten", "a"}


def test_lexicon_files(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# unigram counts\nthe 5\nthen 2\n\na\n")
    lex = Lexicon.from_file(path)
    assert lex.log_prob("the") == pytest.approx(math.log(5 / 8)) and lex.log_prob("a") == pytest.approx(math.log(1 / 8))
    path.write_text("the 5\nnot a word\n")
    with pytest.raises(ValueError, match=r"words.txt:2: expected 'word' or 'word count'"):
        Lexicon.from_file(path)
    path.write_text("the five\n")
    with pytest.raises(ValueError, match=r"words.txt:1: the count 'five'"):
        Lexicon.from_file(path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        Lexicon.from_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="empty lexicon"):
        Lexicon([])


def test_a_large_vocabulary_scores_only_the_pre_beam(monkeypatch):
    """Above FULL_BELOW tokens the scorer is partial: on the ids it is given (and eos) it scores what the full
    scorer does, elsewhere -inf; the states it selects are the same."""
    full = LexiconScorer(lexicon(), PIECES, EOS)
    monkeypatch.setattr(LexiconScorer, "FULL_BELOW", len(PIECES))
    part = LexiconScorer(lexicon(), PIECES, EOS)
    assert part.partial and not full.partial
    yseq = torch.zeros(2, 0, dtype=torch.long)
    states = full.select([BOUNDARY], torch.tensor([0, 0]), torch.tensor([PIECES.index("▁t"), PIECES.index("▁a")]))
    ids = torch.tensor([[PIECES.index("he"), PIECES.index("a"), PIECES.index("?")], [PIECES.index("t"), 0, 1]])
    want, _ = full.score(yseq, states)
    got, scored = part.score(yseq, states, ids)
    for n in range(2):
        for t in range(len(PIECES)):
            expect = want[n, t] if t in ids[n].tolist() + [EOS] else -math.inf
            assert got[n, t] == expect, (n, PIECES[t])
    tok = torch.tensor([PIECES.index("he"), PIECES.index("t")])
    assert part.select(scored, torch.tensor([0, 1]), tok) == full.select(states, torch.tensor([0, 1]), tok)
