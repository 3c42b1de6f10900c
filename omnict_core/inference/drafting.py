"""Draft tokens for speculative greedy decoding, looked up in the n-grams of the training answers.

OmniCT's answers are short and their wording repeats (report sentences, "No pleural effusion or pneumothorax.",
option letters followed by the option text). A table built once from the training answers — for every context of up
to ``context`` previous answer tokens, the token that most often followed it there — proposes how an answer goes on;
the engine checks a whole proposal in one decoder pass and keeps the part the model itself would have produced
(retrieval-based drafting, as in REST, He et al. 2023, with a datastore of answer n-grams). The model decides every
token: a draft only saves passes, so the answers are exactly those of plain greedy decoding.

The table is tied to the tokenizer whose ids it stores: it lives in the checkpoint directory
(``answer_ngrams.json``, written by ``omnict-node train`` from its training data) together with a fingerprint of that
tokenizer's vocabulary; a table from another vocabulary is ignored with a warning, never used.

    python -m omnict_core.inference.drafting --model DIR --data DATA_DIR    # (re)build it for a trained checkpoint
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from omnict_core.configuration_omnict import IM_END

logger = logging.getLogger(__name__)

ANSWER_NGRAMS_FILE = "answer_ngrams.json"
FORMAT_VERSION = 1
ANSWER_START = -1  # context entry that stands for "the answer starts here"


def vocabulary_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's token -> id map: a table is valid only for the ids it was built with."""
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocabulary.encode()).hexdigest()


class AnswerDrafter:
    """``propose(answer_so_far, limit)`` -> the tokens that most often followed the answer's last tokens in training.

    ``table`` maps a context (tuple of up to ``context`` token ids; ``ANSWER_START`` first when the context reaches
    back to the start of the answer) to (next token, share): the most frequent follower and the fraction of the
    context's occurrences it was. The longest known context wins; drafting stops at the first context whose best
    follower has a share below ``min_share`` (a guess more likely wasted than kept), at ``<|im_end|>`` or at
    ``limit`` tokens."""

    def __init__(self, table: dict[tuple[int, ...], tuple[int, float]], context: int, eos_id: int,
                 min_share: float = 0.2) -> None:
        self.table, self.context, self.eos_id, self.min_share = table, context, eos_id, min_share

    @classmethod
    def from_answers(cls, answers: Iterable[Sequence[int]], eos_id: int, context: int = 3,
                     min_share: float = 0.2) -> "AnswerDrafter":
        """Count followers of every context in ``answers`` (token ids of each answer, ``eos_id`` appended here)."""
        followers: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        for answer in answers:
            history = [ANSWER_START]
            for token in [*answer, eos_id]:
                for n in range(1, min(context, len(history)) + 1):
                    followers[tuple(history[-n:])][token] += 1
                history.append(token)
        table = {}
        for key, counts in followers.items():
            token, count = counts.most_common(1)[0]
            table[key] = (token, count / sum(counts.values()))
        return cls(table, context, eos_id, min_share)

    def propose(self, answer: Sequence[int], limit: int) -> list[int]:
        """Up to ``limit`` draft tokens continuing ``answer`` (the answer's tokens so far, none of them eos)."""
        history = list(answer[-self.context:])
        if len(answer) < self.context:
            history.insert(0, ANSWER_START)  # the context reaches back to the start of the answer
        draft: list[int] = []
        while len(draft) < limit:
            hit = None
            for n in range(min(self.context, len(history)), 0, -1):
                hit = self.table.get(tuple(history[-n:]))
                if hit is not None:
                    break
            if hit is None or hit[1] < self.min_share:
                break
            draft.append(hit[0])
            if hit[0] == self.eos_id:
                break
            history.append(hit[0])
        return draft

    # ------------------------------------------------------------------------------------------------- files
    def save(self, directory: str | Path, tokenizer) -> Path:
        path = Path(directory) / ANSWER_NGRAMS_FILE
        payload = {
            "format": FORMAT_VERSION, "context": self.context, "eos_id": self.eos_id,
            "vocabulary_sha256": vocabulary_fingerprint(tokenizer),
            "entries": [[list(key), token, round(share, 4)] for key, (token, share) in sorted(self.table.items())],
        }
        path.write_text(json.dumps(payload, separators=(",", ":")))
        return path

    @classmethod
    def load(cls, directory: str | Path, tokenizer, min_share: float = 0.2) -> "AnswerDrafter | None":
        """The checkpoint's table, or None when it has none or it was built for another vocabulary."""
        path = Path(directory) / ANSWER_NGRAMS_FILE
        if not path.is_file():
            return None
        payload = json.loads(path.read_text())
        if payload.get("format") != FORMAT_VERSION or payload.get("vocabulary_sha256") != vocabulary_fingerprint(
                tokenizer):
            logger.warning("engine.drafter_ignored path=%s reason=built for another tokenizer or format", path)
            return None
        table = {tuple(key): (token, share) for key, token, share in payload["entries"]}
        return cls(table, int(payload["context"]), int(payload["eos_id"]), min_share)


def answer_token_ids(samples: Iterable[dict], tokenizer) -> list[list[int]]:
    """Token ids of every assistant turn of training samples in the release's message format."""
    return [tokenizer.encode(turn["value"], add_special_tokens=False)
            for sample in samples for turn in sample["conversations"] if turn["from"] == "gpt"]


def build_for_checkpoint(model_dir: str | Path, samples: Iterable[dict], tokenizer) -> Path:
    """Write ``answer_ngrams.json`` into ``model_dir`` from the answers of ``samples``."""
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    return AnswerDrafter.from_answers(answer_token_ids(samples, tokenizer), eos_id).save(model_dir, tokenizer)


def main() -> None:
    from omnict_core.data.dataset import read_jsonl
    from omnict_core.tokenization_omnict import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory (its tokenizer is used)")
    parser.add_argument("--data", type=Path, required=True, help="data directory holding train.jsonl")
    args = parser.parse_args()
    tokenizer = load_tokenizer(str(args.model))
    path = build_for_checkpoint(args.model, read_jsonl(args.data / "train.jsonl"), tokenizer)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
