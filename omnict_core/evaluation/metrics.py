"""Scores of MedEval-CT style evaluation (paper App. E): accuracy for closed-ended (yes/no judgment) and
multiple-choice questions; BLEU, ROUGE-L, METEOR and token-F1 for open answers (short answers, reports).

The lexical metrics come from maintained packages, never re-implemented here:
BLEU and METEOR from ``nltk`` (METEOR's WordNet from Debian's ``wordnet-base``, see ``wordnet.py``),
ROUGE-L from Google's ``rouge-score``. Token-F1 is the SQuAD-style bag-of-tokens F1 (Saab et al. 2024 use the
same definition); it is three lines of set arithmetic, so it is written out here.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

CLOSED_TASKS = ("judgment", "multiple_choice")
OPEN_TASKS = ("short_answer", "report")
_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens (numbers with decimals kept whole: '12.5 mm' -> ['12.5', 'mm'])."""
    return _WORD.findall(text.lower())


# ------------------------------------------------------------------------------------- closed-ended answers
def normalize_yes_no(text: str) -> str | None:
    """'Yes.' / 'yes, there is ...' -> 'yes'; anything that does not start with yes/no -> None (counted wrong)."""
    words = tokenize(text)
    if words and words[0] in ("yes", "no"):
        return words[0]
    return None


def extract_choice(text: str, letters: Sequence[str] = "ABCDEF") -> str | None:
    """The option letter a multiple-choice answer starts with: 'B', 'B.', '(B) right lower lobe' -> 'B'."""
    match = re.match(r"\s*\(?([A-Za-z])(?:[\).:,\s]|$)", text)
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    return None


def is_correct(sample: dict, prediction: str) -> bool:
    """Closed-question correctness: yes/no equality for judgment, letter equality for multiple choice,
    normalized exact match for short answers."""
    task = sample["task_type"]
    answer = sample["answer"]
    if task == "judgment":
        return normalize_yes_no(prediction) == normalize_yes_no(answer)
    if task == "multiple_choice":
        return extract_choice(prediction) == extract_choice(answer)
    return tokenize(prediction) == tokenize(answer)


def named_option(sample: dict, prediction: str) -> str | None:
    """The option a multiple-choice answer names after its letter: 'A. right kidney' -> 'right kidney' when that
    is one of the sample's ``options`` (compared as lower-case words); None when it names none of them."""
    text = re.sub(r"^\s*\(?[A-Za-z](?:[\).:,]|\s|$)\s*", "", prediction, count=1)
    words = tokenize(text)
    return next((option for option in sample.get("options") or () if tokenize(option) == words), None)


def chance_level(sample: dict) -> float:
    """Expected accuracy of a guess that ignores the image: 1/2 for yes/no, 1/k for k lettered options."""
    if sample["task_type"] == "judgment":
        return 0.5
    if sample["task_type"] == "multiple_choice":
        return 1.0 / len(sample["options"])
    return float("nan")


# ---------------------------------------------------------------------------------------------- open answers
def token_f1(prediction: str, reference: str) -> float:
    pred, ref = tokenize(prediction), tokenize(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class OpenAnswerScorer:
    """BLEU-4 (smoothed sentence BLEU, method 1), ROUGE-L F, METEOR, token-F1 for one prediction/reference pair.

    METEOR is ``None`` (and ``meteor_unavailable`` says why) when WordNet is not on the machine: we report it as
    unavailable rather than approximate it.
    """

    def __init__(self) -> None:
        from nltk.translate.bleu_score import SmoothingFunction
        from rouge_score import rouge_scorer

        from omnict_core.evaluation.wordnet import WordNetUnavailable, load_wordnet

        self._smoothing = SmoothingFunction().method1
        self._rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        try:
            self._wordnet = load_wordnet()
            self.meteor_unavailable: str | None = None
        except WordNetUnavailable as exc:
            self._wordnet = None
            self.meteor_unavailable = str(exc)

    def score(self, prediction: str, reference: str) -> dict[str, float | None]:
        from nltk.translate.bleu_score import sentence_bleu
        from nltk.translate.meteor_score import meteor_score

        pred, ref = tokenize(prediction), tokenize(reference)
        # Short answers ('right upper lobe') have < 4 tokens: weight only the n-grams that can exist.
        order = max(1, min(4, len(ref)))
        weights = tuple([1.0 / order] * order)
        bleu = sentence_bleu([ref], pred, weights=weights, smoothing_function=self._smoothing) if pred else 0.0
        rouge_l = self._rouge.score(reference, prediction)["rougeL"].fmeasure
        meteor = meteor_score([ref], pred, wordnet=self._wordnet) if self._wordnet is not None and pred else (
            0.0 if self._wordnet is not None else None)
        return {"bleu": float(bleu), "rouge_l": float(rouge_l), "meteor": meteor,
                "token_f1": token_f1(prediction, reference)}


# ------------------------------------------------------------------------------------------------ aggregation
@dataclass
class GroupScore:
    """Accumulates closed accuracy (+ chance) and open-answer metrics for one table row."""

    closed_correct: int = 0
    closed_total: int = 0
    chance_sum: float = 0.0
    # Multiple choice, read two ways (a diagnostic beside the scored letter): did the answer name the right
    # option's text, and does its letter point at the option it names? A model that sees the finding but cannot
    # look up its letter scores high on the first and at chance on the second.
    choice_total: int = 0
    choice_named_correct: int = 0
    choice_letter_agrees: int = 0
    open_metrics: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, sample: dict, prediction: str, open_scores: dict | None) -> None:
        if sample["task_type"] in CLOSED_TASKS:
            self.closed_total += 1
            self.closed_correct += int(is_correct(sample, prediction))
            self.chance_sum += chance_level(sample)
            if sample["task_type"] == "multiple_choice":
                self.add_choice(sample, prediction)
        elif open_scores is not None:
            self.open_metrics["exact"].append(float(is_correct(sample, prediction)))
            for name, value in open_scores.items():
                if value is not None:
                    self.open_metrics[name].append(value)

    def add_choice(self, sample: dict, prediction: str) -> None:
        options = list(sample["options"])

        def option_at(letter: str | None) -> str | None:
            index = ord(letter) - ord("A") if letter else len(options)
            return options[index] if index < len(options) else None

        named = named_option(sample, prediction)
        self.choice_total += 1
        self.choice_named_correct += int(named is not None and named == option_at(extract_choice(sample["answer"])))
        self.choice_letter_agrees += int(named is not None and named == option_at(extract_choice(prediction)))

    @property
    def accuracy(self) -> float | None:
        return self.closed_correct / self.closed_total if self.closed_total else None

    @property
    def choice_named_accuracy(self) -> float | None:
        return self.choice_named_correct / self.choice_total if self.choice_total else None

    @property
    def choice_letter_agreement(self) -> float | None:
        return self.choice_letter_agrees / self.choice_total if self.choice_total else None

    @property
    def chance(self) -> float | None:
        return self.chance_sum / self.closed_total if self.closed_total else None

    def open_mean(self, name: str) -> float | None:
        values = self.open_metrics.get(name) or []
        return sum(values) / len(values) if values else None

    @property
    def open_count(self) -> int:
        return len(self.open_metrics.get("token_f1", []))


GROUP_KEYS = ("organ", "category", "finding_type", "size_bucket", "dim", "task_type")


def score_predictions(samples: Sequence[dict], predictions: Sequence[str], scorer: OpenAnswerScorer | None = None,
                      group_keys: Iterable[str] = GROUP_KEYS) -> dict:
    """Overall + per-group scores. Returns {"overall": GroupScore, "groups": {key: {value: GroupScore}}}."""
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    scorer = scorer or OpenAnswerScorer()
    overall = GroupScore()
    groups: dict[str, dict[str, GroupScore]] = {key: defaultdict(GroupScore) for key in group_keys}
    for sample, prediction in zip(samples, predictions):
        open_scores = scorer.score(prediction, sample["answer"]) if sample["task_type"] in OPEN_TASKS else None
        overall.add(sample, prediction, open_scores)
        for key in groups:
            groups[key][str(sample.get(key, "n/a"))].add(sample, prediction, open_scores)
    return {"overall": overall, "groups": {k: dict(v) for k, v in groups.items()},
            "meteor_unavailable": scorer.meteor_unavailable}


OPEN_METRIC_NAMES = ("exact", "bleu", "rouge_l", "meteor", "token_f1")


def summarize(result: dict) -> dict:
    """JSON-ready view of ``score_predictions`` output."""

    def view(score: GroupScore) -> dict:
        out = {"closed_n": score.closed_total, "accuracy": score.accuracy, "chance": score.chance,
               "open_n": score.open_count}
        for name in OPEN_METRIC_NAMES:
            out[name] = score.open_mean(name)
        out.update(choice_n=score.choice_total, choice_named=score.choice_named_accuracy,
                   choice_letter_agrees=score.choice_letter_agreement)
        return out

    return {
        "overall": view(result["overall"]),
        "groups": {key: {value: view(score) for value, score in sorted(rows.items())}
                   for key, rows in result["groups"].items()},
        "meteor_unavailable": result["meteor_unavailable"],
    }


def format_table(title: str, rows: dict[str, dict], columns: Sequence[tuple[str, str]]) -> str:
    """Plain-text table: one row per group value, the chosen (key, header) columns; None shown as '-'."""
    headers = [title] + [header for _, header in columns]
    body = []
    for name, row in rows.items():
        cells = [name]
        for key, _ in columns:
            value = row.get(key)
            cells.append("-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value)))
        body.append(cells)
    widths = [max(len(str(r[i])) for r in [headers] + body) for i in range(len(headers))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in body)
    return "\n".join(lines)
