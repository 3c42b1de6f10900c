"""OmniCT engine: shared-prefix batched answers must equal one full ``generate()`` per question."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnict_core.inference.engine import OmniCTEngine, Question, baseline_generate
from omnict_core.modeling_omnict import build_model, save_omnict
from omnict_core.preprocessing import prepare_slice, prepare_volume
from omnict_core.tokenization_omnict import train_tokenizer



QA = [
    ("Is there a lesion in the liver?", "Yes."),
    ("Describe the kidneys.", "Both kidneys are normal in size and attenuation without stones."),
    ("What is the spleen attenuation?", "About 48 HU."),
]
LABEL_NAMES = {1: "liver", 2: "kidney_left", 3: "kidney_right", 4: "spleen"}


@pytest.fixture(scope="module")
def trained():
    """A tiny random model whose answers stop at different lengths: the input embedding of every 6th token is set
    to a large multiple of the <|im_end|> output row, so once the model emits one of those tokens the residual
    stream points at <|im_end|> and the next token is the end of the answer. (Cheaper and more deterministic than
    training; the engine must handle rows of one batch finishing at different steps.)"""
    tokenizer = train_tokenizer([q + " " + a for q, a in QA] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = build_model("tiny", tokenizer).eval()
    embedding = model.get_input_embeddings().weight
    eos_row = model.language_model.lm_head.weight[model.config.eos_token_id]
    with torch.no_grad():
        for token in range(20, embedding.shape[0], 6):
            embedding[token] = 50 * eos_row
    return model, tokenizer


@pytest.fixture(scope="module")
def study(trained):
    rng = np.random.default_rng(3)
    hu = rng.normal(40, 200, (30, 64, 64)).astype(np.float32)
    labels = np.zeros(hu.shape, np.int32)
    labels[2:12, 10:30, 10:40] = 1
    labels[15:25, 40:55, 5:20] = 2
    labels[15:25, 40:55, 45:60] = 3
    labels[5:10, 5:15, 45:60] = 4
    return prepare_volume(hu, trained[0].config, labels=labels, label_names=LABEL_NAMES)


QUESTIONS = [
    Question("Is there a lesion in the liver?", "liver"),
    Question("Describe the kidneys.", "kidneys", max_new_tokens=5),
    Question("What is the spleen attenuation?", "spleen"),
    Question("Is there a lesion in the liver?"),  # whole body
    Question("Describe the kidneys.", "liver"),
    Question("Anything unusual near the pancreas?", "pancreas"),  # organ absent from the label map -> whole body
    Question("What is the spleen attenuation?", None, max_new_tokens=3),
]


def test_engine_answers_equal_separate_generate(trained, study):
    model, tokenizer = trained
    engine = OmniCTEngine(model, tokenizer, max_new_tokens=16)
    answers = engine.ask(study, QUESTIONS, with_relevance=False)
    reference = [baseline_generate(model, tokenizer, study, q, 16) for q in QUESTIONS]
    assert [a.token_ids for a in answers] == reference
    # rows left the batch at different steps: stopped by <|im_end|>, by a per-question limit, by the default limit
    assert len({len(a.token_ids) for a in answers}) >= 3, [len(a.token_ids) for a in answers]
    assert any(a.finished for a in answers) and any(not a.finished for a in answers)
    assert len(answers[1].token_ids) <= 5
    assert answers[0].text == tokenizer.decode(answers[0].token_ids, skip_special_tokens=True).strip()


def test_relevance_per_unit_and_key_slices(trained, study):
    model, tokenizer = trained
    engine = OmniCTEngine(model, tokenizer, max_new_tokens=16, top_k_units=2)
    answers = engine.ask(study, QUESTIONS[:3])
    plain = engine.ask(study, QUESTIONS[:3], with_relevance=False)
    assert [a.token_ids for a in answers] == [a.token_ids for a in plain]  # the eager pass changes no answer
    for answer in answers:
        assert len(answer.unit_relevance) == study.num_units == 4
        assert sum(answer.unit_relevance) == pytest.approx(1.0, abs=1e-4)
        assert len(answer.key_units) == 2
        assert answer.unit_relevance[answer.key_units[0]] == max(answer.unit_relevance)
        assert answer.key_slices == study.key_slices(answer.key_units)
        assert all(0 <= s < 30 for s in answer.key_slices)
    # relevance from the batched pass equals the one from a pass with this answer alone
    alone = engine.ask(study, [QUESTIONS[1]])[0]
    assert alone.unit_relevance == pytest.approx(answers[1].unit_relevance, abs=1e-4)


def test_report_and_engine_from_checkpoint_dir(trained, study, tmp_path):
    model, tokenizer = trained
    save_omnict(model, tokenizer, tmp_path / "ckpt")
    engine = OmniCTEngine(tmp_path / "ckpt", max_new_tokens=8)
    report = engine.report(study, max_new_tokens=20)
    reference = baseline_generate(model, tokenizer, study, Question(report.question, None, 20), 20)
    assert report.token_ids == reference and len(report.token_ids) <= 20
    with pytest.raises(FileNotFoundError):
        OmniCTEngine(tmp_path / "nothing")


def test_engine_slices_and_ose_off(trained):
    _, tokenizer = trained
    torch.manual_seed(1)
    model = build_model("tiny", tokenizer, use_ose=False).eval()
    slice_study = prepare_slice(np.random.default_rng(0).normal(0, 300, (50, 50)), model.config)
    questions = [Question("Describe the kidneys."), Question("Is there a lesion in the liver?", "liver")]
    engine = OmniCTEngine(model, tokenizer, max_new_tokens=6)
    answers = engine.ask(slice_study, questions)
    assert [a.token_ids for a in answers] == [baseline_generate(model, tokenizer, slice_study, q, 6) for q in questions]
    assert answers[0].unit_relevance == [1.0] and answers[0].key_slices == [0]


def test_ask_command_on_a_dicom_folder(trained, tmp_path):
    import json

    from click.testing import CliRunner

    from omnict_core.phantom import PhantomSpec, generate_study, write_dicom_study
    from omnict_node.cli import main

    model, tokenizer = trained
    save_omnict(model, tokenizer, tmp_path / "ckpt")
    write_dicom_study(generate_study(PhantomSpec(seed=2, slices=12, size=48)), tmp_path / "study")
    runner = CliRunner()
    args = ["ask", str(tmp_path / "study"), "-m", str(tmp_path / "ckpt"), "--max-new-tokens", "4"]
    result = runner.invoke(main, [*args, "-q", "liver::Is there a lesion in the liver?", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{"):])
    answer = payload["answers"][0]
    assert payload["kind"] == "3d" and answer["organ"] == "liver" and len(answer["unit_relevance"]) == 4
    assert len(answer["key_sop_instance_uids"]) == len(answer["key_slices"]) > 0  # key images as DICOM references
    ranked = runner.invoke(main, [*args, "-q", "liver::Is there a lesion in the liver?|| Yes | No", "--json"])
    assert ranked.exit_code == 0, ranked.output
    answer = json.loads(ranked.output[ranked.output.index("{"):])["answers"][0]
    assert answer["organ"] == "liver" and answer["question"] == "Is there a lesion in the liver?"
    assert answer["text"] in ("Yes", "No") and len(answer["choice_log_likelihoods"]) == 2
    lone = runner.invoke(main, [*args, "-q", "Is there a lesion?||Yes"])
    assert lone.exit_code != 0 and "two or more" in lone.output
    missing = runner.invoke(main, ["ask", str(tmp_path / "study"), "-m", str(tmp_path / "none"), "-q", "Q?"])
    assert missing.exit_code != 0 and "checkpoint not found" in missing.output
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.dcm").write_bytes(b"not dicom")
    bad = runner.invoke(main, ["ask", str(tmp_path / "junk"), "-m", str(tmp_path / "ckpt"), "-q", "Q?"])
    assert bad.exit_code != 0 and "cannot read" in bad.output


def test_engine_slice_with_organ_label_map(trained):
    model, tokenizer = trained
    labels = np.zeros((50, 50), np.int32)
    labels[10:20, 30:45] = 1
    slice_study = prepare_slice(np.random.default_rng(1).normal(0, 300, (50, 50)), model.config, labels=labels,
                                label_names=LABEL_NAMES)
    questions = [Question("Is there a lesion in the liver?", "liver"), Question("Describe the kidneys.")]
    answers = OmniCTEngine(model, tokenizer, max_new_tokens=8).ask(slice_study, questions)
    assert [a.token_ids for a in answers] == [baseline_generate(model, tokenizer, slice_study, q, 8) for q in questions]


def _eager_relevance(model, tokenizer, study, question, generated):
    """The definition, computed the slow way: one full forward (vision + whole prompt + answer) with EAGER attention,
    attention of the positions that produced the answer tokens to the global visual tokens, mean over layers, heads
    and positions, summed per unit and normalised."""
    from omnict_core.tokenization_omnict import encode_example

    cfg = model.config
    prompt = encode_example(tokenizer, cfg, study.kind, question.text, num_units=study.num_units).input_ids
    label_ids = study.organ_label_ids(question.organ) or None
    mask = study.organ_mask(label_ids) if label_ids else None
    lm = model.language_model
    previous = lm.config._attn_implementation
    lm.set_attn_implementation("eager")
    try:
        with torch.no_grad():  # answer tokens are plain text embeddings even when they are placeholder ids
            embeds = torch.cat([
                model.prepare_inputs_embeds(torch.tensor([prompt]), study.pixel_units[None],
                                            organ_masks=None if mask is None else [mask]),
                model.get_input_embeddings()(torch.tensor([generated[:-1]], dtype=torch.long))], dim=1)
            out = model(inputs_embeds=embeds, output_attentions=True)
    finally:
        lm.set_attn_implementation(previous)
    visual = (torch.tensor(prompt) == cfg.image_token_id(study.kind)).nonzero()[:, 0]
    n = len(generated)
    stacked = torch.stack([a[0, :, -n:, :] for a in out.attentions])  # (layers, heads, n, T)
    units = stacked[..., visual].mean(dim=(0, 1, 2)).view(-1, cfg.tokens_per_unit(study.kind)).sum(dim=1)
    return (units / units.sum()).tolist()


@pytest.fixture(scope="module")
def sharp(trained):
    """The test model with 3x larger query / key projections: peaked attention, so the relevance is far from
    uniform and any error in which keys a position sees shows up in it."""
    import copy

    model, tokenizer = trained
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in model.language_model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(3.0)
                proj.bias.mul_(3.0)
    return model, tokenizer


def test_relevance_equals_an_eager_forward_over_prompt_and_answer(sharp, study):
    """The engine derives relevance from the queries / keys of its own decoding (no second pass); it must equal the
    attention of a separate eager forward over the whole prompt + answer, for answers of different lengths and
    organ groups decoded together."""
    model, tokenizer = sharp
    engine = OmniCTEngine(model, tokenizer, max_new_tokens=16)
    answers = engine.ask(study, QUESTIONS)
    assert len({len(a.token_ids) for a in answers}) >= 3
    assert [a.token_ids for a in answers] == [baseline_generate(model, tokenizer, study, q, 16) for q in QUESTIONS]
    assert all(max(a.unit_relevance) - min(a.unit_relevance) > 0.03 for a in answers)  # far from uniform
    for question, answer in zip(QUESTIONS, answers):
        generated = answer.token_ids + ([engine.eos_id] if answer.finished else [])
        expected = _eager_relevance(model, tokenizer, study, question, generated)
        assert answer.unit_relevance == pytest.approx(expected, abs=1e-5), question
        assert expected[answer.key_units[0]] == pytest.approx(max(expected), abs=1e-5)  # the most relevant unit
    # the relevance is not uniform and differs between answers (it is computed per answer)
    assert len({tuple(a.unit_relevance) for a in answers}) > 1
    # computed in chunks of generating positions (bounded memory for long reports): the same numbers
    import functools

    engine._attach_relevance = functools.partial(engine._attach_relevance, chunk=7)
    chunked = engine.ask(study, QUESTIONS)
    for a, c in zip(answers, chunked):
        assert c.unit_relevance == pytest.approx(a.unit_relevance, abs=1e-6)


def test_engine_is_reusable_and_deterministic(trained, study):
    """Repeated asks (and a different question order) give the same answers: no state leaks between calls."""
    model, tokenizer = trained
    engine = OmniCTEngine(model, tokenizer, max_new_tokens=12)
    first = engine.ask(study, QUESTIONS)
    again = engine.ask(study, QUESTIONS[::-1])[::-1]
    assert [a.token_ids for a in first] == [a.token_ids for a in again]
    for x, y in zip(first, again):
        assert x.unit_relevance == pytest.approx(y.unit_relevance, abs=1e-5)


def test_organ_mask_lookup_equals_study_organ_mask(study):
    def reference(ids):  # torch.isin, the definition
        return torch.isin(study.label_units, torch.tensor(ids, dtype=torch.int32)).any(dim=1)

    for organ in ("liver", "kidneys", "spleen", ("liver", "spleen")):
        ids = study.organ_label_ids(organ)
        assert torch.equal(study.organ_mask(ids), reference(ids)), organ
    assert not study.organ_mask([99]).any()


def test_drafts_save_passes_and_change_no_token_or_relevance(sharp, study, tmp_path):
    """Drafted decoding keeps only draft tokens equal to the model's own greedy choice: with a table that predicts
    the answers well (built from them) it needs fewer passes, with one that predicts nothing it rejects every draft;
    either way the tokens equal one generate() per question and the relevance equals undrafted decoding's (which
    test_relevance_equals_an_eager_forward_over_prompt_and_answer ties to an eager forward)."""
    from omnict_core.inference.drafting import AnswerDrafter

    model, tokenizer = sharp
    plain_engine = OmniCTEngine(model, tokenizer, max_new_tokens=16)
    plain = plain_engine.ask(study, QUESTIONS)
    assert plain_engine.last_decode.draft_tokens == 0
    reference = [baseline_generate(model, tokenizer, study, q, 16) for q in QUESTIONS]
    assert [a.token_ids for a in plain] == reference
    eos = plain_engine.eos_id
    produced = {t for a in reference for t in a}
    never = next(t for t in range(len(tokenizer)) if t not in produced and t != eos)
    drafters = {
        "from the answers": AnswerDrafter.from_answers([a.token_ids for a in plain], eos, min_share=0.0),
        # proposes, after any token, a token the model never produces here: every draft is rejected
        "always wrong": AnswerDrafter({(t,): (never, 1.0) for t in range(len(tokenizer))}, context=1, eos_id=eos),
    }
    for name, drafter in drafters.items():
        engine = OmniCTEngine(model, tokenizer, max_new_tokens=16, drafter=drafter, draft_tokens=6)
        answers = engine.ask(study, QUESTIONS)
        assert [a.token_ids for a in answers] == reference, name
        assert [a.finished for a in answers] == [a.finished for a in plain], name
        for drafted, undrafted in zip(answers, plain):
            assert drafted.unit_relevance == pytest.approx(undrafted.unit_relevance, abs=1e-5), name
            assert drafted.key_units == undrafted.key_units, name
        stats = engine.last_decode
        assert stats.draft_tokens > 0, name
        if name == "from the answers":
            assert stats.draft_tokens_kept > 0 and stats.passes < plain_engine.last_decode.passes
        else:
            assert stats.passes == plain_engine.last_decode.passes
    # a checkpoint directory carries its table; the engine built from the directory uses it
    save_omnict(model, tokenizer, tmp_path / "ckpt")
    drafters["from the answers"].save(tmp_path / "ckpt", tokenizer)
    from_dir = OmniCTEngine(tmp_path / "ckpt", max_new_tokens=16)
    assert from_dir.drafter is not None
    assert [a.token_ids for a in from_dir.ask(study, QUESTIONS, with_relevance=False)] == reference


def _choice_log_likelihood(model, tokenizer, study, question, choice):
    """The definition: one plain forward over the whole prompt + choice + <|im_end|>, the log-probabilities of the
    choice tokens and the end token summed."""
    from omnict_core.tokenization_omnict import encode_example

    example = encode_example(tokenizer, model.config, study.kind, question.text, choice, num_units=study.num_units)
    prompt = [t for t, label in zip(example.input_ids, example.labels) if label == -100]
    answer = example.input_ids[len(prompt):]
    label_ids = study.organ_label_ids(question.organ) or None
    mask = study.organ_mask(label_ids) if label_ids else None
    with torch.no_grad():
        embeds = torch.cat([
            model.prepare_inputs_embeds(torch.tensor([prompt]), study.pixel_units[None],
                                        organ_masks=None if mask is None else [mask]),
            model.get_input_embeddings()(torch.tensor([answer[:-1]], dtype=torch.long))], dim=1)
        log_probs = torch.log_softmax(model(inputs_embeds=embeds).logits[0, -len(answer):].float(), dim=-1)
    return float(log_probs[torch.arange(len(answer)), torch.tensor(answer)].sum())


CLOSED = [
    Question("Is there a lesion in the liver?", "liver", choices=("Yes", "No")),
    Question("Describe the kidneys.", "kidneys", max_new_tokens=5),  # generated, between two ranked questions
    Question("Which organ?", None, choices=("A. liver", "B. spleen", "C. left kidney", "D. the right kidney")),
    Question("What is the spleen attenuation?", "spleen", choices=("About 48 HU.", "About 20 HU.")),
]


def test_ranked_choices_equal_a_forward_per_choice_and_leave_generated_answers_alone(sharp, study):
    """A question with ``choices`` is answered with its likeliest choice: the engine's log-likelihood of each choice
    (scored as branches of one packed pass) equals a plain forward over prompt + choice; a generated question asked
    in the same call still equals ``generate()``; the relevance of a ranked answer is that of its chosen tokens."""
    model, tokenizer = sharp
    engine = OmniCTEngine(model, tokenizer, max_new_tokens=16)
    answers = engine.ask(study, CLOSED)
    for question, answer in zip(CLOSED, answers):
        if question.choices is None:
            assert answer.token_ids == baseline_generate(model, tokenizer, study, question, 5)
            assert answer.choice_log_likelihoods == []
            continue
        expected = [_choice_log_likelihood(model, tokenizer, study, question, c) for c in question.choices]
        assert answer.choice_log_likelihoods == pytest.approx(expected, abs=1e-4), question.text
        best = int(np.argmax(expected))
        assert answer.text == question.choices[best] and answer.finished
        assert answer.token_ids == tokenizer.encode(question.choices[best], add_special_tokens=False)
        generated = answer.token_ids + [engine.eos_id]
        assert answer.unit_relevance == pytest.approx(
            _eager_relevance(model, tokenizer, study, question, generated), abs=1e-5)
    # the choices really compete: the scores differ, and asked alone a question gets the same scores
    assert len(set(answers[2].choice_log_likelihoods)) == 4
    alone = engine.ask(study, [CLOSED[2]], with_relevance=False)[0]
    assert alone.choice_log_likelihoods == pytest.approx(answers[2].choice_log_likelihoods, abs=1e-4)


def test_choices_are_validated():
    with pytest.raises(ValueError, match="two or more"):
        Question("Is there a nodule?", choices=("Yes",))
    with pytest.raises(ValueError, match="two or more"):
        Question("Is there a nodule?", choices=("Yes", " "))
