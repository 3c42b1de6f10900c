"""OmniCT: a unified slice-volume vision-language model for CT (ICLR 2026), in one file that follows the paper.

Pipeline (Section 2, notation of Table 4), for one sample:

    units S^   (N_s, 3, H, W)      VSC: 3 adjacent slices -> one 3-channel unit (2D: slice replicated)   [preprocessing]
    F          (N_s, H', W', d_v)  SigLIP vision tower phi_v per unit (patch K, H' = H // K)           eq. (1)
    Z          (N_s, H', W', d_v + d_z + d_y + d_x)   TPE: sinusoidal depth/height/width codes CONCATENATED  eq. (2)
    Z^         (N_s, H'/m, W'/m, (d_v+d_z+d_y+d_x) m^2)   token unshuffle U, m = 3 volumes / 1 slices      eq. (3)
    F^         (L, d_h)            MHP: W_share GELU(W_s z) for slices, W_share GELU(W_v z) for volumes   eq. (4)
    f^_o       (L_c, d_h)          OSE: organ mask -> token grid, select F^[M^_o], aggregate to L_c       eq. (5)
    F^_OSE     (L + L_c, d_h)      [F^ ; f^_o]  spliced into the Qwen2 input embeddings at the placeholders
    loss       autoregressive cross-entropy on the answer tokens                                       eq. (6)

Batch format (what ``forward`` / ``prepare_inputs_embeds`` take; build it with omnict_core.preprocessing and
omnict_core.tokenization_omnict.encode_example / collate_examples):

    input_ids       int64 (B, T)  prompt ids with EXPANDED placeholders: sample i holds exactly
                    N_i * tokens_per_unit(kind) image placeholders (``<|image3d|>`` or ``<|image2d|>``) and either
                    L_c or 0 organ placeholders (``<|mask3d|>`` / ``<|mask2d|>``; 0 = OSE off for that sample).
                    The image placeholder kind tells whether the sample is a volume ('3d') or slice ('2d').
    attention_mask  int64 (B, T)  1 = token, 0 = padding (right padding for training, left for batched inference).
    labels          int64 (B, T)  -100 except the answer tokens (+ closing ``<|im_end|>``); optional.
    pixel_units     float32 (B, N_u, 3, S, S) reconstruction units, already windowed and normalised by
                    preprocessing (values in [-1, 1]); S = config.image_size. A list of (N_i, 3, S, S) tensors is
                    accepted for batches mixing volumes and slices (N_u = 1 for a single 2D slice).
    unit_kind       optional: '2d' / '3d' or one per sample; checked against the placeholders when given.
    organ_masks     optional bool (B, N_u, S, S) (or a list of (N_i, S, S)): the organ mask of each unit (union of
                    its 3 slices, same grid as pixel_units). None, or an all-zero mask for a sample, means "no organ
                    given": OSE then aggregates the WHOLE token grid (the paper's "compression effect for global
                    regions"), so the sequence length never depends on segmentation succeeding.

Decisions the paper leaves open are documented in configuration_omnict.py (m = 3, L_c grids, TPE widths).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omnict_core.configuration_omnict import UNIT_KINDS, OmniCTConfig  # first: guards the transformers import
from transformers import PreTrainedModel, Qwen2ForCausalLM, SiglipVisionModel  # noqa: E402
from transformers import initialization as init  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402


# ----------------------------------------------------------------------------------------------------- SCE / TPE
class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel: (N, C, H, W) -> (N, C, H, W). Unlike GroupNorm / BatchNorm it uses
    no statistics across pixels or images, so a pixel's features depend on its receptive field only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvStemPatchEmbedding(nn.Module):
    """Replaces SigLIP's linear patch embedding (one K x K, stride-K convolution) in a randomly initialised tower:
    ``widths`` stages of two 3x3 convolutions (per-pixel LayerNorm, GELU) at full resolution, 2x2 max pooling between stages,
    then a convolution of kernel = stride = K / 2^(stages - 1) to d_v. Why: a from-scratch ViT reads a finding of a
    few pixels poorly through a linear 8 x 8 patch (model card, "Small findings"), while a small CNN on the same
    pixels reads it; max pooling keeps a small bright spot that averaging dilutes.

    (N, 3, S, S) -> (N, d_v, S/K, S/K), as SigLIP's embedding layer expects of ``patch_embedding``."""

    def __init__(self, in_channels: int, widths: Sequence[int], hidden_size: int, patch_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for index, width in enumerate(widths):
            if index:
                layers.append(nn.MaxPool2d(2))  # (N, c, s, s) -> (N, c, s/2, s/2)
            for _ in range(2):
                layers += [nn.Conv2d(previous, width, 3, padding=1), ChannelLayerNorm(width), nn.GELU()]
                previous = width
        self.stem = nn.Sequential(*layers)  # (N, 3, S, S) -> (N, c_last, S/2^(n-1), S/2^(n-1))
        stride = patch_size // 2 ** (len(widths) - 1)
        self.projection = nn.Conv2d(previous, hidden_size, stride, stride=stride)  # -> (N, d_v, S/K, S/K)

    @property
    def weight(self) -> torch.Tensor:
        """SigLIP's embedding layer reads ``patch_embedding.weight.dtype`` to cast its input."""
        return self.projection.weight

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(self.stem(pixels))


def sinusoidal_encoding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sin/cos code of integer ``positions`` (n,) -> (n, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    angles = positions.float()[:, None] * freqs[None, :]  # (n, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (n, dim)


class TriAxialPositionalEmbedding(nn.Module):
    """TPE (eq. 2): Z = F (+) P^{N_s} (+) P^{H'} (+) P^{W'} — concatenation along the feature axis, no parameters.

    Depth is the unit index inside its sample (a 2D slice has depth 0), so slices and volumes share one code.
    """

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.d_z, self.d_y, self.d_x = (int(d) for d in dims)

    @property
    def extra_dims(self) -> int:
        return self.d_z + self.d_y + self.d_x

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n_units, height, width, _ = features.shape  # F: (N_s, H', W', d_v)
        device, dtype = features.device, features.dtype

        def code(n: int, d: int) -> torch.Tensor:
            return sinusoidal_encoding(torch.arange(n, device=device), d).to(dtype)

        p_depth = code(n_units, self.d_z)[:, None, None, :].expand(n_units, height, width, self.d_z)
        p_height = code(height, self.d_y)[None, :, None, :].expand(n_units, height, width, self.d_y)
        p_width = code(width, self.d_x)[None, None, :, :].expand(n_units, height, width, self.d_x)
        return torch.cat([features, p_depth, p_height, p_width], dim=-1)  # Z: (N_s, H', W', d_v+d_z+d_y+d_x)


def token_unshuffle(z: torch.Tensor, m: int) -> torch.Tensor:
    """U (eq. 3): fold each m x m window of neighbouring tokens into one token of m^2 x the width."""
    if m == 1:
        return z
    n, h, w, c = z.shape  # (N_s, H', W', C)
    z = z.view(n, h // m, m, w // m, m, c).permute(0, 1, 3, 2, 4, 5)  # (N_s, H'/m, W'/m, m, m, C)
    return z.reshape(n, h // m, w // m, m * m * c)  # Z^: (N_s, H'/m, W'/m, C m^2)


class MoEHybridProjection(nn.Module):
    """MHP (eq. 4): F^ = W_share GELU(W_s z 1_slice + W_v z 1_volume) — hard routing by input kind.

    The experts have different input widths because slices keep m = 1 and volumes use m = 3.
    """

    def __init__(self, config: OmniCTConfig) -> None:
        super().__init__()
        hidden = config.projector_hidden_size or config.llm_hidden_size
        self.slice_expert = nn.Linear(config.projector_input_size("2d"), hidden)  # W_s
        self.volume_expert = nn.Linear(config.projector_input_size("3d"), hidden)  # W_v
        self.act = nn.GELU()
        self.shared = nn.Linear(hidden, config.llm_hidden_size)  # W_share

    def forward(self, z_hat: torch.Tensor, kind: str) -> torch.Tensor:
        expert = self.volume_expert if kind == "3d" else self.slice_expert
        return self.shared(self.act(expert(z_hat)))  # (..., d_h)


# -------------------------------------------------------------------------------------------------------- OSE
class OrganSemanticEnhancement(nn.Module):
    """OSE (eq. 5): organ region localisation + adaptive aggregation to a fixed L_c tokens.

    * Localisation: the pixel mask of each unit is max-pooled onto the token grid (a token belongs to the organ if
      any pixel under it does, so even a tiny organ keeps >= 1 token); M^_o selects those tokens of F^.
    * Aggregation Agg(.): the selected tokens' bounding box in (unit, row, col) is pooled onto a fixed grid
      (paper presets 1x9x9 = 81 for 2D, 10x3x3 = 90 for 3D) by a MASKED adaptive average — each output cell is the
      mean of the organ tokens under it. A small organ is thereby magnified (cells repeat its few tokens) and a
      large one compressed, the paper's "magnification / compression effect"; the grid keeps the tokens in spatial
      order. Cells whose window holds no organ token fall back to the plain window mean (context).
    * A learned per-slot embedding (zero-initialised) marks the L_c organ tokens apart from the global ones.
    """

    def __init__(self, config: OmniCTConfig) -> None:
        super().__init__()
        self.grids = {"2d": tuple(config.ose_grid_2d), "3d": tuple(config.ose_grid_3d)}
        self.patch_size = config.patch_size
        self.patch_grid = config.patch_grid
        self.unshuffle = {kind: config.unshuffle(kind) for kind in UNIT_KINDS}
        d_h = config.llm_hidden_size
        self.slot_embedding_2d = nn.Parameter(torch.zeros(config.num_organ_tokens("2d"), d_h))
        self.slot_embedding_3d = nn.Parameter(torch.zeros(config.num_organ_tokens("3d"), d_h))

    def token_mask(self, organ_mask: torch.Tensor, kind: str) -> torch.Tensor:
        """M_o (N_s, S, S) pixels -> M^_o (N_s, H'/m, W'/m) tokens, by the pixel-to-token scaling K * m."""
        window = self.patch_size * self.unshuffle[kind]
        used = self.patch_grid * self.patch_size  # SigLIP ignores the remainder pixels (384 = 27*14 + 6)
        mask = organ_mask[:, :used, :used].float().unsqueeze(1)  # (N_s, 1, K H', K W')
        return F.max_pool2d(mask, kernel_size=window).squeeze(1) > 0  # (N_s, H'/m, W'/m)

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor | None, kind: str) -> torch.Tensor:
        # tokens F^: (N_s, h, w, d_h); token_mask M^_o: (N_s, h, w) bool or None
        if token_mask is None or not bool(token_mask.any()):
            token_mask = torch.ones(tokens.shape[:3], dtype=torch.bool, device=tokens.device)  # whole body
        coords = token_mask.nonzero()  # (L_o, 3)
        lo, hi = coords.min(dim=0).values, coords.max(dim=0).values + 1
        box = (slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1])), slice(int(lo[2]), int(hi[2])))
        x = tokens[box].permute(3, 0, 1, 2).unsqueeze(0).float()  # (1, d_h, n', h', w') organ bounding box
        weight = token_mask[box].float()[None, None]  # (1, 1, n', h', w')
        grid = self.grids[kind]
        summed = F.adaptive_avg_pool3d(x * weight, grid)  # (1, d_h, *grid)
        coverage = F.adaptive_avg_pool3d(weight, grid)  # (1, 1, *grid) fraction of organ tokens per cell
        context = F.adaptive_avg_pool3d(x, grid)
        pooled = torch.where(coverage > 0, summed / coverage.clamp_min(1e-6), context)
        f_o = pooled[0].flatten(1).transpose(0, 1).to(tokens.dtype)  # (L_c, d_h)
        slots = self.slot_embedding_3d if kind == "3d" else self.slot_embedding_2d
        return f_o + slots.to(tokens.dtype)  # f^_o: (L_c, d_h)


# ------------------------------------------------------------------------------------------------------ model
class OmniCTPreTrainedModel(PreTrainedModel):
    config_class = OmniCTConfig
    base_model_prefix = "omnict"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SiglipEncoderLayer", "Qwen2DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, OrganSemanticEnhancement):
            init.zeros_(module.slot_embedding_2d)
            init.zeros_(module.slot_embedding_3d)


class OmniCTForConditionalGeneration(OmniCTPreTrainedModel):
    """SigLIP -> TPE -> unshuffle -> MHP -> OSE -> Qwen2ForCausalLM."""

    def __init__(self, config: OmniCTConfig) -> None:
        super().__init__(config)
        self.vision_tower = SiglipVisionModel(config.vision_config)  # phi_v
        if config.vision_stem_widths:
            vision = config.vision_config
            self.vision_tower.set_input_embeddings(ConvStemPatchEmbedding(
                vision.num_channels, config.vision_stem_widths, vision.hidden_size, vision.patch_size))
        self.tpe = TriAxialPositionalEmbedding(config.tpe_dims)
        self.projector = MoEHybridProjection(config)  # psi (W_s, W_v, W_share)
        self.ose = OrganSemanticEnhancement(config)
        self.language_model = Qwen2ForCausalLM(config.text_config)
        self.post_init()

    # -------------------------------------------------------------------------- HF plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    @classmethod
    def from_pretrained_components(cls, config: OmniCTConfig, dtype: torch.dtype | None = None
                                   ) -> "OmniCTForConditionalGeneration":
        """Paper presets: SigLIP / Qwen2.5 weights from the LOCAL directories named by ``config.vision_model_path`` /
        ``config.text_model_path`` (no hub access; a missing path is an error naming it); MHP and OSE start random.
        The component configs found on disk replace the preset's (the LLM vocabulary is grown to the tokenizer's
        when ``attach_tokenizer`` asked for more ids than the checkpoint has)."""
        paths = (("vision_model_path", config.vision_model_path), ("text_model_path", config.text_model_path))
        for label, path in paths:
            if not path or not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(
                    f"OmniCT {label} must name a local Hugging Face model directory (with config.json); "
                    f"not found: {path!r}. Weights are never downloaded: provision them on disk first.")
        vision = SiglipVisionModel.from_pretrained(config.vision_model_path, dtype=dtype, vision_use_head=False)
        text = Qwen2ForCausalLM.from_pretrained(config.text_model_path, dtype=dtype)
        wanted_vocab = config.text_config.vocab_size
        if text.config.vocab_size < wanted_vocab:
            text.resize_token_embeddings(wanted_vocab)
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            setattr(text.config, key, getattr(config.text_config, key, None))
        config.vision_config, config.text_config = vision.config, text.config
        with torch.device("meta"):  # no second copy of the big components
            model = cls(config)
        model.vision_tower, model.language_model = vision, text
        model.projector, model.ose = MoEHybridProjection(config), OrganSemanticEnhancement(config)
        model.projector.apply(model._init_weights)
        model.ose.apply(model._init_weights)
        return model.to(dtype) if dtype is not None else model

    # ---------------------------------------------------------------- SCE: units -> tokens
    def encode_units(self, units: torch.Tensor, kind: str) -> torch.Tensor:
        """One sample's units (N_s, 3, S, S) -> projected global tokens F^ as a grid (N_s, H'/m, W'/m, d_h)."""
        return self._project(self._vision_features(units), kind)

    def _vision_features(self, units: torch.Tensor) -> torch.Tensor:
        n_units = units.shape[0]
        dtype = self.vision_tower.get_input_embeddings().weight.dtype
        hidden = self.vision_tower(pixel_values=units.to(dtype)).last_hidden_state  # (N_s, H'W', d_v)
        side = self.config.patch_grid
        return hidden.view(n_units, side, side, hidden.shape[-1])  # F: (N_s, H', W', d_v)

    def _project(self, features: torch.Tensor, kind: str) -> torch.Tensor:
        z = self.tpe(features)  # Z: (N_s, H', W', d_v + d_z + d_y + d_x)
        z_hat = token_unshuffle(z, self.config.unshuffle(kind))  # Z^: (N_s, H'/m, W'/m, (..) m^2)
        return self.projector(z_hat, kind)  # F^ grid: (N_s, H'/m, W'/m, d_h)

    # ------------------------------------------------------------------- visual sequence
    def visual_tokens(self, pixel_units: torch.Tensor | Sequence[torch.Tensor], kinds: Sequence[str],
                      organ_masks: torch.Tensor | Sequence[torch.Tensor | None] | None,
                      with_ose: Sequence[bool]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per sample: (global tokens F^ (L, d_h), organ tokens f^_o (L_c, d_h) or None when OSE is off)."""
        units_per_sample = [u for u in pixel_units]  # each (N_i, 3, S, S)
        counts = [int(u.shape[0]) for u in units_per_sample]
        # One vision-tower call for every unit of the batch (the encoder is shared by slices and volumes).
        features = self._vision_features(torch.cat(units_per_sample, dim=0)).split(counts, dim=0)
        out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for i, (feat, kind) in enumerate(zip(features, kinds)):
            grid = self._project(feat, kind)  # (N_i, h, w, d_h)
            organ = None
            if with_ose[i]:
                mask = None if organ_masks is None else organ_masks[i]
                token_mask = None if mask is None else self.ose.token_mask(mask.to(grid.device), kind)
                organ = self.ose(grid, token_mask, kind)  # (L_c, d_h)
            out.append((grid.reshape(-1, grid.shape[-1]), organ))
        return out

    def sample_layout(self, input_ids: torch.Tensor, unit_kind: str | Sequence[str] | None = None
                      ) -> tuple[list[str], list[bool]]:
        """Kind ('2d'/'3d') and OSE on/off of every sample, read from its placeholders."""
        cfg = self.config
        kinds, with_ose = [], []
        for row, ids in enumerate(input_ids):
            has3d = bool((ids == cfg.image3d_token_id).any())
            has2d = bool((ids == cfg.image2d_token_id).any())
            if has3d == has2d:
                raise ValueError(f"sample {row}: expected image placeholders of exactly one kind (2d or 3d)")
            kind = "3d" if has3d else "2d"
            if unit_kind is not None:
                expected = unit_kind if isinstance(unit_kind, str) else unit_kind[row]
                if expected != kind:
                    raise ValueError(f"sample {row}: unit_kind {expected!r} but the prompt holds {kind} placeholders")
            n_mask = int((ids == cfg.mask_token_id(kind)).sum())
            if n_mask not in (0, cfg.num_organ_tokens(kind)):
                raise ValueError(
                    f"sample {row}: {n_mask} organ placeholders, expected 0 or {cfg.num_organ_tokens(kind)}")
            kinds.append(kind)
            with_ose.append(n_mask > 0)
        return kinds, with_ose

    def prepare_inputs_embeds(self, input_ids: torch.Tensor, pixel_units: torch.Tensor | Sequence[torch.Tensor],
                              unit_kind: str | Sequence[str] | None = None,
                              organ_masks: torch.Tensor | Sequence[torch.Tensor | None] | None = None
                              ) -> torch.Tensor:
        """Text embeddings E (B, T, d_h) with the placeholders replaced by F^_OSE = [F^; f^_o] of each sample."""
        kinds, with_ose = self.sample_layout(input_ids, unit_kind)
        visual = self.visual_tokens(pixel_units, kinds, organ_masks, with_ose)
        return self.splice_visual_tokens(input_ids, kinds, visual)

    def splice_visual_tokens(self, input_ids: torch.Tensor, kinds: Sequence[str],
                             visual: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """E (B, T, d_h) with sample i's image placeholders <- F^ (L_i, d_h) and mask placeholders <- f^_o (L_c, d_h).
        The engine calls this with visual tokens it computed once per study."""
        cfg = self.config
        embeds = self.get_input_embeddings()(input_ids).clone()  # E: (B, T, d_h)
        for row, (kind, (global_tokens, organ_tokens)) in enumerate(zip(kinds, visual)):
            image_slots = input_ids[row] == cfg.image_token_id(kind)
            if int(image_slots.sum()) != global_tokens.shape[0]:
                raise ValueError(f"sample {row}: {int(image_slots.sum())} image placeholders but the units give "
                                 f"{global_tokens.shape[0]} tokens ({kind})")
            embeds[row, image_slots] = global_tokens.to(embeds.dtype)
            mask_slots = input_ids[row] == cfg.mask_token_id(kind)
            if organ_tokens is not None:
                embeds[row, mask_slots] = organ_tokens.to(embeds.dtype)
            elif bool(mask_slots.any()):
                raise ValueError(f"sample {row}: organ placeholders present but no organ tokens computed")
        return embeds

    # ----------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_units: torch.Tensor | Sequence[torch.Tensor] | None = None,
                unit_kind: str | Sequence[str] | None = None,
                organ_masks: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Loss (when ``labels``) and logits (B, T, V). Text-only calls (decode steps) may omit pixel_units."""
        if inputs_embeds is None:
            if pixel_units is not None:
                inputs_embeds = self.prepare_inputs_embeds(input_ids, pixel_units, unit_kind, organ_masks)
            else:
                inputs_embeds = self.get_input_embeddings()(input_ids)
        return self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_units: torch.Tensor | Sequence[torch.Tensor],
                 attention_mask: torch.Tensor | None = None, unit_kind: str | Sequence[str] | None = None,
                 organ_masks: torch.Tensor | Sequence[torch.Tensor | None] | None = None, **generate_kwargs
                 ) -> torch.Tensor:
        """Plain HF generation from the spliced embeddings; returns only the NEW tokens (B, n_new) (transformers 5).

        Batched prompts must be LEFT padded. Greedy unless ``do_sample=True`` is passed.
        """
        embeds = self.prepare_inputs_embeds(input_ids, pixel_units, unit_kind, organ_masks)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("eos_token_id", self.config.eos_token_id)
        generate_kwargs.setdefault("pad_token_id", self.config.pad_token_id)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    # ------------------------------------------------------------------------- training
    def set_trainable(self, stage: str) -> None:
        """Paper App. E: 'align' (stage 1) trains only MHP (+ OSE slots); 'instruct' (stage 2) adds the LLM;
        'all' also trains the vision tower (useful for the tiny model, whose SigLIP is not pretrained)."""
        if stage not in ("align", "instruct", "all"):
            raise ValueError(f"unknown training stage {stage!r}")
        self.requires_grad_(False)
        self.projector.requires_grad_(True)
        self.ose.requires_grad_(True)
        if stage in ("instruct", "all"):
            self.language_model.requires_grad_(True)
        if stage == "all":
            self.vision_tower.requires_grad_(True)


# --------------------------------------------------------------------------------------------- build / save / load
def build_model(preset_or_config: str | OmniCTConfig, tokenizer, **overrides) -> OmniCTForConditionalGeneration:
    """A randomly initialised OmniCT whose vocabulary and placeholder ids match ``tokenizer``."""
    from omnict_core.configuration_omnict import omnict_preset

    config = (omnict_preset(preset_or_config, **overrides) if isinstance(preset_or_config, str)
              else preset_or_config)
    config.attach_tokenizer(tokenizer)
    if config.vision_model_path or config.text_model_path:
        return OmniCTForConditionalGeneration.from_pretrained_components(config)
    return OmniCTForConditionalGeneration(config)


def save_omnict(model: OmniCTForConditionalGeneration, tokenizer, directory: str | Path) -> Path:
    """One directory: config.json + model.safetensors (save_pretrained) + tokenizer files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _quiet_progress():
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class _quiet_progress:
    """No transformers progress bars while saving/loading (they clutter CLI output and worker logs)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self._was_enabled:
            hf_logging.enable_progress_bar()


def load_omnict(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a directory written by ``save_omnict``; clear error when it is missing."""
    from omnict_core.tokenization_omnict import load_tokenizer

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"OmniCT checkpoint not found (no config.json): {directory}")
    with _quiet_progress():
        model = OmniCTForConditionalGeneration.from_pretrained(directory, dtype=dtype)
    model.to(device).eval()
    return model, load_tokenizer(str(directory))
