"""OmniCT configuration (HF-style): one ``OmniCTConfig`` holding the SigLIP vision tower config, the Qwen2 LLM config
and the hyper-parameters of the paper's SCE (VSC / TPE / MHP) and OSE blocks.

Presets (``omnict_preset(name)``):

* ``omnict-7b`` / ``omnict-3b`` — the paper's shapes: SigLIP-so400m-patch14-384 + Qwen2.5-7B / Qwen2.5-3B.
  Volumes are windowed/resampled to 32x384x384 (paper App. E). ``vision_model_path`` / ``text_model_path`` name
  LOCAL Hugging Face directories from which the pretrained components are loaded (never the hub); see
  ``OmniCTForConditionalGeneration.from_pretrained_components``.
* ``tiny`` — a CPU-trainable model with the same structure (~6M parameters with a 2k vocabulary).

Choices the paper leaves open (documented here because they change token counts):

* unshuffle window ``m`` for volumes = 3: SigLIP at 384 px / patch 14 gives a 27x27 grid, which m=3 divides
  exactly (9x9 = 81 tokens per unit). With 11 units for 32 slices that is 891 global + 90 organ tokens = 981
  visual tokens, which fits the paper's 2048 max sequence length (m=2 would need 2156 global tokens alone).
  Slices use m=1 (paper: "m = 1 for slice inputs to preserve original resolution").
* OSE aggregation grids: L_c(2D) = 81 = 9x9 and L_c(3D) = 90 = 10x3x3 (paper Table 12's best setting). The
  aggregation is a masked adaptive average pool of the organ's token bounding box onto that grid (see
  modeling_omnict.OrganSemanticEnhancement).
* TPE widths d_z = d_y = d_x = 64 (the paper does not give them).
"""

from __future__ import annotations

import math
import sys
from typing import Any


def _hide_unusable_torchvision() -> None:
    """transformers imports torchvision whenever it is installed; the PyPI torchvision wheel is a CUDA build that
    cannot load next to our CPU torch ('operator torchvision::nms does not exist', ENVIRONMENT.md), which makes
    every ``import transformers.PreTrainedModel`` fail. OmniCT needs no torchvision: if it cannot be imported, mark
    it absent (``sys.modules[name] = None`` makes importlib report it as not installed)."""
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401
    except Exception:  # RuntimeError from the CUDA build, ImportError, ...
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # type: ignore[assignment]
        import_utils = sys.modules.get("transformers.utils.import_utils")
        for check in ("is_torchvision_available", "is_torchvision_v2_available"):
            cached = getattr(import_utils, check, None)
            if hasattr(cached, "cache_clear"):
                cached.cache_clear()


_hide_unusable_torchvision()

from transformers import PretrainedConfig, Qwen2Config, SiglipVisionConfig  # noqa: E402

# Special tokens of the OmniCT prompt format (the public README's placeholders + Qwen chat markers).
IMAGE2D_START, IMAGE2D, IMAGE2D_END = "<|image2d_start|>", "<|image2d|>", "<|image2d_end|>"
IMAGE3D_START, IMAGE3D, IMAGE3D_END = "<|image3d_start|>", "<|image3d|>", "<|image3d_end|>"
ORGAN_START, MASK2D, MASK3D, ORGAN_END = "<|organ_start|>", "<|mask2d|>", "<|mask3d|>", "<|organ_end|>"
IM_START, IM_END, PAD_TOKEN = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

PLACEHOLDER_TOKENS = (
    IMAGE2D_START, IMAGE2D, IMAGE2D_END, IMAGE3D_START, IMAGE3D, IMAGE3D_END, ORGAN_START, MASK2D, MASK3D, ORGAN_END,
)
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END) + PLACEHOLDER_TOKENS

UNIT_KINDS = ("2d", "3d")


class OmniCTConfig(PretrainedConfig):
    """Configuration of ``OmniCTForConditionalGeneration``.

    Sizes are in the paper's notation: a volume of ``volume_depth`` x ``image_size`` x ``image_size`` becomes
    N_s = ceil(D / slices_per_unit) reconstruction units of 3 x image_size x image_size; each unit gives
    H' x W' = (image_size // patch_size)^2 SigLIP tokens, unshuffled by m (``unshuffle_3d`` / ``unshuffle_2d``).
    """

    model_type = "omnict"
    sub_configs = {"vision_config": SiglipVisionConfig, "text_config": Qwen2Config}

    vision_config: Any = None
    text_config: Any = None
    # Local directories of pretrained components (HF format). None = random init (tests, tiny model).
    vision_model_path: str | None = None
    text_model_path: str | None = None
    # Random-init towers only: widths of a convolutional stem that replaces SigLIP's linear patch embedding (two 3x3
    # convolutions per width at full resolution, 2x2 max pooling between widths, then a strided convolution to d_v:
    # "early convolutions", Xiao et al. 2021). None = SigLIP's own patch embedding (the paper's; every preset).
    vision_stem_widths: Any = None
    # --- VSC: volumes are resampled to volume_depth x image_size x image_size, 3 slices per unit ---
    volume_depth: int = 32
    slices_per_unit: int = 3
    # --- TPE: sinusoidal widths (d_z, d_y, d_x) concatenated to the d_v patch features ---
    tpe_dims: Any = None
    # --- MHP: token unshuffle windows and the shared projection width (None = LLM hidden size) ---
    unshuffle_3d: int = 3
    unshuffle_2d: int = 1
    projector_hidden_size: int | None = None
    # --- OSE: aggregation grids; L_c = prod(grid) (paper: 81 = 9x9 for 2D, 90 = 10x3x3 for 3D) ---
    use_ose: bool = True
    ose_grid_2d: Any = None
    ose_grid_3d: Any = None
    # --- special token ids (set by ``attach_tokenizer``); -1 = not set yet ---
    image2d_token_id: int = -1
    image3d_token_id: int = -1
    mask2d_token_id: int = -1
    mask3d_token_id: int = -1
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = SiglipVisionConfig(vision_use_head=False)
        elif isinstance(self.vision_config, dict):
            self.vision_config = SiglipVisionConfig(**self.vision_config)
        if self.text_config is None:
            self.text_config = Qwen2Config()
        elif isinstance(self.text_config, dict):
            self.text_config = Qwen2Config(**self.text_config)
        # SigLIP's attention-pool head is unused by OmniCT (we take the patch tokens): never build it.
        self.vision_config.vision_use_head = False
        self.tpe_dims = list(self.tpe_dims) if self.tpe_dims is not None else [64, 64, 64]
        self.ose_grid_2d = list(self.ose_grid_2d) if self.ose_grid_2d is not None else [1, 9, 9]
        self.ose_grid_3d = list(self.ose_grid_3d) if self.ose_grid_3d is not None else [10, 3, 3]
        self.vision_stem_widths = list(self.vision_stem_widths) if self.vision_stem_widths else None
        super().__post_init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        if len(self.tpe_dims) != 3 or any(d % 2 for d in self.tpe_dims):
            raise ValueError(f"tpe_dims must be three even widths (d_z, d_y, d_x), got {self.tpe_dims}")
        if len(self.ose_grid_2d) != 3 or len(self.ose_grid_3d) != 3:
            raise ValueError("ose_grid_2d / ose_grid_3d must be (depth, height, width) grids")
        if self.vision_stem_widths:
            pooled = 2 ** (len(self.vision_stem_widths) - 1)
            if self.patch_size % pooled:
                raise ValueError(f"a stem of {len(self.vision_stem_widths)} widths pools by {pooled}, which does not "
                                 f"divide the patch size {self.patch_size}")
            if self.vision_model_path:
                raise ValueError("vision_stem_widths is for a randomly initialised tower; a pretrained SigLIP "
                                 "(vision_model_path) keeps its own patch embedding")
        grid = self.patch_grid
        for m in (self.unshuffle_2d, self.unshuffle_3d):
            if grid % m:
                raise ValueError(f"unshuffle window {m} does not divide the {grid}x{grid} patch grid")

    # ----------------------------------------------------------------------------------------- derived sizes
    @property
    def image_size(self) -> int:
        return int(self.vision_config.image_size)

    @property
    def patch_size(self) -> int:
        return int(self.vision_config.patch_size)

    @property
    def patch_grid(self) -> int:
        """H' = W' = image_size // patch_size (27 for SigLIP-so400m-patch14-384; SigLIP drops the remainder)."""
        return self.image_size // self.patch_size

    @property
    def llm_hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    def unshuffle(self, kind: str) -> int:
        return self.unshuffle_3d if _check_kind(kind) == "3d" else self.unshuffle_2d

    def tokens_per_unit(self, kind: str) -> int:
        """Global tokens per reconstruction unit after the m x m unshuffle: (H'/m) * (W'/m)."""
        side = self.patch_grid // self.unshuffle(kind)
        return side * side

    def num_units(self, depth: int | None = None) -> int:
        """Reconstruction units for a volume of ``depth`` slices: ceil(D / 3) (the last unit edge-padded)."""
        depth = self.volume_depth if depth is None else depth
        return max(1, math.ceil(depth / self.slices_per_unit))

    def num_organ_tokens(self, kind: str) -> int:
        """L_c: fixed number of OSE tokens (81 for 2D, 90 for 3D in the paper presets)."""
        grid = self.ose_grid_3d if _check_kind(kind) == "3d" else self.ose_grid_2d
        return int(math.prod(grid))

    def num_visual_tokens(self, kind: str, num_units: int | None = None, use_ose: bool | None = None) -> int:
        """L (+ L_c when OSE is on): what the single image (+ mask) placeholder expands to."""
        if num_units is None:
            num_units = self.num_units() if kind == "3d" else 1
        ose = self.use_ose if use_ose is None else use_ose
        return num_units * self.tokens_per_unit(kind) + (self.num_organ_tokens(kind) if ose else 0)

    def projector_input_size(self, kind: str) -> int:
        """(d_v + d_z + d_y + d_x) * m^2: input width of the slice / volume expert."""
        return (int(self.vision_config.hidden_size) + sum(self.tpe_dims)) * self.unshuffle(kind) ** 2

    def image_token_id(self, kind: str) -> int:
        return self.image3d_token_id if _check_kind(kind) == "3d" else self.image2d_token_id

    def mask_token_id(self, kind: str) -> int:
        return self.mask3d_token_id if _check_kind(kind) == "3d" else self.mask2d_token_id

    def attach_tokenizer(self, tokenizer) -> None:
        """Record the placeholder / pad / eos ids of ``tokenizer`` and size the LLM vocabulary to it."""
        ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
        missing = [tok for tok, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"tokenizer lacks the OmniCT special tokens {missing}")
        self.image2d_token_id, self.image3d_token_id = ids[IMAGE2D], ids[IMAGE3D]
        self.mask2d_token_id, self.mask3d_token_id = ids[MASK2D], ids[MASK3D]
        self.pad_token_id, self.eos_token_id = ids[PAD_TOKEN], ids[IM_END]
        self.text_config.pad_token_id, self.text_config.eos_token_id = self.pad_token_id, self.eos_token_id
        self.text_config.bos_token_id = None
        # The minimum vocabulary; a pretrained LLM (text_model_path) keeps its own when larger (padded tables).
        self.text_config.vocab_size = len(tokenizer)


def _check_kind(kind: str) -> str:
    if kind not in UNIT_KINDS:
        raise ValueError(f"unit kind must be '2d' or '3d', got {kind!r}")
    return kind


# --------------------------------------------------------------------------------------------------- presets
def _siglip_so400m_384() -> SiglipVisionConfig:
    """google/siglip-so400m-patch14-384 vision tower shape."""
    return SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=384, patch_size=14, num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        vision_use_head=False,
    )


def _qwen25(size: str) -> Qwen2Config:
    """Qwen2.5-{3B,7B}(-Instruct) shapes."""
    common = dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                  use_sliding_window=False, attention_dropout=0.0)
    if size == "7b":
        return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, **common)
    if size == "3b":
        return Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                           num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True, **common)
    raise ValueError(size)


def _tiny_vision() -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=192, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        image_size=96, patch_size=8, num_channels=3, vision_use_head=False,
    )


def _tiny_text() -> Qwen2Config:
    return Qwen2Config(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-6)


PRESET_NAMES = ("omnict-7b", "omnict-3b", "tiny")


def omnict_preset(name: str, **overrides: Any) -> OmniCTConfig:
    """Build a named configuration; ``overrides`` replace top-level fields (e.g. ``use_ose=False``)."""
    if name in ("omnict-7b", "omnict-3b"):
        fields: dict[str, Any] = dict(
            vision_config=_siglip_so400m_384(), text_config=_qwen25(name.split("-")[1]),
            volume_depth=32, tpe_dims=[64, 64, 64], unshuffle_3d=3, unshuffle_2d=1,
            ose_grid_2d=[1, 9, 9], ose_grid_3d=[10, 3, 3],
        )
    elif name == "tiny":
        # 96 px / patch 8 -> 12x12 grid; m=3 -> 16 tokens per volume unit; 12 slices -> 4 units -> 64 tokens.
        fields = dict(
            vision_config=_tiny_vision(), text_config=_tiny_text(), volume_depth=12, tpe_dims=[16, 16, 16],
            unshuffle_3d=3, unshuffle_2d=1, ose_grid_2d=[1, 4, 4], ose_grid_3d=[2, 3, 3],
        )
    else:
        raise ValueError(f"unknown OmniCT preset {name!r}; known: {', '.join(PRESET_NAMES)}")
    fields.update(overrides)
    return OmniCTConfig(**fields)
