"""Answer n-gram drafts: what the table proposes, and that it is tied to its tokenizer."""

from __future__ import annotations

import logging

from omnict_core.inference.drafting import ANSWER_NGRAMS_FILE, ANSWER_START, AnswerDrafter
from omnict_core.tokenization_omnict import train_tokenizer

EOS = 99


def test_proposes_the_most_frequent_continuation_of_the_longest_known_context():
    answers = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 5], [7, 2, 3, 6]]
    drafter = AnswerDrafter.from_answers(answers, EOS, context=3, min_share=0.0)
    assert drafter.table[(ANSWER_START,)] == (1, 0.75)
    assert drafter.propose([], 10) == [1, 2, 3, 4, EOS]  # stops after <|im_end|>
    assert drafter.propose([], 2) == [1, 2]  # and at the limit
    assert drafter.propose([7, 2], 10) == [3, 6, EOS]  # after 7, 2, 3 comes 6, not the more frequent 4
    assert drafter.propose([42], 10) == []  # never seen: no draft


def test_stops_where_the_best_follower_is_too_rare():
    answers = [[1, 2, 3], [1, 2, 4], [1, 2, 5], [1, 2, 6]]  # after (1, 2) each follower has a 0.25 share
    assert AnswerDrafter.from_answers(answers, EOS, min_share=0.5).propose([], 10) == [1, 2]
    assert len(AnswerDrafter.from_answers(answers, EOS, min_share=0.25).propose([], 10)) == 4


def test_table_round_trips_and_is_refused_for_another_vocabulary(tmp_path, caplog):
    tokenizer = train_tokenizer(["the liver is normal", "no stone in the kidney"] * 5, vocab_size=300)
    answers = [tokenizer.encode(t, add_special_tokens=False) for t in ("the liver is normal", "no stone")]
    drafter = AnswerDrafter.from_answers(answers, EOS)
    drafter.save(tmp_path, tokenizer)
    loaded = AnswerDrafter.load(tmp_path, tokenizer)
    assert loaded is not None and loaded.table == {k: (t, round(s, 4)) for k, (t, s) in drafter.table.items()}
    assert loaded.propose(answers[0][:1], 20) == drafter.propose(answers[0][:1], 20) == [*answers[0][1:], EOS]

    other = train_tokenizer(["completely different words here"] * 5, vocab_size=300)
    with caplog.at_level(logging.WARNING):
        assert AnswerDrafter.load(tmp_path, other) is None
    assert "engine.drafter_ignored" in caplog.text
    (tmp_path / ANSWER_NGRAMS_FILE).unlink()
    assert AnswerDrafter.load(tmp_path, tokenizer) is None
