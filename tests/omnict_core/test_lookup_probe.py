"""LLM lookup probe: benchmark multiple-choice questions, text only, with the right option stated; the letter
accuracy of a checkpoint's LLM before and while it is fine-tuned (in memory) on the training split."""

from __future__ import annotations

import math

import pytest


def test_prompt_states_the_right_option_and_the_target_is_its_letter(vqa_dir):
    from omnict_core.data.vqa import LETTERS
    from omnict_core.evaluation.lookup_probe import choice_samples, stated_choice_prompt

    samples = choice_samples(vqa_dir, "bench")
    assert samples
    for sample in samples:
        prompt, letter = stated_choice_prompt(sample)
        stem, _, listed = prompt.partition(f"Finding: {sample['answer_content']}.\n")
        assert listed and "<image>" not in prompt and "<|image" not in prompt  # text only
        assert sample["options"][LETTERS.index(letter)] == sample["answer_content"]
        assert f"{letter}. {sample['answer_content']}\n" in listed
        assert prompt.endswith("<|im_start|>assistant\n")
    broken = {**samples[0], "conversations": [{"from": "human", "value": "<image>\nNo options here."},
                                              samples[0]["conversations"][1]]}
    with pytest.raises(ValueError, match="lettered options"):
        stated_choice_prompt(broken)


def test_encoded_batch_ends_each_row_at_the_assistant_header(vqa_dir, random_model_dir):
    from omnict_core.evaluation.lookup_probe import choice_samples, encode_batch
    from omnict_core.tokenization_omnict import load_tokenizer

    tokenizer = load_tokenizer(str(random_model_dir))
    samples = choice_samples(vqa_dir, "train")[:5]
    input_ids, attention_mask, last, letters = encode_batch(tokenizer, samples)
    for row, sample in enumerate(samples):
        prompt = tokenizer.decode(input_ids[row, : int(last[row]) + 1])
        assert prompt.endswith("assistant\n") and int(attention_mask[row].sum()) == int(last[row]) + 1
        assert tokenizer.decode([int(letters[row])]) == sample["answer"][0]


def test_probe_fine_tunes_in_memory_and_reports_a_curve(vqa_dir, random_model_dir):
    from omnict_core.evaluation.lookup_probe import LookupProbeConfig, run_lookup_probe
    from omnict_core.tokenization_omnict import load_tokenizer

    weights_before = (random_model_dir / "model.safetensors").read_bytes()
    result = run_lookup_probe(LookupProbeConfig(model_dir=str(random_model_dir), data_dir=str(vqa_dir), steps=30,
                                                batch_size=16, lr=3e-3, eval_every=10, num_threads=1),
                              progress=False)
    assert [row["step"] for row in result["curve"]] == [0, 10, 20, 30]
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in result["curve"])
    assert 0.2 < result["chance"] <= 0.5 and result["zero_shot"] == result["curve"][0]["accuracy"]
    # the LLM learns at least where the letters are: far below the loss of a uniform guess over the vocabulary
    assert result["curve"][-1]["loss"] < 0.5 * math.log(len(load_tokenizer(str(random_model_dir))))
    assert (random_model_dir / "model.safetensors").read_bytes() == weights_before  # the checkpoint is not written
