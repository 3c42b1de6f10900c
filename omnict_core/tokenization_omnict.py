"""OmniCT tokenizer and prompt format.

* ``train_tokenizer(texts, vocab_size)`` trains a byte-level BPE (``tokenizers``) offline on our own corpus and wraps
  it as a ``PreTrainedTokenizerFast`` carrying the OmniCT special tokens and a Qwen-style chat template. Byte-level
  means any text (units, numbers, unseen words) round-trips; there is no <unk>.
* The prompt format (OmniCT README placeholders inside a Qwen chat turn)::

      <|im_start|>system\\n{SYSTEM_PROMPT}<|im_end|>\\n
      <|im_start|>user\\n<|image3d_start|><|image3d|><|image3d_end|>\\n<|organ_start|><|mask3d|><|organ_end|>\\n
      {question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>

  (2D: image2d / mask2d.) The single ``<|image3d|>`` / ``<|mask3d|>`` placeholder is expanded on the token ids by
  ``expand_placeholders`` into L global-token and L_c organ-token placeholders (0 organ tokens when OSE is off for
  the sample); the model then overwrites their embeddings with the visual features.
* ``encode_example`` builds one training / inference sample (input_ids + labels with -100 everywhere except the
  answer and its closing ``<|im_end|>``), ``collate_examples`` pads a list of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from omnict_core.configuration_omnict import (  # first: it guards the transformers import (see there)
    IM_END, IM_START, IMAGE2D, IMAGE2D_END, IMAGE2D_START, IMAGE3D, IMAGE3D_END, IMAGE3D_START, MASK2D, MASK3D,
    ORGAN_END, ORGAN_START, PAD_TOKEN, PLACEHOLDER_TOKENS, OmniCTConfig,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

IGNORE_INDEX = -100
SYSTEM_PROMPT = "You are OmniCT, a radiology assistant that reads CT images."

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (offline, < 1 s for a few MB) with the OmniCT special tokens."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    special = [PAD_TOKEN, IM_START, IM_END, *PLACEHOLDER_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    core.train_from_iterator(list(texts) + [SYSTEM_PROMPT], trainer=trainer)
    return wrap_tokenizer(core)


def wrap_tokenizer(core: Tokenizer) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=IM_END, pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, *PLACEHOLDER_TOKENS], padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    from pathlib import Path

    if not Path(path).is_dir():
        raise FileNotFoundError(f"OmniCT tokenizer directory not found: {path}")
    return PreTrainedTokenizerFast.from_pretrained(path)


# ----------------------------------------------------------------------------------------------- prompt format
def visual_block(kind: str) -> str:
    """The image + organ placeholder lines of the user turn (before the question)."""
    if kind == "3d":
        return f"{IMAGE3D_START}{IMAGE3D}{IMAGE3D_END}\n{ORGAN_START}{MASK3D}{ORGAN_END}\n"
    if kind == "2d":
        return f"{IMAGE2D_START}{IMAGE2D}{IMAGE2D_END}\n{ORGAN_START}{MASK2D}{ORGAN_END}\n"
    raise ValueError(f"unit kind must be '2d' or '3d', got {kind!r}")


def prompt_prefix(kind: str, system_prompt: str = SYSTEM_PROMPT) -> str:
    """Shared part of every question about one study: system turn + user header + image + organ placeholders."""
    return f"{IM_START}system\n{system_prompt}{IM_END}\n{IM_START}user\n{visual_block(kind)}"


def prompt_suffix(question: str) -> str:
    """Question-specific part, ending with the assistant header the answer follows."""
    return f"{question}{IM_END}\n{IM_START}assistant\n"


def build_prompt(question: str, kind: str, system_prompt: str = SYSTEM_PROMPT) -> str:
    return prompt_prefix(kind, system_prompt) + prompt_suffix(question)


def expand_placeholders(ids: Sequence[int], config: OmniCTConfig, kind: str, num_units: int,
                        use_ose: bool | None = None) -> list[int]:
    """Replace the single image / mask placeholder by L / L_c copies (L_c = 0 when OSE is off)."""
    use_ose = config.use_ose if use_ose is None else use_ose
    image_id, mask_id = config.image_token_id(kind), config.mask_token_id(kind)
    n_image = num_units * config.tokens_per_unit(kind)
    n_mask = config.num_organ_tokens(kind) if use_ose else 0
    out: list[int] = []
    for token in ids:
        if token == image_id:
            out.extend([image_id] * n_image)
        elif token == mask_id:
            out.extend([mask_id] * n_mask)
        else:
            out.append(token)
    return out


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]


def answer_token_ids(tokenizer: PreTrainedTokenizerFast, answer: str) -> list[int]:
    """The ids of an answer's text as training labels them (before the closing ``<|im_end|>``); ranked answering
    scores exactly these."""
    return tokenizer.encode(answer, add_special_tokens=False)


def encode_example(tokenizer: PreTrainedTokenizerFast, config: OmniCTConfig, kind: str, question: str,
                   answer: str | None = None, num_units: int | None = None, use_ose: bool | None = None,
                   system_prompt: str = SYSTEM_PROMPT) -> EncodedExample:
    """Token ids of one (question[, answer]) about one image, placeholders expanded.

    ``labels`` are -100 on the prompt and the visual placeholders, the answer ids + ``<|im_end|>`` otherwise.
    Without ``answer`` it is an inference prompt ending in ``<|im_start|>assistant\\n``.
    ``num_units`` defaults to the config's volume (3D) or one slice (2D).
    """
    if num_units is None:
        num_units = config.num_units() if kind == "3d" else 1
    prompt_ids = tokenizer.encode(build_prompt(question, kind, system_prompt), add_special_tokens=False)
    prompt_ids = expand_placeholders(prompt_ids, config, kind, num_units, use_ose)
    if answer is None:
        return EncodedExample(prompt_ids, [IGNORE_INDEX] * len(prompt_ids))
    answer_ids = answer_token_ids(tokenizer, answer) + [tokenizer.convert_tokens_to_ids(IM_END)]
    return EncodedExample(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids)


def collate_examples(examples: Sequence[EncodedExample], pad_token_id: int, padding_side: str = "right"
                     ) -> dict[str, torch.Tensor]:
    """Pad to a batch: input_ids / attention_mask / labels, int64 (B, T). Right padding for training."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, span] = torch.tensor(example.input_ids)
        labels[row, span] = torch.tensor(example.labels)
        attention_mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
