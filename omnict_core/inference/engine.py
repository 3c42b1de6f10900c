"""OmniCT inference engine: many questions about one study, answered with shared-prefix KV reuse.

For one study the engine

1. encodes the image ONCE (SigLIP -> TPE -> unshuffle -> MHP; ``EncodedStudy``);
2. groups the questions by organ. OSE tokens depend on the organ (its mask selects the tokens that are aggregated),
   and they sit in the prompt BEFORE the question, so every organ gets its own prefix
   (system turn + user header + L global tokens + L_c organ tokens). Questions naming no organ (or an organ absent
   from the label map) share the "whole body" prefix, whose OSE tokens aggregate the whole grid — exactly what the
   model computes for an empty mask during training;
3. runs each prefix once into a ``DynamicCache`` and repeats it for the batch of questions of that group
   (``batch_repeat_interleave``);
4. feeds the question suffixes as one batch. Suffixes differ in length: each is RIGHT-aligned, padding sits between
   the prefix and the question and is masked out in the attention mask, and explicit ``position_ids`` continue from
   the prefix without counting the padding — so every row sees exactly the positions and keys of its own unpadded
   prompt (answers are token-identical to a separate ``model.generate()`` per question; bench/vqa_battery.py and the
   tests check it);
5. decodes greedily in a batch, dropping rows from the batch (and the cache) as they emit ``<|im_end|>``;
6. optionally computes, per answer, the relevance of each reconstruction unit: one extra forward pass with EAGER
   attention over question + answer (on the cached prefix), attention from the positions that produced the answer
   tokens to the global visual tokens, averaged over layers and heads, summed per unit and normalised; the top units
   are mapped back to source slice indices (key images).

Greedy and deterministic: no sampling anywhere.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omnict_core.configuration_omnict import IM_END
from omnict_core.modeling_omnict import OmniCTForConditionalGeneration, load_omnict
from omnict_core.preprocessing import PreparedStudy
from omnict_core.tokenization_omnict import encode_example, expand_placeholders, prompt_prefix
from transformers import DynamicCache

REPORT_PROMPT = "Write a radiology report for this CT: findings and impression."


@dataclass
class Question:
    text: str
    organ: str | tuple[str, ...] | None = None  # label name(s) of the study's label map (e.g. 'liver'); None = whole body
    max_new_tokens: int | None = None


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


@dataclass
class EncodedStudy:
    """The vision side of one study, computed once: global token grid F^ (N_u, h, w, d_h)."""

    study: PreparedStudy
    grid: torch.Tensor
    organ_tokens: dict[tuple[int, ...] | None, torch.Tensor | None] = field(default_factory=dict)

    @property
    def global_tokens(self) -> torch.Tensor:
        return self.grid.reshape(-1, self.grid.shape[-1])  # (L, d_h)


class OmniCTEngine:
    """``OmniCTEngine(model_dir_or_model, tokenizer=None, device='cpu')``; then ``ask(study, questions)`` /
    ``report(study)``. ``study`` is a ``PreparedStudy`` (omnict_core.preprocessing.prepare_input)."""

    def __init__(self, model: OmniCTForConditionalGeneration | str | Path, tokenizer=None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 max_new_tokens: int = 48, top_k_units: int = 2) -> None:
        if isinstance(model, (str, Path)):
            model, loaded_tokenizer = load_omnict(model, device=device, dtype=dtype)
            tokenizer = tokenizer or loaded_tokenizer
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with an in-memory model")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.config = model.config
        self.max_new_tokens = max_new_tokens
        self.top_k_units = top_k_units
        self.eos_id = tokenizer.convert_tokens_to_ids(IM_END)
        self.pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else self.eos_id

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
            mask = encoded.study.organ_mask(list(label_ids)) if label_ids else None
            token_mask = None if mask is None else self.model.ose.token_mask(mask.to(self.device), encoded.study.kind)
            encoded.organ_tokens[label_ids] = self.model.ose(encoded.grid, token_mask, encoded.study.kind)
        return encoded.organ_tokens[label_ids]

    def _label_ids(self, study: PreparedStudy, organ: str | None) -> tuple[int, ...] | None:
        ids = study.organ_label_ids(organ)
        return tuple(sorted(ids)) if ids else None

    # ------------------------------------------------------------------------------------------------ prompts
    def prefix_ids(self, study: PreparedStudy) -> list[int]:
        ids = self.tokenizer.encode(prompt_prefix(study.kind), add_special_tokens=False)
        return expand_placeholders(ids, self.config, study.kind, study.num_units)

    def full_prompt_ids(self, study: PreparedStudy, question: str) -> list[int]:
        """Exactly what the baseline (and training) feeds: used to cut the question suffix after the prefix."""
        return encode_example(self.tokenizer, self.config, study.kind, question, num_units=study.num_units).input_ids

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
    @torch.no_grad()
    def _answer(self, encoded: EncodedStudy, questions: Sequence[Question], max_new_tokens: int | None,
                with_relevance: bool) -> list[Answer]:
        model, study = self.model, encoded.study
        lm = model.language_model
        prefix = self.prefix_ids(study)
        prefix_len = len(prefix)
        suffixes = []
        for q in questions:
            full = self.full_prompt_ids(study, q.text)
            if full[:prefix_len] != prefix:  # tokenisation merged across the boundary: cannot share the prefix
                raise ValueError(f"question {q.text!r} does not tokenise after the shared prefix")
            suffixes.append(full[prefix_len:])

        # One prefix per organ group (same length P: L + L_c visual tokens), prefilled together (see _prefill).
        keys = [self._label_ids(study, q.organ) if self.config.use_ose else None for q in questions]
        organs = list(OrderedDict.fromkeys(keys))
        group_of = torch.tensor([organs.index(k) for k in keys], device=self.device)
        visual = [(encoded.global_tokens, self._organ_tokens(encoded, key)) for key in organs]
        prefix_tensor = torch.tensor([prefix] * len(organs), device=self.device)
        embeds = model.splice_visual_tokens(prefix_tensor, [study.kind] * len(organs), visual)  # (G, P, d_h)
        prefix_cache = self._prefill(embeds, prefix)

        # Question suffixes as one batch on copies of their group's prefix cache.
        cache = copy.deepcopy(prefix_cache)
        cache.batch_select_indices(group_of)  # (B, heads, P, d) — a row per question
        suffix_ids, attention, positions = self._right_aligned(suffixes, prefix_len)
        out = lm(input_ids=suffix_ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                 use_cache=True, logits_to_keep=1)
        next_pos = torch.tensor([prefix_len + len(s) for s in suffixes], device=self.device)
        limits = [q.max_new_tokens or max_new_tokens or self.max_new_tokens for q in questions]
        generated = self._greedy_decode(out.logits[:, -1, :], cache, attention, next_pos, limits)

        answers = []
        for q, tokens in zip(questions, generated):
            finished = bool(tokens) and tokens[-1] == self.eos_id
            text_ids = tokens[:-1] if finished else tokens
            answers.append(Answer(question=q.text, organ=q.organ, token_ids=text_ids, finished=finished,
                                  text=self.tokenizer.decode(text_ids, skip_special_tokens=True).strip()))
        if with_relevance:
            self._attach_relevance(answers, generated, suffixes, prefix_cache, group_of, prefix, study)
        return answers

    def _prefill(self, embeds: torch.Tensor, prefix: list[int]) -> DynamicCache:
        """KV cache of the G organ prefixes (G, heads, P, d). Everything before the first organ token (system turn,
        user header, the L global visual tokens) is identical for all organs: it is run once with batch 1, then
        repeated, and only the organ tokens + trailing text run with batch G."""
        lm = self.model.language_model
        organ_ids = (self.config.mask2d_token_id, self.config.mask3d_token_id)
        organ_slots = [i for i, t in enumerate(prefix) if t in organ_ids]
        split = organ_slots[0] if organ_slots else len(prefix)
        cache = DynamicCache(config=lm.config)
        lm(inputs_embeds=embeds[:1, :split], past_key_values=cache, use_cache=True, logits_to_keep=1)  # batch 1
        if split < len(prefix):
            cache.batch_repeat_interleave(embeds.shape[0])
            lm(inputs_embeds=embeds[:, split:], past_key_values=cache, use_cache=True, logits_to_keep=1)  # batch G
        return cache

    def _right_aligned(self, rows: Sequence[Sequence[int]], prefix_len: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids (B, W), attention mask over prefix + W (B, P + W), position ids (B, W) for sequences that follow a
        cached prefix: each row right-aligned, padding BETWEEN prefix and row (masked), positions continuing at
        P without counting the padding — the row sees exactly what its unpadded prompt would."""
        batch, width = len(rows), max(len(r) for r in rows)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        positions = torch.full((batch, width), prefix_len, dtype=torch.long)  # padding queries: output unused
        for i, r in enumerate(rows):
            n = len(r)
            if n:
                ids[i, width - n:] = torch.tensor(r)
                mask[i, width - n:] = 1
                positions[i, width - n:] = torch.arange(prefix_len, prefix_len + n)
        attention = torch.cat([torch.ones((batch, prefix_len), dtype=torch.long), mask], dim=1)
        return ids.to(self.device), attention.to(self.device), positions.to(self.device)

    def _greedy_decode(self, logits: torch.Tensor, cache: DynamicCache, attention: torch.Tensor,
                       next_pos: torch.Tensor, limits: Sequence[int]) -> list[list[int]]:
        """Batched greedy decoding; rows leave the batch (and the cache) when they emit eos or hit their limit."""
        lm = self.model.language_model
        batch = logits.shape[0]
        generated: list[list[int]] = [[] for _ in range(batch)]
        active = list(range(batch))  # original row of each batch row
        while active:
            tokens = logits.argmax(dim=-1)  # (B_active,)
            keep = []
            for j, row in enumerate(active):
                generated[row].append(int(tokens[j]))
                if int(tokens[j]) != self.eos_id and len(generated[row]) < limits[row]:
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=logits.device)
                cache.batch_select_indices(index)
                tokens, attention, next_pos = tokens[index], attention[index], next_pos[index]
                active = [active[j] for j in keep]
            attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=1)
            out = lm(input_ids=tokens[:, None], attention_mask=attention, position_ids=next_pos[:, None],
                     past_key_values=cache, use_cache=True, logits_to_keep=1)
            next_pos = next_pos + 1
            logits = out.logits[:, -1, :]
        return generated

    # ------------------------------------------------------------------------------------------------ relevance
    def _attach_relevance(self, answers: list[Answer], generated: list[list[int]], suffixes: list[list[int]],
                          prefix_cache: DynamicCache, group_of: torch.Tensor, prefix: list[int],
                          study: PreparedStudy, chunk: int = 8) -> None:
        """Per answer: attention mass from its generating positions to each unit's global tokens (eager pass)."""
        lm = self.model.language_model
        image_id = self.config.image_token_id(study.kind)
        visual_positions = torch.tensor([i for i, t in enumerate(prefix) if t == image_id], device=self.device)
        per_unit = self.config.tokens_per_unit(study.kind)
        previous = lm.config._attn_implementation
        lm.set_attn_implementation("eager")
        try:
            for start in range(0, len(answers), chunk):
                rows = range(start, min(start + chunk, len(answers)))
                # Question + answer minus its last token: the positions whose outputs WERE the answer tokens.
                seqs = [suffixes[i] + generated[i][:-1] for i in rows]
                ids, attention, positions = self._right_aligned(seqs, len(prefix))
                cache = copy.deepcopy(prefix_cache)
                cache.batch_select_indices(group_of[start:start + len(seqs)])
                out = lm(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                         use_cache=True, output_attentions=True)
                width = ids.shape[1]
                for j, i in enumerate(rows):
                    n_answer = max(1, len(generated[i]))
                    # (layers, heads, n_answer, keys) -> mean attention to each global visual token (L,)
                    stacked = torch.stack([a[j, :, width - n_answer:, :] for a in out.attentions])
                    to_visual = stacked[..., visual_positions].float().mean(dim=(0, 1, 2))
                    units = to_visual.view(-1, per_unit).sum(dim=1)  # (N_u,)
                    relevance = units / units.sum().clamp_min(1e-12)
                    order = torch.argsort(relevance, descending=True, stable=True).tolist()
                    answers[i].unit_relevance = [round(float(r), 6) for r in relevance]
                    answers[i].key_units = order[: self.top_k_units]
                    answers[i].key_slices = study.key_slices(answers[i].key_units)
                    if study.slice_uids:
                        answers[i].key_sop_instance_uids = [study.slice_uids[k] for k in answers[i].key_slices]
        finally:
            lm.set_attn_implementation(previous)


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
