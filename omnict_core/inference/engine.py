"""OmniCT inference engine: many questions about one study, answered with shared-prefix KV reuse.

For one study the engine

1. encodes the image ONCE (SigLIP -> TPE -> unshuffle -> MHP; ``EncodedStudy``);
2. groups the questions by organ. OSE tokens depend on the organ (its mask selects the tokens that are aggregated),
   and they sit in the prompt BEFORE the question, so every organ gets its own prefix
   (system turn + user header + L global tokens + L_c organ tokens). Questions naming no organ (or an organ absent
   from the label map) share the "whole body" prefix, whose OSE tokens aggregate the whole grid — exactly what the
   model computes for an empty mask during training;
3. keeps all questions of the call in ONE key/value buffer (batch 1) laid out as a tree (``_Tree``): the shared part
   of the prefix (system turn, user header, the L global visual tokens) once, then every organ group's own prefix
   tokens (L_c organ tokens + the end of the prefix), then every question, then the answer tokens as they are
   generated. A token attends to the shared part, its group's columns and its own question / answer (an attention
   mask per token), at explicit position ids — exactly the keys and positions of its own prompt alone, so answers are
   token-identical to a separate ``model.generate()`` per question (bench/vqa_battery.py and the tests check it).
   No padding, no copies of the prefix per question;
4. prefills the shared part once (plain causal) and the organ groups + questions in one packed pass;
5. decodes greedily: each step feeds the last token of every unfinished answer as one packed sequence; an answer
   leaves when it emits ``<|im_end|>`` or reaches its limit. With the checkpoint's draft table
   (``answer_ngrams.json``, ``drafting.AnswerDrafter``) each answer's token is followed by a few draft tokens looked
   up in the training answers' n-grams, and every draft token that equals the model's own greedy choice is one pass
   saved (the others are hidden from later tokens): the same tokens in fewer passes. The Qwen2 decoder runs in a
   lean loop of our own on the model's weights (``LeanQwen2``: same operations, none of HF generate's per-step
   machinery). A closed question (``Question.choices``, e.g. Yes / No) is not decoded: every choice is a branch after its
   question, all branches of all such questions are scored in one packed pass, and the answer is the choice with
   the highest log P(choice + eos | prompt) (``_rank_choices``);
6. optionally computes, per answer, the relevance of each reconstruction unit: the attention (eager definition:
   softmax(q k^T / sqrt(d) + mask), fp32) from the positions that produced the answer tokens to the global visual
   tokens, averaged over layers and heads, summed per unit and normalised, recomputed from the queries and keys the
   decoding produced (no second pass); the top units are mapped back to source slice indices (key images).

Greedy and deterministic: no sampling anywhere.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from omnict_core.configuration_omnict import IM_END
from omnict_core.inference.drafting import AnswerDrafter
from omnict_core.modeling_omnict import OmniCTForConditionalGeneration, load_omnict
from omnict_core.preprocessing import PreparedStudy
from omnict_core.tokenization_omnict import answer_token_ids, encode_example, expand_placeholders, prompt_prefix

REPORT_PROMPT = "Write a radiology report for this CT: findings and impression."


@dataclass
class Question:
    text: str
    organ: str | tuple[str, ...] | None = None  # label name(s) of the study's label map (e.g. 'liver'); None = whole body
    max_new_tokens: int | None = None
    # Closed question: the answers it allows (e.g. ('Yes', 'No'), or 'A. x', 'B. y' for lettered options). The
    # engine then ranks them by the model's likelihood instead of generating: the answer is always one of them.
    choices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.choices is not None:
            self.choices = tuple(self.choices)
            if len(self.choices) < 2 or not all(c.strip() for c in self.choices):
                raise ValueError(f"choices must be two or more non-empty answers, got {self.choices!r}")


@dataclass
class Answer:
    question: str
    organ: str | None
    text: str
    token_ids: list[int]
    unit_relevance: list[float] = field(default_factory=list)  # one per unit, sums to 1 ([] when not computed)
    key_units: list[int] = field(default_factory=list)  # most relevant units, best first
    key_slices: list[int] = field(default_factory=list)  # source slice indices of the key units
    key_sop_instance_uids: list[str] = field(default_factory=list)  # their SOPInstanceUIDs (DICOM series input)
    finished: bool = True  # False when max_new_tokens cut the answer
    # With Question.choices: per choice, log P(choice tokens + <|im_end|> | prompt) under the model (natural log)
    choice_log_likelihoods: list[float] = field(default_factory=list)


@dataclass
class EncodedStudy:
    """The vision side of one study, computed once: global token grid F^ (N_u, h, w, d_h)."""

    study: PreparedStudy
    grid: torch.Tensor
    organ_tokens: dict[tuple[int, ...] | None, torch.Tensor | None] = field(default_factory=dict)

    @property
    def global_tokens(self) -> torch.Tensor:
        return self.grid.reshape(-1, self.grid.shape[-1])  # (L, d_h)


@dataclass
class DecodeStats:
    """What the decoding of the last ``ask()`` took: decoder passes after the prefill, draft tokens fed, and how many
    of them were kept (each kept draft token is one pass saved)."""

    passes: int = 0
    draft_tokens: int = 0
    draft_tokens_kept: int = 0


class OmniCTEngine:
    """``OmniCTEngine(model_dir_or_model, tokenizer=None, device='cpu')``; then ``ask(study, questions)`` /
    ``report(study)``. ``study`` is a ``PreparedStudy`` (omnict_core.preprocessing.prepare_input)."""

    def __init__(self, model: OmniCTForConditionalGeneration | str | Path, tokenizer=None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 max_new_tokens: int = 48, top_k_units: int = 2, drafter: AnswerDrafter | None = None,
                 draft_tokens: int = 8) -> None:
        if isinstance(model, (str, Path)):
            directory = Path(model)
            model, loaded_tokenizer = load_omnict(directory, device=device, dtype=dtype)
            tokenizer = tokenizer or loaded_tokenizer
            drafter = drafter or AnswerDrafter.load(directory, tokenizer)
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with an in-memory model")
        self.drafter = drafter
        self.draft_tokens = draft_tokens if drafter is not None else 0
        self.last_decode = DecodeStats()
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.config = model.config
        self.max_new_tokens = max_new_tokens
        self.top_k_units = top_k_units
        self.eos_id = tokenizer.convert_tokens_to_ids(IM_END)
        self._lean = LeanQwen2(self.model.language_model)
        self._prompt_cache: dict[tuple[str, int, str | None], tuple[int, ...]] = {}

    # --------------------------------------------------------------------------------------------- vision once
    @torch.no_grad()
    def encode(self, study: PreparedStudy) -> EncodedStudy:
        units = study.pixel_units.to(self.device)
        grid = self.model.encode_units(units, study.kind)  # (N_u, h, w, d_h)
        return EncodedStudy(study=study, grid=grid)

    @torch.no_grad()
    def _organ_tokens(self, encoded: EncodedStudy, label_ids: tuple[int, ...] | None) -> torch.Tensor | None:
        if not self.config.use_ose:
            return None
        if label_ids not in encoded.organ_tokens:
            mask = encoded.study.organ_mask(label_ids) if label_ids else None
            token_mask = None if mask is None else self.model.ose.token_mask(mask.to(self.device), encoded.study.kind)
            encoded.organ_tokens[label_ids] = self.model.ose(encoded.grid, token_mask, encoded.study.kind)
        return encoded.organ_tokens[label_ids]

    def _label_ids(self, study: PreparedStudy, organ: str | None) -> tuple[int, ...] | None:
        ids = study.organ_label_ids(organ)
        return tuple(sorted(ids)) if ids else None

    # ------------------------------------------------------------------------------------------------ prompts
    def prefix_ids(self, study: PreparedStudy) -> list[int]:
        return list(self._tokenised(study.kind, study.num_units, None))

    def full_prompt_ids(self, study: PreparedStudy, question: str) -> list[int]:
        """Exactly what the baseline (and training) feeds: used to cut the question suffix after the prefix."""
        return list(self._tokenised(study.kind, study.num_units, question))

    def _tokenised(self, kind: str, num_units: int, question: str | None) -> tuple[int, ...]:
        """Prompt ids (the shared prefix when ``question`` is None), memoised: a protocol asks the same questions
        about every study, and rendering + tokenising them is a per-question cost the engine need not repeat."""
        key = (kind, num_units, question)
        ids = self._prompt_cache.get(key)
        if ids is None:
            if question is None:
                raw = self.tokenizer.encode(prompt_prefix(kind), add_special_tokens=False)
                ids = tuple(expand_placeholders(raw, self.config, kind, num_units))
            else:
                ids = tuple(encode_example(self.tokenizer, self.config, kind, question, num_units=num_units).input_ids)
            if len(self._prompt_cache) >= 4096:
                self._prompt_cache.clear()
            self._prompt_cache[key] = ids
        return ids

    # ---------------------------------------------------------------------------------------------------- API
    def ask(self, study: PreparedStudy, questions: Sequence[Question | str], *, max_new_tokens: int | None = None,
            with_relevance: bool = True, encoded: EncodedStudy | None = None) -> list[Answer]:
        """Answer ``questions`` about ``study``; answers come back in question order."""
        questions = [q if isinstance(q, Question) else Question(q) for q in questions]
        if not questions:
            return []
        encoded = encoded or self.encode(study)
        return self._answer(encoded, questions, max_new_tokens, with_relevance)

    def report(self, study: PreparedStudy, *, organ: str | None = None, max_new_tokens: int = 160,
               prompt: str = REPORT_PROMPT, with_relevance: bool = True) -> Answer:
        """A long-form answer (radiology report) for the study."""
        return self.ask(study, [Question(prompt, organ, max_new_tokens)], with_relevance=with_relevance)[0]

    # ------------------------------------------------------------------------------------------------- engine
    @torch.inference_mode()
    def _answer(self, encoded: EncodedStudy, questions: Sequence[Question], max_new_tokens: int | None,
                with_relevance: bool) -> list[Answer]:
        model, study, lean = self.model, encoded.study, self._lean
        prefix = self.prefix_ids(study)
        prefix_len = len(prefix)
        suffixes = []
        for q in questions:
            full = self.full_prompt_ids(study, q.text)
            if full[:prefix_len] != prefix or len(full) == prefix_len:  # tokenisation merged across the boundary
                raise ValueError(f"question {q.text!r} does not tokenise after the shared prefix")
            suffixes.append(full[prefix_len:])
        limits = [q.max_new_tokens or max_new_tokens or self.max_new_tokens for q in questions]
        free = [row for row, q in enumerate(questions) if not q.choices]  # generated
        ranked = [row for row, q in enumerate(questions) if q.choices]  # one of their choices, by likelihood
        choice_ids = {row: [self._choice_ids(c) for c in questions[row].choices] for row in ranked}
        decode_room = sum(limits[row] for row in free) * (2 if self.draft_tokens else 1)
        branch_room = sum(len(ids) for branches in choice_ids.values() for ids in branches)

        # One prefix per organ group (same length P: L + L_c visual tokens).
        keys = [self._label_ids(study, q.organ) if self.config.use_ose else None for q in questions]
        organs = list(OrderedDict.fromkeys(keys))
        group_of = [organs.index(k) for k in keys]
        visual = [(encoded.global_tokens, self._organ_tokens(encoded, key)) for key in organs]
        prefix_tensor = torch.tensor([prefix] * len(organs), device=self.device)
        embeds = model.splice_visual_tokens(prefix_tensor, [study.kind] * len(organs), visual)  # (G, P, d_h)
        organ_ids = (self.config.mask2d_token_id, self.config.mask3d_token_id)
        split = next((i for i, t in enumerate(prefix) if t in organ_ids), prefix_len)

        tree = _Tree(self.device, capacity=split + len(organs) * (prefix_len - split) + sum(map(len, suffixes))
                     + decode_room + branch_room, group_of=group_of, groups=len(organs))
        cache = lean.empty_cache(1, tree.capacity, embeds.dtype, self.device)
        # 1. shared part (system turn, user header, the L global visual tokens): once, plain causal
        lean.forward(embeds[:1, :split], tree.add_shared(split), cache, 0, None, logits=False)
        # 2. every organ group's own tokens (organ tokens + end of the prefix) and every question: one packed pass
        start = tree.length
        pieces, last = [], []
        for g in range(len(organs)):
            tree.add_group(g, range(split, prefix_len))
            pieces.append(embeds[g, split:])
        for row, suffix in enumerate(suffixes):
            tree.add_row(row, range(prefix_len, prefix_len + len(suffix)))
            last.append(tree.length - 1)
        pieces.append(lean.embed(torch.tensor([t for s in suffixes for t in s], device=self.device)))
        queries = [None] * lean.num_layers if with_relevance else None
        last_t = torch.tensor(last, device=self.device)
        logits = lean.forward(torch.cat(pieces)[None], tree.position[start:tree.length][None], cache, start,
                              tree.packed_mask(start), select=last_t - start, record=queries)
        next_pos = [prefix_len + len(s) for s in suffixes]
        self.last_decode = DecodeStats()
        generated: list[list[int]] = [[] for _ in questions]
        trace = [[] for _ in questions] if with_relevance else None
        if free:
            self._greedy_decode(*_rows_of(logits, queries, free), cache, tree, free, last, next_pos, limits,
                                generated, trace)
        likelihoods, chosen = self._rank_choices(*_rows_of(logits, queries, ranked), cache, tree, ranked, choice_ids,
                                                 last, next_pos, generated, trace) if ranked else ({}, {})

        answers = []
        for row, (q, tokens) in enumerate(zip(questions, generated)):
            finished = bool(tokens) and tokens[-1] == self.eos_id
            text_ids = tokens[:-1] if finished else tokens
            text = q.choices[chosen[row]] if q.choices else \
                self.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
            answers.append(Answer(question=q.text, organ=q.organ, token_ids=text_ids, finished=finished, text=text,
                                  choice_log_likelihoods=likelihoods.get(row, [])))
        if with_relevance:
            self._attach_relevance(answers, trace, cache, tree, prefix, study)
        return answers

    def _choice_ids(self, choice: str) -> list[int]:
        """A choice's answer tokens, as training labels an answer, without the eos."""
        ids = answer_token_ids(self.tokenizer, choice)
        if not ids:
            raise ValueError(f"choice {choice!r} has no tokens")
        return ids

    def _rank_choices(self, logits: torch.Tensor, queries: list | None, cache: list[tuple[torch.Tensor, torch.Tensor]],
                      tree: "_Tree", rows: Sequence[int], choice_ids: dict[int, list[list[int]]],
                      columns: list[int], next_pos: list[int], generated: list[list[int]],
                      trace: list[list[tuple[int, list[torch.Tensor]]]] | None
                      ) -> tuple[dict[int, list[float]], dict[int, int]]:
        """Closed questions: score every choice of every row in ONE packed pass and answer with the likeliest.

        Each choice is a branch after its question: its tokens t_1..t_n at the positions greedy decoding would give
        them, each seeing its question's sequence and the earlier tokens of its own branch only (``_Tree.add_branch``).
        log P(choice) = log p(t_1 | prompt) (``logits``: the question's last position, row i of ``rows``)
        + sum_k log p(t_k+1 | .. t_k) + log p(eos | .. t_n) — the probability of generating exactly that answer.
        Writes the best choice's tokens + eos to ``generated[row]`` (first choice on a tie) and, with ``trace``, the
        positions that produced them (the branch's columns join the row's sequence for the relevance read-out).
        Returns every row's log-likelihoods, in choice order, and the index of its chosen choice."""
        lean = self._lean
        start = tree.length
        tokens: list[int] = []
        spans: dict[int, list[int]] = {}  # row -> offset of each of its branches in the packed pass
        for row in rows:
            for ids in choice_ids[row]:
                spans.setdefault(row, []).append(len(tokens))
                tree.add_branch(row, range(next_pos[row], next_pos[row] + len(ids)))
                tokens += ids
        record = [None] * lean.num_layers if queries is not None else None
        branch_logits = lean.forward(lean.embed(torch.tensor([tokens], device=self.device)),
                                     tree.position[start:tree.length][None], cache, start, tree.packed_mask(start),
                                     record=record)
        first = torch.log_softmax(logits.float(), dim=-1)  # (rows, V): p(t_1 | prompt)
        after = torch.log_softmax(branch_logits.float(), dim=-1)  # (T, V): p(next | .. t_k)
        likelihoods: dict[int, list[float]] = {}
        chosen: dict[int, int] = {}
        for i, row in enumerate(rows):
            scores = []
            for offset, ids in zip(spans[row], choice_ids[row]):
                targets = torch.tensor(ids[1:] + [self.eos_id], device=self.device)
                steps = torch.arange(offset, offset + len(ids), device=self.device)
                scores.append(float(first[i, ids[0]] + after[steps, targets].sum()))
            likelihoods[row] = scores
            best = chosen[row] = scores.index(max(scores))
            ids, offset = choice_ids[row][best], spans[row][best]
            generated[row] = ids + [self.eos_id]
            if trace is not None:
                branch = list(range(start + offset, start + offset + len(ids)))
                tree.join(row, branch)
                trace[row] = [(columns[row], [q[i] for q in queries])] + \
                    [(column, [r[offset + k] for r in record]) for k, column in enumerate(branch)]
        return likelihoods, chosen

    def _greedy_decode(self, logits: torch.Tensor, queries: list | None,
                       cache: list[tuple[torch.Tensor, torch.Tensor]], tree: "_Tree", rows: Sequence[int],
                       columns: list[int], next_pos: list[int], limits: Sequence[int], generated: list[list[int]],
                       trace: list[list[tuple[int, list[torch.Tensor]]]] | None) -> None:
        """Batched greedy decoding of the questions ``rows`` (their first-token ``logits`` and recorded ``queries``,
        row i of each for ``rows[i]``), with drafts when the engine has a drafter.

        Each step feeds, for every unfinished answer, its newest token followed by up to ``draft_tokens`` draft
        tokens (``AnswerDrafter``) as one packed sequence, each token seeing only its own prompt and answer. The
        newest token's output is the next answer token; a draft token that equals it is kept and its own output is
        one more answer token, and so on. The first draft token that differs and everything after it are hidden
        from later tokens (``_Tree.hide``): every kept token is exactly what one-token-at-a-time greedy decoding
        produces, in fewer passes. An answer leaves when it emits eos or reaches its limit. ``columns``: the buffer
        column of the position that produced each question's first token; ``next_pos``: each question's next
        position id (both indexed by question). Appends each answer's tokens to ``generated[row]`` and, with
        ``trace`` (relevance), the column and the per-layer queries of every position that produced one of them."""
        lean = self._lean
        # one run per unfinished answer in the pass just computed:
        # (row, index of its first output, its buffer columns, the draft tokens fed after its newest token, position)
        runs = [(row, i, [columns[row]], [], next_pos[row] - 1) for i, row in enumerate(rows)]
        draft_room = sum(limits[row] for row in rows) if self.draft_tokens else 0  # draft columns in the buffer
        stats = self.last_decode
        while True:
            predicted = logits.argmax(dim=-1).tolist()
            tokens: list[int] = []
            token_rows: list[int] = []
            positions: list[int] = []
            next_runs = []
            for row, offset, run_columns, draft, position in runs:
                kept = self._accept(predicted[offset: offset + len(run_columns)], draft, generated[row], limits[row])
                stats.draft_tokens_kept += kept - 1
                if trace is not None:
                    trace[row].extend((run_columns[i], [q[offset + i] for q in queries]) for i in range(kept))
                tree.hide(row, run_columns[kept:])
                answer = generated[row]
                if answer[-1] == self.eos_id or len(answer) >= limits[row]:
                    continue
                position += kept  # the newest token's position
                room = min(self.draft_tokens, limits[row] - len(answer) - 1, draft_room)
                new_draft = self.drafter.propose(answer, room) if room > 0 else []
                draft_room -= len(new_draft)
                stats.draft_tokens += len(new_draft)
                next_runs.append((row, len(tokens), new_draft, position))
                fed = [answer[-1], *new_draft]
                tokens += fed
                token_rows += [row] * len(fed)
                positions += range(position, position + len(fed))
            if not next_runs:
                break
            start = tree.length
            position_t = torch.tensor(positions, device=self.device)
            mask = tree.add_tokens(torch.tensor(token_rows, device=self.device), position_t)
            runs = [(row, offset, list(range(start + offset, start + offset + 1 + len(draft))), draft, position)
                    for row, offset, draft, position in next_runs]
            logits = lean.forward(lean.embed(torch.tensor([tokens], device=self.device)), position_t[None], cache,
                                  start, mask, record=queries)
            stats.passes += 1

    def _accept(self, predicted: list[int], draft: list[int], answer: list[int], limit: int) -> int:
        """Append to ``answer`` the tokens the model produced for one run (its newest token + ``draft``): the
        output after the newest token, then one more output per draft token that matched the token before it;
        stops at eos or ``limit``. Returns how many of the run's positions produced a kept token."""
        for i, token in enumerate(predicted):
            answer.append(token)
            if token == self.eos_id or len(answer) >= limit or i == len(draft) or draft[i] != token:
                return i + 1
        return len(predicted)

    # ------------------------------------------------------------------------------------------------ relevance
    def _attach_relevance(self, answers: list[Answer], trace: list[list[tuple[int, list[torch.Tensor]]]],
                          cache: list[tuple[torch.Tensor, torch.Tensor]], tree: "_Tree", prefix: list[int],
                          study: PreparedStudy, chunk: int = 256) -> None:
        """Per answer: attention mass from its generating positions (the last prompt token and every answer token
        but the last: the positions whose outputs WERE the answer tokens) to each unit's global visual tokens,
        averaged over layers and heads, summed per unit and normalised. The probabilities are those of eager
        attention (softmax(q k^T * scale + mask) in fp32), recomputed for all answers at once from the queries and
        keys the decoding already produced — no second forward pass."""
        lean = self._lean
        image_id = self.config.image_token_id(study.kind)
        visual_positions = torch.tensor([i for i, t in enumerate(prefix) if t == image_id], device=self.device)
        per_unit = self.config.tokens_per_unit(study.kind)
        flat = [(i, column, qs) for i, row in enumerate(trace) for column, qs in row]  # every generating position
        columns = torch.tensor([column for _, column, _ in flat], device=self.device)
        owner = torch.tensor([i for i, _, _ in flat], device=self.device)
        keys = [k[0, :, :tree.length].float().repeat_interleave(lean.n_rep, dim=0) for k, _ in cache]  # (heads, T, d)
        per_answer = torch.zeros((len(answers), visual_positions.numel()), device=self.device)
        for lo in range(0, len(flat), chunk):  # chunks of positions bound the (heads, n, length) probabilities
            hi = min(lo + chunk, len(flat))
            blocked = ~tree.visible(owner[lo:hi], columns[lo:hi])  # (n, length)
            to_visual = 0
            for layer, k in enumerate(keys):
                q = torch.stack([qs[layer] for _, _, qs in flat[lo:hi]], dim=1).float()  # (heads, n, head_dim)
                scores = torch.matmul(q, k.transpose(1, 2)) * lean.scaling
                probs = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1)
                to_visual = to_visual + probs[..., visual_positions].mean(dim=0)  # (n, L)
            per_answer.index_add_(0, owner[lo:hi], to_visual.float())  # sums; the means' 1/n cancel out below
        for i, answer in enumerate(answers):
            units = per_answer[i].view(-1, per_unit).sum(dim=1)  # (N_u,)
            relevance = units / units.sum().clamp_min(1e-12)
            order = torch.argsort(relevance, descending=True, stable=True).tolist()
            answer.unit_relevance = [round(float(r), 6) for r in relevance]
            answer.key_units = order[: self.top_k_units]
            answer.key_slices = study.key_slices(answer.key_units)
            if study.slice_uids:
                answer.key_sop_instance_uids = [study.slice_uids[k] for k in answer.key_slices]


def _rows_of(logits: torch.Tensor, queries: list | None, rows: Sequence[int]
             ) -> tuple[torch.Tensor, list | None]:
    """The first-token logits and recorded per-layer queries of the questions ``rows`` (of the packed pass)."""
    index = torch.tensor(list(rows), dtype=torch.long, device=logits.device)
    return logits.index_select(0, index), None if queries is None else [q.index_select(0, index) for q in queries]


class _Tree:
    """Column layout of the packed KV buffer (batch 1) that holds all questions of one ask() as a tree:
    shared prefix | each organ group's own prefix tokens | each question | answer tokens as they are generated.
    ``sees[r]`` marks the columns of question r's own sequence (shared prefix, its group's tokens, its question and
    answer): a token of row r attends to those of them that precede it — exactly its prompt + answer alone."""

    def __init__(self, device: torch.device, capacity: int, group_of: Sequence[int], groups: int) -> None:
        self.device, self.capacity, self.length = device, capacity, 0
        self.group_of = list(group_of)
        self.position = torch.empty(capacity, dtype=torch.long, device=device)
        self.sees = torch.zeros((len(self.group_of), capacity), dtype=torch.bool, device=device)
        self.group_sees = torch.zeros((groups, capacity), dtype=torch.bool, device=device)
        self.arange = torch.arange(capacity, device=device)
        self._packed: list[tuple[torch.Tensor, int]] = []  # (the columns it sees, count) per run of added columns

    def _span(self, positions: Sequence[int]) -> slice:
        span = slice(self.length, self.length + len(positions))
        self.position[span] = torch.as_tensor(list(positions), dtype=torch.long)
        self.length = span.stop
        return span

    def add_shared(self, n: int) -> torch.Tensor:
        span = self._span(range(n))
        self.sees[:, span] = True
        self.group_sees[:, span] = True
        return self.position[span][None]

    def add_group(self, group: int, positions: Sequence[int]) -> None:
        span = self._span(positions)
        self.group_sees[group, span] = True
        for row, g in enumerate(self.group_of):
            if g == group:
                self.sees[row, span] = True
        self._packed.append((self.group_sees[group], span.stop - span.start))

    def add_row(self, row: int, positions: Sequence[int]) -> None:
        span = self._span(positions)
        self.sees[row, span] = True
        self._packed.append((self.sees[row], span.stop - span.start))

    def add_branch(self, row: int, positions: Sequence[int]) -> None:
        """Scratch columns after question ``row`` (one choice of a closed question): they see the row's sequence
        and their own branch, and nothing sees them (``row``'s ``sees`` is not set; ``join`` adopts the chosen
        branch)."""
        span = self._span(positions)
        own = self.sees[row].clone()
        own[span] = True
        self._packed.append((own, span.stop - span.start))

    def join(self, row: int, columns: Sequence[int]) -> None:
        """Columns of a branch become part of question ``row``'s sequence (its chosen answer)."""
        if columns:
            self.sees[row, columns[0]: columns[-1] + 1] = True

    def packed_mask(self, start: int) -> torch.Tensor:
        """bool (1, 1, T, length) for the T columns added since ``start`` by add_group / add_row."""
        seen = torch.cat([row[None].expand(n, -1) for row, n in self._packed])[:, :self.length]
        self._packed = []
        return (seen & (self.arange[None, :self.length] <= self.arange[start:self.length, None]))[None, None]

    def add_tokens(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One column per token, for the row of each (a row's tokens consecutive, in order, at ``positions``);
        returns their mask (1, 1, T, length): a token sees its row's columns up to its own."""
        span = slice(self.length, self.length + rows.numel())
        self.position[span] = positions
        self.sees.index_put_((rows, self.arange[span]), torch.ones((), dtype=torch.bool, device=self.device))
        self.length = span.stop
        return self.visible(rows, self.arange[span])[None, None]

    def hide(self, row: int, columns: Sequence[int]) -> None:
        """Rejected draft tokens: no later token of ``row`` attends to their columns."""
        if columns:
            self.sees[row, columns[0]: columns[-1] + 1] = False

    def visible(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """bool (n, length): what the token of ``rows[i]`` at column ``columns[i]`` attends to."""
        keys = self.arange[None, :self.length]
        return self.sees.index_select(0, rows)[:, :self.length] & (keys <= columns[:, None])


class LeanQwen2:
    """The Qwen2 decoder of ``Qwen2ForCausalLM`` run directly on its modules' weights, with a KV buffer of our own.

    Same operations as the Hugging Face forward (RMSNorm in fp32, q/k/v/o and MLP linears, RoPE from the model's
    rotary module, SDPA), without its per-call machinery (Cache objects, mask builders, output capturing, logits
    processors), which dominates a decode step of a small model on CPU. Grouped-query attention runs on the
    key/value heads without repeating them: the query heads of one kv group are stacked as extra query rows of
    that kv head (HF's ``pack_gqa`` for single tokens, here for any length). Full attention layers only.
    """

    def __init__(self, lm) -> None:
        config = lm.config
        types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        if any(t != "full_attention" for t in types[: config.num_hidden_layers]):
            raise ValueError("the OmniCT engine supports full-attention Qwen2 layers only (no sliding window)")
        self.lm = lm
        self.layers = list(lm.model.layers[: config.num_hidden_layers])
        self.num_layers = len(self.layers)
        attention = self.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.n_rep = self.heads // self.kv_heads
        self.scaling = attention.scaling

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.model.embed_tokens(ids)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin of the model's rotary module for positions 0 .. n-1 (n: a power of two >= the largest position
        asked so far), computed once and indexed: the same per-position values as calling the module each step."""
        table = getattr(self, "_rope_table", None)
        if table is None or table[0].dtype != x.dtype or table[0].device != x.device or \
                table[0].shape[0] <= int(positions.max()):
            n = max(256, 1 << int(positions.max()).bit_length())
            cos, sin = self.lm.model.rotary_emb(x, torch.arange(n, device=x.device)[None])
            half = sin.shape[-1] // 2
            sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)  # for roll() in place of rotate_half()
            table = self._rope_table = (cos[0], sin)
        return table

    def empty_cache(self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        # Uninitialised: a column is always written before any attention reads it (reads stop at start + T).
        return [(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
                for _ in range(self.num_layers)]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]],
                start: int, mask: torch.Tensor | None, *, select: torch.Tensor | None = None, logits: bool = True,
                record: list | None = None) -> torch.Tensor | None:
        """``x`` (1, T, d_h) embeddings at ``positions`` (1, T); their keys / values are written to buffer columns
        [start, start + T) and they attend to columns [0, start + T) under ``mask`` (bool (1, 1, T, start + T);
        None = plain causal, only with start == 0). Returns the logits (n, V) of the positions ``select`` (default:
        all T), or None with ``logits=False`` (only the keys / values are wanted). ``record``: a list with a slot
        per layer that receives the post-RoPE queries of those positions (n, heads, head_dim).

        The last layer only needs keys / values for every position: its queries, attention, output projection and
        MLP run for the selected positions alone (none at all with ``logits=False``)."""
        batch, length, _ = x.shape
        end = start + length
        cos, sin = self._rope(x, positions)
        cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (B, 1, T, head_dim); sin sign-folded
        base = None
        if mask is not None:
            # additive float mask, built once: SDPA converts a bool mask in every call, which costs as much as the
            # attention itself for the packed pass (same result: bit-identical)
            base = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        mask = base if base is None or self.n_rep == 1 else base.repeat(1, 1, self.n_rep, 1)  # a copy per query head
        half = self.head_dim // 2
        for index, layer in enumerate(self.layers):
            attention, mlp = layer.self_attn, layer.mlp
            h = _rms_norm(layer.input_layernorm, x)
            k = _linear(attention.k_proj, h).view(batch, length, -1, self.head_dim).transpose(1, 2)
            v = _linear(attention.v_proj, h).view(batch, length, -1, self.head_dim).transpose(1, 2)
            # RoPE: x cos + rotate_half(x) sin, with rotate_half(x) sin = roll(x) (sin, first half negated)
            k = k * cos + k.roll(half, -1) * sin
            keys, values = cache[index]
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            keys, values = keys[:, :, :end], values[:, :, :end]
            queries, q_cos, q_sin, q_mask = length, cos, sin, mask
            if index == self.num_layers - 1 and (select is not None or not logits):
                if not logits:
                    return None
                x, h = x.index_select(1, select), h.index_select(1, select)  # only these rows are still needed
                queries, q_cos, q_sin = select.numel(), cos.index_select(2, select), sin.index_select(2, select)
                if base is None:  # causal rows of the selected positions
                    visible = torch.arange(end, device=x.device)[None] <= (start + select)[:, None]
                    base = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill_(
                        ~visible, float("-inf"))[None, None]
                else:
                    base = base.index_select(2, select)
                q_mask = base if self.n_rep == 1 else base.repeat(1, 1, self.n_rep, 1)
                select = None  # x holds exactly the selected rows now
            q = _linear(attention.q_proj, h).view(batch, queries, -1, self.head_dim).transpose(1, 2)
            q = q * q_cos + q.roll(half, -1) * q_sin
            if record is not None:
                record[index] = (q[0] if select is None else q[0].index_select(1, select)).transpose(0, 1)
            if q_mask is None:  # causal prefill from an empty buffer
                if self.n_rep > 1:
                    keys = keys.repeat_interleave(self.n_rep, dim=1)
                    values = values.repeat_interleave(self.n_rep, dim=1)
                out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.scaling)
            else:  # head h = g * n_rep + r  ->  kv head g, query row r * T + t
                packed = q.reshape(batch, self.kv_heads, self.n_rep * queries, self.head_dim)
                out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=q_mask, scale=self.scaling)
                out = out.reshape(batch, self.heads, queries, self.head_dim)
            out = out.transpose(1, 2).reshape(batch, queries, -1)
            x = x + _linear(attention.o_proj, out)
            h = _rms_norm(layer.post_attention_layernorm, x)
            x = x + _linear(mlp.down_proj, mlp.act_fn(_linear(mlp.gate_proj, h)) * _linear(mlp.up_proj, h))
        last = x[0] if select is None else x[0].index_select(0, select)
        return _linear(self.lm.lm_head, _rms_norm(self.lm.model.norm, last))  # (n, V)


def _linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias)


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """Qwen2RMSNorm.forward (statistics in fp32)."""
    if x.dtype == torch.float32:
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def baseline_generate(model: OmniCTForConditionalGeneration, tokenizer, study: PreparedStudy, question: Question,
                      max_new_tokens: int) -> list[int]:
    """Reference: one full ``model.generate()`` for one question (vision + whole prompt + greedy decode).
    Returns the answer ids without the closing eos — directly comparable with ``Answer.token_ids``."""
    cfg = model.config
    ids = encode_example(tokenizer, cfg, study.kind, question.text, num_units=study.num_units).input_ids
    device = next(model.parameters()).device
    label_ids = study.organ_label_ids(question.organ) or None
    mask = study.organ_mask(label_ids) if label_ids else None
    new = model.generate(torch.tensor([ids], device=device), study.pixel_units[None].to(device),
                         organ_masks=None if mask is None else [mask.to(device)],
                         max_new_tokens=question.max_new_tokens or max_new_tokens)
    tokens = new[0].tolist()
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def answers_as_dicts(answers: Sequence[Answer]) -> list[dict[str, Any]]:
    from dataclasses import asdict

    return [asdict(a) for a in answers]
