"""The CLIP backbone: the one place in zsad that touches open_clip internals (design.md;
docs/methods.md §1.1, §13).

``load_clip`` builds an open_clip ViT CLIP by name and loads weights from a pretrained tag (downloaded and
cached by open_clip / huggingface_hub), a local file, the shipped zsad-tiny file, or a seeded random init.
``CLIPBackbone`` wraps it with the forwards of :mod:`zsad.clip_forward`, so all methods read the same tensors:

- ``encode_image``: pooled embedding plus, for chosen layers, raw residual tokens, tokens after ``ln_post`` +
  ``proj``, and the tokens of a second attention path (``AttnPath``: AnomalyCLIP / CLIP-AD) run beside the
  original one; optional AdaCLIP visual prompts.
- ``encode_windows``: WinCLIP window embeddings by token masking (docs/methods.md §2.1).
- ``encode_text``: the text tower with per-block prompt overwrite (AnomalyCLIP, AdaCLIP;
  docs/methods.md §5.2, §6.1).

Conventions. Blocks are numbered from 1; "layer l" is the residual stream after block l. Every returned
tensor is a fresh float32 tensor: nothing a later block does can change a stored layer
(docs/methods.md pitfall 1). The open_clip parameters are frozen and never modified in place; an image-size
change builds a new positional-embedding parameter (docs/methods.md pitfall 10). Import everything from here,
not from ``zsad.clip_forward``.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import pickle
import re
import warnings
import zipfile
from contextlib import nullcontext
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from zsad.clip_forward import AttnPath, ImageFeatures, text_forward, vision_forward, window_forward
from zsad.data.images import OPENAI_MEAN, OPENAI_STD
from zsad.device import resolve_device
from zsad.tiny import CONFIG_DIR, TINY_NAME, WEIGHTS_FILE

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "AttnPath",
    "BackboneError",
    "CLIPBackbone",
    "ImageFeatures",
    "default_weights_for",
    "load_clip",
    "resize_positional_embedding",
    "set_image_size",
]

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")

# Registering our config directory makes "zsad-tiny" an ordinary open_clip name (create_model, get_tokenizer).
open_clip.add_model_config(CONFIG_DIR)


class BackboneError(RuntimeError):
    """A user-facing backbone problem: weights missing or unreadable, unknown model, bad layer index."""


# ---------------------------------------------------------------------------------------------- the module


class CLIPBackbone(nn.Module):
    """A frozen open_clip CLIP (``.model``) with the forwards every zsad method uses. Build it with
    :func:`load_clip`; the constructor also wraps an existing open_clip ``CLIP`` (e.g. a model in training).
    """

    def __init__(
        self,
        model: open_clip.CLIP,
        name: str,
        pretrained: str | None = None,
        weights_id: str = "unknown",
        *,
        mean: tuple = OPENAI_MEAN,
        std: tuple = OPENAI_STD,
        quick_gelu: bool | None = None,
    ) -> None:
        super().__init__()
        _check_supported(model, name)
        self.model = model.eval().requires_grad_(False)
        self.name, self.pretrained, self.weights_id = name, pretrained, weights_id
        self.mean, self.std = tuple(mean), tuple(std)
        is_quick = isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
        self.quick_gelu = is_quick if quick_gelu is None else quick_gelu
        # How load_clip built it (interpolation, antialias, quick_gelu, round_fp16, the seed of a random
        # init): checkpoints record it so that the same backbone can be rebuilt.
        self.load_options: dict = {"quick_gelu": self.quick_gelu}
        self._tokenizer = open_clip.get_tokenizer(name, context_length=model.context_length)

    @property
    def image_size(self) -> int:
        return self.model.visual.image_size[0]

    @property
    def patch_size(self) -> int:
        return self.model.visual.patch_size[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.model.visual.grid_size)

    @property
    def num_layers(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        return self.model.visual.conv1.out_channels

    @property
    def embed_dim(self) -> int:
        return self.model.visual.proj.shape[1]

    @property
    def context_length(self) -> int:
        return self.model.context_length

    @property
    def text_width(self) -> int:
        return self.model.token_embedding.embedding_dim

    @property
    def num_text_layers(self) -> int:
        return len(self.model.transformer.resblocks)

    @property
    def device(self) -> torch.device:
        return self.model.visual.proj.device

    @property
    def weights_label(self) -> str:
        """Where the weights came from, for report headers: a tag, a file, the shipped zsad-tiny, random."""
        if self.pretrained is not None:
            return str(self.pretrained)
        if self.weights_id.startswith("random-"):
            return f"random init ({self.weights_id.split('+')[0]})"
        if self.name == TINY_NAME:
            return f"shipped {self.name} weights ({self.weights_id})"
        return self.weights_id

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weights_id={self.weights_id!r}, image_size={self.image_size}"

    def train(self, mode: bool = True) -> CLIPBackbone:
        """The CLIP stays in eval mode whatever a parent module asks (it is frozen)."""
        super().train(mode)
        self.model.eval()
        return self

    def tokenize(self, texts: list[str] | str) -> Tensor:
        """open_clip's tokenizer for this model -> LongTensor (N, context_length)."""
        return self._tokenizer([texts] if isinstance(texts, str) else list(texts))

    def encode_image(
        self,
        images: Tensor,
        layers: tuple[int, ...] | list[int] = (),
        attn_path: AttnPath | None = None,
        autocast: bool | torch.dtype | None = False,
        visual_prompts: dict[int, Tensor] | None = None,
    ) -> ImageFeatures:
        """One vision forward. ``layers``: 1-based blocks to tap (negative from the end). ``attn_path``: the
        second path (AnomalyCLIP / CLIP-AD). ``visual_prompts``: block -> (n, W) or (B, n, W) tokens entering
        before that block (AdaCLIP: appended at the first such block, replacing the last n at later ones;
        excluded from every output). ``autocast``: True or torch.bfloat16 for bf16 autocast, torch.float16
        for fp16 (CUDA only); outputs are float32 either way."""
        images = self._check_images(images)
        taps = _resolve(layers, self.num_layers, "layer")
        if attn_path is not None:  # start_block only matters for the residual variant
            residual = attn_path.variant == "residual"
            checked = [attn_path.num_stages, attn_path.start_block] if residual else [attn_path.num_stages]
            _resolve(checked, self.num_layers, "AttnPath start_block/num_stages")
        prompts = self._by_block(visual_prompts, self.num_layers, "visual prompt block")
        with self._precision(autocast):
            return vision_forward(self.model.visual, images, taps, attn_path, prompts)

    forward = encode_image

    def encode_windows(
        self,
        images: Tensor,
        windows: Tensor,
        autocast: bool | torch.dtype | None = False,
        chunk: int = 512,
    ) -> Tensor:
        """WinCLIP window embeddings (docs/methods.md §2.1) -> (B, K, D), not normalised. ``windows``: (K, n)
        patch indices (row-major, 0..N-1); each window keeps CLS + its n tokens and runs all blocks, all
        windows batched; ``chunk`` bounds the sequences per pass (memory only)."""
        images = self._check_images(images)
        n_patches = self.grid_size[0] * self.grid_size[1]
        integer = isinstance(windows, Tensor) and windows.dtype in (torch.int32, torch.int64)
        if not integer or windows.dim() != 2 or windows.numel() == 0:
            raise ValueError("windows must be a non-empty integer tensor (K, n) of patch indices")
        if windows.min() < 0 or windows.max() >= n_patches:
            raise ValueError(f"windows must hold patch indices in 0..{n_patches - 1}")
        with self._precision(autocast):
            out = window_forward(self.model.visual, images, windows, max(1, chunk // images.shape[0]))
        return out.float()

    def encode_text(
        self,
        texts: list[str] | Tensor,
        deep_prompts: dict[int, Tensor] | None = None,
        prompt_start: int = 1,
        token_embeddings: Tensor | None = None,
        autocast: bool | torch.dtype | None = False,
    ) -> Tensor:
        """Text embeddings (N, D), not normalised. ``deep_prompts``: block (1-based) -> (n, W) or (N, n, W);
        before that block runs, positions prompt_start .. prompt_start+n-1 are overwritten (AnomalyCLIP: 1..4
        at blocks 2..9; AdaCLIP: 1..5; docs/methods.md §5.2, §6.1, pitfall 12).
        ``token_embeddings``: (N, L, W) replacing the word embeddings (learnable word prompts); the ids still
        pick the EOT token (argmax)."""
        ids = (texts if isinstance(texts, Tensor) else self.tokenize(texts)).to(self.device)
        if ids.dim() != 2 or ids.shape[1] > self.context_length:
            raise ValueError(
                f"token ids must be (N, L) with L <= {self.context_length}, got {tuple(ids.shape)}"
            )
        expected = (*ids.shape, self.text_width)
        if token_embeddings is not None and tuple(token_embeddings.shape) != expected:
            raise ValueError(f"token_embeddings must be {expected}, got {tuple(token_embeddings.shape)}")
        embeddings = None if token_embeddings is None else token_embeddings.to(self.device)
        prompts = self._by_block(deep_prompts, self.num_text_layers, "text block")
        with self._precision(autocast):
            return text_forward(self.model, ids, prompts, prompt_start, embeddings).float()

    def _check_images(self, images: Tensor) -> Tensor:
        size = self.image_size
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1:] != (3, size, size):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"{self.name}: images must be (B, 3, {size}, {size}), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"{self.name}: images must be a float tensor (normalised), got {images.dtype}")
        return images.to(device=self.device, dtype=self.model.visual.conv1.weight.dtype)

    def _by_block(self, prompts: dict[int, Tensor] | None, count: int, what: str) -> dict[int, Tensor]:
        return {_resolve([k], count, what)[0]: v.to(self.device) for k, v in (prompts or {}).items()}

    def _precision(self, autocast: bool | torch.dtype | None):
        """Autocast context: False/None = fp32, True = bf16, or a dtype (fp16 only on CUDA)."""
        if not autocast:
            return nullcontext()
        dtype = torch.bfloat16 if autocast is True else autocast
        if dtype == torch.float16 and self.device.type != "cuda":
            raise ValueError(f"fp16 autocast needs a CUDA device; {self.name} is on {self.device}")
        return torch.autocast(self.device.type, dtype=dtype)


def _resolve(values, count: int, what: str) -> list[int]:
    """1-based indices (negatives from the end) -> sorted positive ones; BackboneError if invalid."""
    values = [values] if isinstance(values, numbers.Integral) else list(values)
    out = set()
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v == 0 or not -count <= v <= count:
            raise BackboneError(
                f"{what} {v!r} is out of range: blocks are 1-based, 1..{count} (or -1..-{count})"
            )
        out.add(int(v) if v > 0 else count + 1 + int(v))
    return sorted(out)


def _check_supported(model: nn.Module, name: str) -> None:
    visual = getattr(model, "visual", None)
    blocks = list(getattr(getattr(visual, "transformer", None), "resblocks", []))
    blocks += list(getattr(getattr(model, "transformer", None), "resblocks", []))
    standard = all(
        isinstance(b, ResidualAttentionBlock)
        and isinstance(b.attn, nn.MultiheadAttention)
        and b.attn.in_proj_weight is not None
        and b.attn.bias_k is None
        and not hasattr(b, "ln_1_kv")
        for b in blocks
    )
    vit = isinstance(visual, VisionTransformer) and visual.attn_pool is None and visual.pool_type == "tok"
    if not (standard and vit and visual.proj is not None and hasattr(model, "token_embedding")):
        raise BackboneError(
            f"{name!r}: only open_clip ViT CLIP models with standard attention blocks are supported"
        )


# ---------------------------------------------------------------------------------------------- loading


def default_weights_for(name: str) -> str | None:
    """Default ``pretrained`` for a model: None for zsad-tiny (shipped file), "openai" where it exists,
    else the first open_clip tag (None if the model has no tag)."""
    if name == TINY_NAME:
        return None
    tags = open_clip.list_pretrained_tags_by_model(name)
    return "openai" if "openai" in tags else (tags[0] if tags else None)


def load_clip(
    name: str,
    pretrained: str | os.PathLike | None = None,
    image_size: int | None = None,
    *,
    interpolation: str = "bicubic",
    antialias: bool = True,
    device: str | torch.device = "cpu",
    quick_gelu: bool | None = None,
    seed: int | None = None,
    cache_dir: str | None = None,
    round_fp16: bool = False,
) -> CLIPBackbone:
    """Build an open_clip ViT CLIP and load its weights.

    pretrained: an open_clip tag of ``name`` (downloaded/cached; offline and not cached -> BackboneError
        saying what to fetch and where), a weight file (.pt/.pth/.bin/.safetensors or an OpenAI JIT archive;
        pickles are read with ``weights_only=True``), "random" (seeded init: ``seed``, or one drawn from
        torch's RNG), or None: the shipped weights for zsad-tiny, a random init with a warning otherwise.
    image_size: run at this size; the positional embedding is resized (CLS row kept) with ``interpolation``
        ("bicubic" as open_clip/APRIL-GAN, "bilinear" + antialias=False as AnomalyCLIP; docs/methods.md §1.1).
    quick_gelu: None = what the weights were trained with: the tag's open_clip flag (True for "openai"),
        True for OpenAI JIT archives, else the model config. False runs OpenAI weights with exact GELU as
        APRIL-GAN and AdaCLIP do (docs/methods.md §13.1).
    device: "cpu" (default), "auto", "cuda" or "cuda:N" (:func:`zsad.device.resolve_device`).
    seed / cache_dir: seed of a random init; download cache (None = open_clip / huggingface_hub default).
    round_fp16: pass the weights that open_clip's ``build_model_from_openai_state_dict`` stores in fp16
        (Conv/Linear weights and biases, attention ``in_proj``, ``visual.proj``, ``text_projection``)
        through fp16 and back, as APRIL-GAN and AdaCLIP load OpenAI weights (docs/methods.md §13.8). A no-op
        for the real OpenAI file (already fp16); it matters for fp32 files such as random test weights.

    ``weights_id`` (for cache keys): the tag, "sha256-<16 hex>" of the file, or "random-<seed>", then
    "+quickgelu" when QuickGELU runs and "+<interpolation>[-aa]" when the positional embedding was resized.
    """
    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
    target = resolve_device(device)  # a device this machine lacks fails before any weights are read
    name, cfg = _model_config(name)
    native, patch = cfg["vision_cfg"]["image_size"], cfg["vision_cfg"]["patch_size"]
    if image_size is not None and (not isinstance(image_size, numbers.Integral) or image_size % patch):
        raise ValueError(f"image_size must be a multiple of {name}'s patch size {patch}, got {image_size!r}")
    file, tag_cfg = _resolve_weights(name, pretrained, cache_dir)
    state_dict, is_jit = _read_state_dict(file) if file is not None else (None, False)
    if quick_gelu is None:
        quick_gelu = bool(tag_cfg.get("quick_gelu")) if tag_cfg else is_jit or bool(cfg.get("quick_gelu"))
    if file is None and seed is None:
        seed = int(torch.randint(2**31 - 1, ()))  # reproducible under the caller's torch.manual_seed
    model = _build_model(cfg, quick_gelu, seed or 0)
    if state_dict is not None:
        _load_weights(model, state_dict, str(file), name, interpolation, antialias)
    if round_fp16:
        _round_fp16(model)
    weights_id = (
        _clean_tag(str(pretrained)) if tag_cfg else f"sha256-{_file_sha256(file)[:16]}" if file else ""
    )
    weights_id = (weights_id or f"random-{seed}") + ("+quickgelu" if quick_gelu else "")
    weights_id += "+fp16round" if round_fp16 else ""
    if image_size is not None and image_size != native:
        set_image_size(model, image_size, interpolation, antialias)
        weights_id += f"+{interpolation}{'-aa' if antialias else ''}"
    backbone = CLIPBackbone(
        model.to(target),
        name,
        None if pretrained is None else str(pretrained),
        weights_id,
        mean=tuple(tag_cfg.get("mean", OPENAI_MEAN)),
        std=tuple(tag_cfg.get("std", OPENAI_STD)),
        quick_gelu=quick_gelu,
    )
    backbone.load_options = {
        "interpolation": interpolation,
        "antialias": antialias,
        "quick_gelu": quick_gelu,
        "round_fp16": round_fp16,
        **({"seed": seed} if file is None else {}),
    }
    return backbone


def _round_fp16(model: open_clip.CLIP) -> None:
    """Round, in place on this fresh model, the tensors open_clip's ``convert_weights_to_lp`` casts."""
    with torch.no_grad():
        for module in model.modules():
            names = []
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                names = ["weight", "bias"]
            elif isinstance(module, nn.MultiheadAttention):
                names = ["in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"]
            names += [n for n in ("text_projection", "proj") if isinstance(getattr(module, n, None), Tensor)]
            for n in names:
                tensor = getattr(module, n, None)
                if isinstance(tensor, Tensor):
                    tensor.copy_(tensor.half().float())


def resize_positional_embedding(
    pos: Tensor, grid: tuple[int, int], interpolation: str = "bicubic", antialias: bool = True
) -> Tensor:
    """(1 + g*g, W) -> (1 + gh*gw, W) as a new tensor: CLS row kept, patch rows resampled on their 2-D grid
    (align_corners=False; docs/methods.md §1.1). ``pos`` itself is not modified."""
    old = math.isqrt(pos.shape[0] - 1)
    if old * old != pos.shape[0] - 1:
        raise BackboneError(f"positional embedding with {pos.shape[0] - 1} patch rows is not a square grid")
    grid_img = pos[1:].detach().float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid_img = F.interpolate(
        grid_img, size=grid, mode=interpolation, antialias=antialias, align_corners=False
    )
    patches = grid_img.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([pos[:1].detach().clone(), patches], dim=0)


def set_image_size(
    model: open_clip.CLIP, image_size: int, interpolation: str = "bicubic", antialias: bool = True
) -> None:
    """Make ``model.visual`` run at ``image_size``: a NEW positional-embedding parameter replaces the old one
    (whose tensor is left untouched), and ``image_size`` / ``grid_size`` follow
    (docs/methods.md pitfall 10)."""
    visual = model.visual
    patch = visual.patch_size[0]
    if not isinstance(image_size, numbers.Integral) or image_size <= 0 or image_size % patch:
        raise ValueError(
            f"image_size must be a positive multiple of the patch size {patch}, got {image_size!r}"
        )
    grid = (image_size // patch, image_size // patch)
    if grid != tuple(visual.grid_size):
        old = visual.positional_embedding
        new = resize_positional_embedding(old, grid, interpolation, antialias)
        visual.positional_embedding = nn.Parameter(new, requires_grad=old.requires_grad)
    visual.image_size, visual.grid_size = (image_size, image_size), grid
    if isinstance(getattr(visual, "preprocess_cfg", None), dict):
        visual.preprocess_cfg = {**visual.preprocess_cfg, "size": (image_size, image_size)}


def _clean_tag(tag: str) -> str:
    return tag.lower().replace("-", "_")  # open_clip's own tag normalisation


def _model_config(name: str) -> tuple[str, dict]:
    if name.startswith(("hf-hub:", "local-dir:")):
        raise BackboneError(
            f"{name!r}: schema model names are not supported; pass the architecture name (see "
            "`open_clip.list_models()`) and the weight file as pretrained=..."
        )
    name = name.replace("/", "-")  # "ViT-B/16" -> "ViT-B-16", as open_clip does
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise BackboneError(
            f"unknown model {name!r}: `open_clip.list_models()` lists the architecture names (zsad adds "
            f"{TINY_NAME!r}) and `open_clip.list_pretrained()` the (name, tag) pairs"
        )
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    other_towers = "timm_model_name" in vision or "hf_model_name" in text or "multimodal_cfg" in cfg
    if cfg.get("custom_text") or other_towers or isinstance(vision.get("layers"), (list, tuple)):
        raise BackboneError(
            f"{name!r} is not supported: zsad needs a ViT CLIP with open_clip's own text tower"
        )
    return name, cfg


def _build_model(cfg: dict, quick_gelu: bool, seed: int) -> open_clip.CLIP:
    with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG untouched
        torch.manual_seed(seed)
        return open_clip.CLIP(**{**cfg, "quick_gelu": quick_gelu})


def _resolve_weights(name: str, pretrained, cache_dir: str | None) -> tuple[Path | None, dict]:
    """(weight file or None for a random init, the open_clip tag config or {})."""
    if pretrained is None and name == TINY_NAME:
        if not WEIGHTS_FILE.is_file():
            raise BackboneError(
                f"the zsad-tiny weights are not built yet ({WEIGHTS_FILE} is missing): run "
                "`python -m zsad.tiny train` to train them, or pass pretrained='random' for an untrained one"
            )
        return WEIGHTS_FILE, {}
    if pretrained is None:
        warnings.warn(
            f"load_clip({name!r}) without pretrained weights gives a random init; pass a tag "
            f"(e.g. {default_weights_for(name)!r}), a weight file, or 'random' to silence this",
            UserWarning,
            stacklevel=3,
        )
        return None, {}
    if str(pretrained) == "random":
        return None, {}
    tag_cfg = open_clip.get_pretrained_cfg(name, str(pretrained))
    if tag_cfg:
        return _tag_checkpoint(name, str(pretrained), tag_cfg, cache_dir), tag_cfg
    path = Path(pretrained)
    if path.is_file():
        return path, {}
    if path.suffix not in WEIGHT_SUFFIXES and len(path.parts) == 1:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise BackboneError(
            f"pretrained={str(path)!r} is neither a known tag of {name!r} ({tags}) nor a file"
        )
    raise BackboneError(f"weights file not found: {path.resolve()}")


def _hf_offline() -> bool:
    import huggingface_hub.constants as hf_constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(getattr(hf_constants, "HF_HUB_OFFLINE", False))


def _tag_checkpoint(name: str, tag: str, cfg: dict, cache_dir: str | None) -> Path:
    """Local path of a tag's weight file: the cached copy if there is one (no network), else open_clip's
    download; offline or failing -> one BackboneError that says what to fetch and where to put it."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hub:
        repo, filename = os.path.split(hub)
        default = open_clip.constants.HF_WEIGHTS_NAME
        filename = filename or default
        # open_clip prefers a safetensors twin of .bin/.pth files; look for both in the cache.
        safe = open_clip.constants.HF_SAFE_WEIGHTS_NAME if filename == default else None
        safe = safe or (filename[:-4] + ".safetensors" if filename.endswith((".bin", ".pth")) else None)
        for candidate in filter(None, (safe, filename)):
            cached = try_to_load_from_cache(repo, candidate, cache_dir=cache_dir)
            if isinstance(cached, str) and os.path.isfile(cached):
                return Path(cached)
        where = (
            f"get {filename} from https://huggingface.co/{repo} (e.g. `huggingface-cli download {repo} "
            f"{filename}` on a machine with internet) and put it in the Hugging Face cache "
            f"({cache_dir or HF_HUB_CACHE}; copy the whole models--{repo.replace('/', '--')} folder)"
        )
    else:
        local = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if local.is_file():
            return local
        filename, where = local.name, f"download {url} to {local}"
    reason = "HF_HUB_OFFLINE is set"
    if not _hf_offline():
        try:
            return Path(open_clip.download_pretrained(cfg, cache_dir=cache_dir))
        except Exception as err:  # huggingface_hub / urllib raise many types; all mean "not available"
            reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    raise BackboneError(
        f"weights for model {name!r} with pretrained={tag!r} are not on this machine and cannot be "
        f"downloaded ({reason}). To fix: {where}; or pass the file itself: "
        f"load_clip({name!r}, pretrained='/path/to/{filename}')"
    )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in archive.namelist())


def _read_state_dict(path: Path) -> tuple[dict[str, Tensor], bool]:
    """(state dict, is an OpenAI-style JIT archive). Never unpickles arbitrary objects."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state, is_jit = load_file(str(path), device="cpu"), False
        elif _is_torchscript(path):
            with warnings.catch_warnings():  # torch.jit is deprecated upstream but is how OpenAI ships CLIP
                warnings.simplefilter("ignore", FutureWarning)
                state, is_jit = torch.jit.load(str(path), map_location="cpu").state_dict(), True
            for key in ("input_resolution", "context_length", "vocab_size"):  # JIT extras, not weights
                state.pop(key, None)
        else:
            state, is_jit = torch.load(path, map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:  # not a refused object, just not a readable checkpoint
            raise BackboneError(f"cannot read weights file {path}: not a PyTorch checkpoint") from err
        raise BackboneError(
            f"{path} holds Python objects ({found.group(1)}) that need full unpickling "
            "(torch.load(weights_only=False)), which can run arbitrary code, so zsad refuses it. If you trust"
            " the file, re-save its tensors once (e.g. safetensors.torch.save_file(<its state_dict>, "
            "'weights.safetensors')) and load that"
        ) from err
    except Exception as err:
        raise BackboneError(f"cannot read weights file {path}: {type(err).__name__}: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # training checkpoints nest the weights
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise BackboneError(f"{path} does not contain a state dict of tensors")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state), is_jit


def _load_weights(
    model: open_clip.CLIP,
    state: dict[str, Tensor],
    source: str,
    name: str,
    interpolation: str,
    antialias: bool,
) -> None:
    pos = state.get("visual.positional_embedding")
    if pos is not None and pos.shape[0] != model.visual.positional_embedding.shape[0]:
        resized = resize_positional_embedding(pos, tuple(model.visual.grid_size), interpolation, antialias)
        state = {**state, "visual.positional_embedding": resized}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        resized = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        counts = f"{len(missing)} of its {len(expected)} keys missing, {len(unexpected)} unexpected"
        if resized:
            counts += f", {len(resized)} of another shape"
        listing = ""
        if os.environ.get("ZSAD_DEBUG") == "1":
            listing = f" [missing: {missing}; unexpected: {unexpected}; other shape: {resized}]"
        raise BackboneError(
            f"{source} does not fit model {name!r} ({counts}); the file looks like {describe_state(state)}. "
            f"Pass the --backbone it was made for (ZSAD_DEBUG=1 lists the keys){listing}"
        ) from err


def describe_state(state: dict[str, Tensor]) -> str:
    """What a state dict looks like, for a weights file that does not fit: the open_clip ViT models whose
    vision and text towers have its widths, depths and patch size, or the family its key names suggest."""
    keys = list(state)
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "a Hugging Face transformers CLIP (convert it to open_clip's layout first)"
    conv, pos = state.get("visual.conv1.weight"), state.get("visual.positional_embedding")
    if conv is None or pos is None or "token_embedding.weight" not in state:
        shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        return f"no open_clip CLIP ViT ({len(keys)} keys: {shown})"
    vision_layers = len({k.split(".")[3] for k in keys if k.startswith("visual.transformer.resblocks.")})
    text_layers = len({k.split(".")[2] for k in keys if k.startswith("transformer.resblocks.")})
    found = {
        "vision": (int(conv.shape[0]), vision_layers, int(conv.shape[-1])),
        "text": (int(state["token_embedding.weight"].shape[1]), text_layers),
    }
    matches = []
    for model_name in open_clip.list_models():
        config = open_clip.get_model_config(model_name) or {}
        vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
        if (vision.get("width"), vision.get("layers"), vision.get("patch_size")) == found["vision"] and (
            text.get("width"),
            text.get("layers"),
        ) == found["text"]:
            matches.append(model_name)
    width, layers, patch = found["vision"]
    shape = f"a CLIP ViT with width {width}, {layers} vision layers, patch {patch}"
    if not matches:
        return shape
    shown = ", ".join(matches[:4]) + (", ..." if len(matches) > 4 else "")
    return f"{shape}: {shown}"


_SHA256_MEMO: dict[tuple[str, int, int], str] = {}  # hash each weight file once per process


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _SHA256_MEMO[key] = digest.hexdigest()
    return _SHA256_MEMO[key]
