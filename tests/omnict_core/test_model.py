"""OmniCT model: paper-size token arithmetic on the meta device, tiny-model training behaviour, save/load, OSE."""

from __future__ import annotations

import pytest
import torch

from omnict_core.configuration_omnict import OmniCTConfig, omnict_preset
from omnict_core.modeling_omnict import (
    ConvStemPatchEmbedding, OmniCTForConditionalGeneration, TriAxialPositionalEmbedding, build_model, load_omnict, save_omnict,
    token_unshuffle,
)
from omnict_core.tokenization_omnict import (
    IGNORE_INDEX, build_prompt, collate_examples, encode_example, load_tokenizer, train_tokenizer,
)



CORPUS = [
    "Is there a lesion in the liver? Yes, a hypodense lesion in the right lobe.",
    "What is the attenuation of the spleen? About 48 HU.",
    "Are the kidneys normal? Both kidneys are normal in size.",
    "Describe the lungs. The lungs are clear without nodules.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    torch.manual_seed(0)
    return build_model("tiny", tokenizer).eval()


def volume_batch(model, tokenizer, *, use_ose=(True, True), masks=True):
    cfg = model.config
    examples = [
        encode_example(tokenizer, cfg, "3d", "Is there a lesion in the liver?", "Yes, a hypodense lesion.",
                       use_ose=use_ose[0]),
        encode_example(tokenizer, cfg, "3d", "Are the kidneys normal?", "Both kidneys are normal.",
                       use_ose=use_ose[1]),
    ]
    batch = collate_examples(examples, cfg.pad_token_id)
    g = torch.Generator().manual_seed(1)
    size, units = cfg.image_size, cfg.num_units()
    batch["pixel_units"] = torch.rand(2, units, 3, size, size, generator=g) * 2 - 1
    if masks:
        organ = torch.zeros(2, units, size, size, dtype=torch.bool)
        organ[0, 1:3, 10:40, 20:60] = True
        batch["organ_masks"] = organ
    return batch


# ------------------------------------------------------------------------------------ paper-size, meta device
def test_omnict_7b_token_counts_on_meta_device():
    config = omnict_preset("omnict-7b")
    with torch.device("meta"):
        model = OmniCTForConditionalGeneration(config)
        units = torch.empty(11, 3, 384, 384)  # 32 slices x 384 x 384 -> ceil(32/3) = 11 units
        patches = model.vision_tower(pixel_values=units).last_hidden_state
        grid_3d = model._project(patches.view(11, 27, 27, -1), "3d")
        grid_2d = model._project(patches[:1].view(1, 27, 27, -1), "2d")
    assert patches.shape == (11, 729, 1152)  # 27 x 27 patches of 14 px per unit, d_v = 1152
    assert grid_3d.shape == (11, 9, 9, 3584)  # m = 3 unshuffle -> 81 tokens per unit, d_h = Qwen2.5-7B
    assert grid_2d.shape == (1, 27, 27, 3584)  # slices keep m = 1 -> 729 tokens
    assert config.projector_input_size("3d") == (1152 + 192) * 9
    assert model.projector.volume_expert.in_features == 12096 and model.projector.slice_expert.in_features == 1344
    assert config.num_units(32) == 11
    assert config.tokens_per_unit("3d") * 11 == 891  # L
    assert config.num_organ_tokens("3d") == 90 and config.num_organ_tokens("2d") == 81  # L_c (Table 12)
    assert model.ose.slot_embedding_3d.shape == (90, 3584)
    assert config.num_visual_tokens("3d") == 891 + 90  # F^_OSE for a 32x384x384 volume
    assert config.num_visual_tokens("2d") == 729 + 81
    assert config.num_visual_tokens("3d", use_ose=False) == 891
    # the organ aggregation really produces L_c tokens at this width
    pooled = torch.nn.functional.adaptive_avg_pool3d(torch.empty(1, 3584, 4, 5, 6, device="meta"), (10, 3, 3))
    assert pooled.flatten(2).shape[-1] == 90
    n_params = sum(p.numel() for p in model.parameters())
    assert 7.5e9 < n_params < 8.5e9  # SigLIP-so400m (~0.43B) + Qwen2.5-7B (~7.6B) + MHP


def test_paper_presets_name_missing_local_paths(tmp_path):
    config = omnict_preset("omnict-3b", vision_model_path=str(tmp_path / "siglip"), text_model_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="siglip"):
        OmniCTForConditionalGeneration.from_pretrained_components(config)


def test_prompt_expands_to_visual_sequence_length(tokenizer):
    config = omnict_preset("omnict-7b")
    config.attach_tokenizer(tokenizer)
    ids = encode_example(tokenizer, config, "3d", "Where is the lesion?").input_ids
    assert ids.count(config.image3d_token_id) == 891 and ids.count(config.mask3d_token_id) == 90
    assert build_prompt("Q?", "3d").count("<|image3d|>") == 1


# -------------------------------------------------------------------------------------------------- pieces
def test_tpe_concatenates_and_unshuffle_keeps_neighbours():
    features = torch.zeros(2, 6, 6, 4)
    z = TriAxialPositionalEmbedding([4, 6, 8])(features)
    assert z.shape == (2, 6, 6, 4 + 18)
    assert not torch.equal(z[0, 0, 0, 4:8], z[1, 0, 0, 4:8])  # depth code differs between units
    assert torch.equal(z[0, 0, 0, 8:14], z[1, 0, 0, 8:14])  # height code shared across units
    grid = torch.arange(36.0).view(1, 6, 6, 1)
    folded = token_unshuffle(grid, 3)
    assert folded.shape == (1, 2, 2, 9)
    assert folded[0, 1, 0].tolist() == [18, 19, 20, 24, 25, 26, 30, 31, 32]  # rows 3-5, cols 0-2


def test_organ_mask_maps_to_token_grid(tiny):
    cfg = tiny.config  # 96 px, patch 8, m = 3 -> 24 px per volume token, 4 x 4 grid
    mask = torch.zeros(4, 96, 96, dtype=torch.bool)
    mask[2, 30, 50] = True  # a single pixel still selects its token
    token_mask = tiny.ose.token_mask(mask, "3d")
    assert token_mask.shape == (4, 4, 4)
    assert token_mask.nonzero().tolist() == [[2, 1, 2]]
    assert tiny.ose.token_mask(mask[:1], "2d").shape == (1, 12, 12)
    assert cfg.num_organ_tokens("3d") == 18


def test_ose_selects_organ_tokens_and_handles_empty_mask(tiny):
    grid = torch.randn(4, 4, 4, tiny.config.llm_hidden_size)
    token_mask = torch.zeros(4, 4, 4, dtype=torch.bool)
    token_mask[1, 2, 3] = True
    organ = tiny.ose(grid, token_mask, "3d")
    assert organ.shape == (18, tiny.config.llm_hidden_size)
    # one organ token: every aggregated slot is that token (magnification), plus the slot embedding (zero-init)
    assert torch.allclose(organ, grid[1, 2, 3].expand(18, -1), atol=1e-6)
    whole = tiny.ose(grid, None, "3d")
    assert torch.allclose(tiny.ose(grid, torch.zeros_like(token_mask), "3d"), whole)  # empty mask = whole body
    expected = torch.nn.functional.adaptive_avg_pool3d(grid.permute(3, 0, 1, 2), (2, 3, 3)).flatten(1).T
    assert torch.allclose(whole, expected, atol=1e-6)  # whole grid pooled onto the 2x3x3 aggregation grid


# ------------------------------------------------------------------------------------------- tiny training
def test_tiny_forward_backward_3d_and_2d(tiny, tokenizer):
    model = build_model("tiny", tokenizer)
    batch = volume_batch(model, tokenizer)
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.projector.volume_expert.weight.grad.abs().sum() > 0
    assert model.projector.slice_expert.weight.grad is None or model.projector.slice_expert.weight.grad.abs().sum() == 0
    assert model.ose.slot_embedding_3d.grad.abs().sum() > 0
    model.zero_grad()
    cfg = model.config
    ex = encode_example(tokenizer, cfg, "2d", "Describe the lungs.", "The lungs are clear.")
    b2 = collate_examples([ex], cfg.pad_token_id)
    assert b2["input_ids"][0].tolist().count(cfg.image2d_token_id) == 144  # 12 x 12 tokens, m = 1
    out2 = model(**b2, pixel_units=torch.rand(1, 1, 3, 96, 96), unit_kind="2d")
    out2.loss.backward()
    assert model.projector.slice_expert.weight.grad.abs().sum() > 0
    # mixed batch: a volume and a slice in one step (list of per-sample units)
    mixed = collate_examples([encode_example(tokenizer, cfg, "3d", "Q?", "A."), ex], cfg.pad_token_id)
    out3 = model(**mixed, pixel_units=[torch.rand(4, 3, 96, 96), torch.rand(1, 3, 96, 96)], unit_kind=["3d", "2d"])
    assert torch.isfinite(out3.loss)
    with pytest.raises(ValueError, match="unit_kind"):
        model(**b2, pixel_units=torch.rand(1, 1, 3, 96, 96), unit_kind="3d")


def test_loss_decreases_on_fixed_batch(tokenizer):
    torch.manual_seed(0)
    model = build_model("tiny", tokenizer)
    model.set_trainable("instruct")  # paper stage 2: MHP + OSE + LLM (vision tower frozen)
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    batch = volume_batch(model, tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_labels_cover_only_the_answer(tiny, tokenizer):
    ex = encode_example(tokenizer, tiny.config, "3d", "Are the kidneys normal?", "Both kidneys are normal.")
    answer = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "Both kidneys are normal.<|im_end|>"


def test_save_load_identical_logits(tiny, tokenizer, tmp_path):
    batch = volume_batch(tiny, tokenizer)
    save_omnict(tiny, tokenizer, tmp_path / "ckpt")
    loaded, loaded_tokenizer = load_omnict(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(tiny(**batch).logits, loaded(**batch).logits)
    assert loaded_tokenizer.encode(build_prompt("Q?", "3d")) == tokenizer.encode(build_prompt("Q?", "3d"))
    assert load_tokenizer(str(tmp_path / "ckpt")).eos_token == "<|im_end|>"
    assert OmniCTConfig.from_pretrained(tmp_path / "ckpt").ose_grid_3d == [2, 3, 3]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_omnict(tmp_path / "missing")


def test_conv_stem_replaces_the_patch_embedding_and_survives_save_load(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", tokenizer, vision_stem_widths=[8, 16, 16]).eval()
    stem = model.vision_tower.get_input_embeddings()
    assert isinstance(stem, ConvStemPatchEmbedding)
    units = torch.rand(2, 3, model.config.image_size, model.config.image_size) * 2 - 1
    grid = model.config.patch_grid
    assert stem(units).shape == (2, model.config.vision_config.hidden_size, grid, grid)  # K = 2 pools x stride 2
    # a bright spot of 2 x 2 pixels (in token (5, 5)) moves only the tokens whose receptive field holds it: no
    # statistics across pixels (the receptive field reaches about 17 pixels, two tokens, to each side)
    spot = units.clone()
    spot[:, :, 40:42, 40:42] = 1.0
    with torch.no_grad():
        changed = (stem(spot) - stem(units)).abs().amax(dim=(0, 1)) > 0  # (h, w)
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert changed[5, 5] and int(changed.sum()) < grid * grid // 4
    assert (rows - 5).abs().max() <= 2 and (cols - 5).abs().max() <= 2
    batch = volume_batch(model, tokenizer)
    save_omnict(model, tokenizer, tmp_path / "stem")
    loaded, _ = load_omnict(tmp_path / "stem")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    with pytest.raises(ValueError, match="does not divide the patch size 8"):
        omnict_preset("tiny", vision_stem_widths=[8, 8, 8, 8, 8])
    with pytest.raises(ValueError, match="keeps its own patch embedding"):
        omnict_preset("tiny", vision_stem_widths=[8], vision_model_path=str(tmp_path / "siglip"))


def test_ose_on_off_per_sample_and_by_config(tiny, tokenizer):
    with torch.no_grad():
        both = volume_batch(tiny, tokenizer, use_ose=(True, False))
        assert both["input_ids"][1].tolist().count(tiny.config.mask3d_token_id) == 0
        assert torch.isfinite(tiny(**both).logits).all()
        # the organ mask matters: same prompt with the whole-body fallback gives other logits
        with_mask = tiny(**volume_batch(tiny, tokenizer)).logits
        no_mask = tiny(**volume_batch(tiny, tokenizer, masks=False)).logits
        assert not torch.allclose(with_mask[0], no_mask[0])
        assert torch.allclose(with_mask[1], no_mask[1])  # sample 1's mask is empty = whole body
    off = build_model("tiny", tokenizer, use_ose=False)
    batch = volume_batch(off, tokenizer, use_ose=(None, None))
    assert batch["input_ids"].shape[1] == both["input_ids"].shape[1] - 18
    assert torch.isfinite(off(**batch).loss)


def test_pretrained_components_load_from_local_directories(tokenizer, tmp_path):
    from transformers import Qwen2ForCausalLM, SiglipConfig, SiglipModel

    base = omnict_preset("tiny")
    torch.manual_seed(3)
    # like google/siglip-so400m-patch14-384: a full SigLIP (text + vision + head) checkpoint
    vision_config = base.vision_config.to_dict() | {"vision_use_head": True}
    siglip = SiglipModel(SiglipConfig(vision_config=vision_config, text_config={
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "vocab_size": 100, "projection_size": 192}))
    siglip.save_pretrained(tmp_path / "siglip")
    base.text_config.vocab_size = 300  # smaller than the tokenizer: the embedding table must grow
    qwen = Qwen2ForCausalLM(base.text_config)
    qwen.save_pretrained(tmp_path / "qwen")
    config = omnict_preset("tiny", vision_model_path=str(tmp_path / "siglip"), text_model_path=str(tmp_path / "qwen"))
    model = build_model(config, tokenizer)
    assert torch.equal(model.vision_tower.embeddings.patch_embedding.weight,
                       siglip.vision_model.embeddings.patch_embedding.weight)
    assert torch.equal(model.vision_tower.post_layernorm.weight, siglip.vision_model.post_layernorm.weight)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tokenizer) and torch.equal(emb[:300], qwen.get_input_embeddings().weight)
    assert not hasattr(model.vision_tower, "head")
    batch = volume_batch(model, tokenizer)
    assert torch.isfinite(model(**batch).loss)


def test_inconsistent_batches_are_refused_with_a_reason(tiny, tokenizer):
    batch = volume_batch(tiny, tokenizer)
    with pytest.raises(ValueError, match="image placeholders but the units give"):
        tiny(**{**batch, "pixel_units": batch["pixel_units"][:, :3]})  # 3 units for a 4-unit prompt
    ids = batch["input_ids"].clone()
    ids[0, ids[0] == tiny.config.mask3d_token_id] = tiny.config.pad_token_id
    ids[0, torch.nonzero(ids[0] == tiny.config.pad_token_id)[0]] = tiny.config.mask3d_token_id  # 1 organ slot
    with pytest.raises(ValueError, match="organ placeholders, expected 0 or 18"):
        tiny(**{**batch, "input_ids": ids})
    with pytest.raises(ValueError, match="exactly one kind"):
        tiny(**{**batch, "input_ids": torch.full_like(ids, 20)})
