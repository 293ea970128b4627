"""AnomalyCLIP: Zhou, Pang et al., ICLR 2024, arXiv 2310.18961 (docs/methods.md §5).

The whole learned model is a **prompt learner** on a frozen CLIP (docs/methods.md §5.2):

1. Text, object-agnostic: two sentences "[V1..V12] object." and "[W1..W12] damaged object."; the 12
   placeholder word embeddings after SOT are replaced by learned vectors (``ctx_pos`` / ``ctx_neg``,
   n_ctx x width). Deep text tokens: before text blocks 2..depth (1-based, depth 9), sequence positions
   1..4 are **overwritten** by that block's learned (4, width) tensor, shared by both sentences (the
   "prefix overwrite" the authors confirmed, issue #75; docs/methods.md pitfall 12). No class name anywhere,
   so one text forward of two sentences per step. ``object_aware=True`` writes the class name instead of
   "object" (the paper's object-aware ablation, docs/methods.md §12.1); then the text runs once per class.
   Learned parameters: 2 x 12 x 768 + 8 x 4 x 768 = 43,008 for ViT-L (the official file also holds 8 unused
   ``Linear(768 -> 896)`` "compound_prompt_projections", 5,512,192 parameters; they are dropped here and
   ignored when an official checkpoint is read, docs/methods.md pitfall 18).
2. Image, DPAM (docs/methods.md §5.1): a second attention path from block 6 to 24 (1-based; the last 19
   blocks, ``DPAM_layer=20``), **residual kept**, no FFN, the block's own projections; its attention is v-v by
   default (``dpam="vv"``; "qq", "kk" and "qk" = plain attention are the ablation of docs/methods.md §12.1).
   Patch tokens: the path at the requested layers through ``ln_post`` + ``proj``. Image embedding g: the
   original-path CLS after the last block ``@ proj`` **without** ``ln_post`` (the official behaviour,
   issue #14; ``cls_ln_post=True`` is the clean variant, CLIP's pooled embedding).
3. Maps (docs/methods.md §5.3, pitfall 3): per layer, softmax over {normal, abnormal} of cos(token, T) / 0.07
   on the token grid, the **probabilities** upsampled bilinearly (``align_corners=False``), map_l =
   (P_a + 1 - P_n) / 2; summed over the layers; Gaussian sigma 4 per image (scipy defaults,
   docs/methods.md pitfall 6).
4. Image score: softmax(cos(g, T) / 0.07)[abnormal] alone.
5. Loss (docs/methods.md §5.4): CE(cos(g, T) / 0.07, label) + lambda x sum_layers [focal(P) + dice(P_a, gt) +
   dice(P_n, 1 - gt)], lambda = 4 (hard-coded in the official ``train.py`` whatever the layer count).
   ``loss="global"`` / ``"local"`` keep one term (the glocal ablation of docs/methods.md §12.1). Adam 1e-3,
   betas (0.5, 0.999), batch 8, 15 epochs, seed 111, no augmentation.

Layers: ``(24,)``, the published model (docs/methods.md §5.6). Any list is accepted and genuinely gives one
map per layer (every stored layer is a fresh tensor); ``(6, 12, 18, 24)`` is the paper's first description and
the official parser default, which with the fixed official code gives a different model from the released
one (docs/methods.md pitfall 2). On other depths the defaults scale: the last layer; the path starts at
L + 1 - round(19 L / 24) (block 2 for the 6-block zsad-tiny); text depth min(9, text blocks).

Official quirks, as named options (``from_official`` sets them; docs/methods.md §13): ``deep_prompt_fp16``
(the deep text tokens pass through fp16, ``x.half()`` before concatenation, docs/methods.md §13.2) and
``cls_ln_post=False``; the bilinear positional-embedding resize without antialias is a
:func:`zsad.backbone.load_clip` option. AnomalyCLIP runs the OpenAI weights with QuickGELU and does not round
them (docs/methods.md §13.1, §13.8).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from zsad.backbone import AttnPath, CLIPBackbone
from zsad.losses import cross_entropy, layer_losses
from zsad.methods.base import (
    ViTL14Trainable,
    check_choice,
    check_layers,
    check_precision,
    check_sigma,
    paper_schedule,
    upsample_grid,
)
from zsad.methods.clipad_sdp import smooth_map_tensor
from zsad.prompts import class_phrase

TEMPERATURE = 0.07
DPAM_MODES = ("vv", "qq", "kk", "qk")
LOSSES = ("glocal", "global", "local")
# Keys of the official prompt-learner state dict that are not learned here: the frozen word embeddings of
# the templates (rebuilt from the CLIP weights), the token ids, and the unused projections
# (docs/methods.md pitfall 18).
OFFICIAL_IGNORED = (
    "token_prefix_pos",
    "token_suffix_pos",
    "token_prefix_neg",
    "token_suffix_neg",
    "tokenized_prompts_pos",
    "tokenized_prompts_neg",
    "compound_prompt_projections.",
)


def default_dpam_start(num_layers: int) -> int:
    """First block of the DPAM path: L + 1 - round(19 L / 24), i.e. 6 for 24 blocks (``DPAM_layer=20``)."""
    return max(1, num_layers + 1 - round(19 * num_layers / 24))


class PromptLearner(nn.Module):
    """The learned word and deep text tokens (docs/methods.md §5.2); parameter names follow the official file.

    ctx_pos / ctx_neg: (n_ctx, W) word embeddings of the normal / abnormal sentence, N(0, 0.02) init.
    compound_prompts_text: one (t_n_ctx, W) tensor per text block 2..depth, N(0, 0.02) init.
    """

    def __init__(self, width: int, n_ctx: int, t_n_ctx: int, depth: int) -> None:
        super().__init__()
        self.ctx_pos = nn.Parameter(torch.empty(n_ctx, width).normal_(std=0.02))
        self.ctx_neg = nn.Parameter(torch.empty(n_ctx, width).normal_(std=0.02))
        self.compound_prompts_text = nn.ParameterList(
            nn.Parameter(torch.empty(t_n_ctx, width).normal_(std=0.02)) for _ in range(depth - 1)
        )

    def deep_prompts(self, fp16: bool) -> dict[int, torch.Tensor]:
        """Text block (1-based) -> tokens overwriting positions 1..t_n_ctx before it runs (blocks 2..depth);
        ``fp16``: rounded through half precision, as the official ``.half()`` (docs/methods.md §13.2)."""
        return {
            block: (p.half().float() if fp16 else p)
            for block, p in enumerate(self.compound_prompts_text, start=2)
        }


def official_to_learned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official ``AnomalyCLIP_PromptLearner.state_dict()`` -> :class:`PromptLearner`'s: ctx (1, 1, n, W)
    -> (n, W); template buffers, token ids and the unused projections dropped (:data:`OFFICIAL_IGNORED`)."""
    out = {}
    for key, value in state.items():
        if key.startswith(OFFICIAL_IGNORED):
            continue
        out[key] = value.reshape(value.shape[-2:]) if key in ("ctx_pos", "ctx_neg") else value
    return out


def state_probs(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """softmax over {normal, abnormal} of cos / 0.07: tokens (B, N, D), text (B, D, 2) unit columns ->
    (B, N, 2) (official ``compute_similarity``, docs/methods.md §5.3)."""
    cos = torch.einsum("bnd,bdk->bnk", F.normalize(tokens, dim=-1), text)
    return (cos / TEMPERATURE).softmax(dim=-1)


def upsample_probs(probs: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """Token probabilities (B, N, 2) -> (B, 2, S, S), bilinear with ``align_corners=False``
    (docs/methods.md pitfall 3)."""
    batch, n, states = probs.shape
    up = upsample_grid(probs.transpose(1, 2).reshape(batch * states, n), grid, size, align_corners=False)
    return up.view(batch, states, size, size)


class AnomalyCLIP(ViTL14Trainable):
    """AnomalyCLIP; see the module docstring for the method and its official quirks.

    Options:
        layers: 1-based blocks whose DPAM-path tokens make maps (default: the last block, 24 on ViT-L).
        dpam: "vv" (default), "qq", "kk" or "qk" (plain attention): the second path's similarity.
        dpam_start: first block of the second path (default :func:`default_dpam_start`).
        n_ctx, t_n_ctx, depth: learned words per sentence (12), deep tokens per block (4), deep prompts at
            text blocks 2..depth (9, capped at the text depth).
        object_aware: "[V..] {class}." / "[W..] damaged {class}." instead of "object" (ablation).
        replace_underscores: with ``object_aware``, "metal_nut" -> "metal nut".
        loss: "glocal" (default), "global" (CE only) or "local" (map terms only); lam: weight of the map
            terms (4).
        sigma: Gaussian smoothing of the maps in pixels (4; 0 disables).
        cls_ln_post: False (official) = CLS @ proj without ``ln_post``; True = CLIP's pooled embedding.
        deep_prompt_fp16: round the deep text tokens through fp16 (official quirk, default False).
        precision: "fp32" (default) or "bf16" (autocast of the frozen image tower).
    """

    method_id: ClassVar[str] = "anomalyclip"
    paper: ClassVar[str] = "Zhou, Pang et al., AnomalyCLIP, ICLR 2024, arXiv 2310.18961"
    train_settings: ClassVar[dict[str, Any]] = paper_schedule(
        epochs=15, batch_size=8, lr=1e-3, optimizer="adam", betas=(0.5, 0.999)
    )
    inference_options: ClassVar[tuple[str, ...]] = ("sigma", "precision")

    def __init__(
        self,
        backbone: CLIPBackbone,
        layers: Sequence[int] | None = None,
        dpam: str = "vv",
        dpam_start: int | None = None,
        n_ctx: int = 12,
        t_n_ctx: int = 4,
        depth: int = 9,
        object_aware: bool = False,
        replace_underscores: bool = False,
        loss: str = "glocal",
        lam: float = 4.0,
        sigma: float = 4.0,
        cls_ln_post: bool = False,
        deep_prompt_fp16: bool = False,
        precision: str = "fp32",
    ) -> None:
        n_layers = backbone.num_layers
        layers = check_layers(layers, n_layers, default=(n_layers,))
        dpam_start = default_dpam_start(n_layers) if dpam_start is None else int(dpam_start)
        depth = min(int(depth), backbone.num_text_layers)
        check_choice("dpam", dpam, DPAM_MODES)
        if not 1 <= dpam_start <= n_layers:
            raise ValueError(f"dpam_start must be a block in 1..{n_layers}; got {dpam_start}")
        check_choice("loss", loss, LOSSES)
        if n_ctx < t_n_ctx or t_n_ctx < 1 or depth < 1:
            raise ValueError(f"need n_ctx >= t_n_ctx >= 1 and depth >= 1; got {n_ctx}, {t_n_ctx}, {depth}")
        super().__init__(
            backbone,
            layers=list(layers),
            dpam=dpam,
            dpam_start=dpam_start,
            n_ctx=int(n_ctx),
            t_n_ctx=int(t_n_ctx),
            depth=depth,
            object_aware=bool(object_aware),
            replace_underscores=bool(replace_underscores),
            loss=loss,
            lam=float(lam),
            sigma=check_sigma(sigma),
            cls_ln_post=bool(cls_ln_post),
            deep_prompt_fp16=bool(deep_prompt_fp16),
            precision=check_precision(precision),
        )
        self.layers = layers
        self.attn_path = AttnPath(mode=dpam, variant="residual", start_block=dpam_start, replace_cls=False)
        # Initialised on the CPU's RNG, so every device starts from the same values.
        self.learned = PromptLearner(backbone.text_width, int(n_ctx), int(t_n_ctx), depth).to(backbone.device)

    # ------------------------------------------------------------------------------------------ text
    def template_ids(self, object_word: str = "object") -> torch.Tensor:
        """Token ids (2, L) of "X x n_ctx {object}." and "X x n_ctx damaged {object}." (the official
        templates)."""
        prefix = " ".join(["X"] * self.options["n_ctx"])
        ids = self.backbone.tokenize([f"{prefix} {object_word}.", f"{prefix} damaged {object_word}."])
        if bool((ids[:, -1] != 0).any()):  # the tokenizer truncated it
            raise ValueError(f"the prompt for {object_word!r} does not fit the text context length")
        return ids

    def prompt_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings (2, L, W) of the templates with positions 1..n_ctx replaced by the learned
        ctx_pos (row 0) and ctx_neg (row 1)."""
        with torch.no_grad():
            words = self.backbone.model.token_embedding(ids.to(self.backbone.device))
        n = self.options["n_ctx"]
        ctx = torch.stack([self.learned.ctx_pos, self.learned.ctx_neg]).to(words.dtype)
        return torch.cat([words[:, :1], ctx, words[:, 1 + n :]], dim=1)

    def encode_prompts(self, object_word: str = "object") -> torch.Tensor:
        """The two learned sentences through the text tower -> (D, 2) unit columns [t_normal, t_abnormal];
        differentiable in the prompt learner."""
        ids = self.template_ids(object_word)
        text = self.backbone.encode_text(
            ids,
            deep_prompts=self.learned.deep_prompts(self.options["deep_prompt_fp16"]),
            prompt_start=1,
            token_embeddings=self.prompt_embeddings(ids),
        )
        return F.normalize(text, dim=-1).T

    def text_batch(self, class_names: Sequence[str]) -> torch.Tensor:
        """(B, D, 2): one text forward for the object-agnostic prompts, one per distinct class otherwise."""
        if not self.options["object_aware"]:
            return self.encode_prompts().expand(len(class_names), -1, -1)
        phrase = {c: class_phrase(c, self.options["replace_underscores"]) for c in dict.fromkeys(class_names)}
        per_class = {c: self.encode_prompts(p) for c, p in phrase.items()}
        return torch.stack([per_class[c] for c in class_names])

    # ------------------------------------------------------------------------------------------ image
    def feature_key(self) -> dict[str, Any]:
        kind = f"anomalyclip-dpam-{self.options['dpam']}-from{self.options['dpam_start']}"
        return self.frozen_feature_key(kind, layers=list(self.layers))

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``path_l`` (B, 1+N, D): DPAM-path tokens of layer l after ``ln_post`` + ``proj`` (CLS at 0);
        ``cls_proj`` (B, D): last-block CLS @ proj without ``ln_post``; ``pooled`` (B, D): with it."""
        last = self.backbone.num_layers
        feats = self.backbone.encode_image(
            images,
            layers=sorted({*self.layers, last}),
            attn_path=self.attn_path,
            autocast=self.autocast,
        )
        out = {f"path_{layer}": feats.path_tokens_proj[layer] for layer in self.layers}
        out["cls_proj"] = (feats.tokens[last][:, 0] @ self.backbone.model.visual.proj).float()
        out["pooled"] = feats.pooled
        return out

    def global_embedding(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return features["pooled" if self.options["cls_ln_post"] else "cls_proj"].float()

    # ------------------------------------------------------------------------------------------ maps
    def global_logits(self, features: dict[str, torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        """cos(g, T) / 0.07 -> (B, 2)."""
        g = F.normalize(self.global_embedding(features), dim=-1)
        return torch.einsum("bd,bdk->bk", g, text) / TEMPERATURE

    def layer_probs(self, features: dict[str, torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the upsampled two-state probabilities (B, 2, S, S) of the patch tokens (CLS dropped)."""
        return [
            upsample_probs(
                state_probs(features[f"path_{layer}"][:, 1:].float(), text),
                self.backbone.grid_size,
                self.image_size,
            )
            for layer in self.layers
        ]

    def unsmoothed_map(self, features: dict[str, torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        """sum over layers of (P_a + 1 - P_n) / 2 -> (B, S, S)."""
        return sum((p[:, 1] + 1.0 - p[:, 0]) / 2.0 for p in self.layer_probs(features, text))

    @torch.no_grad()
    def predict_features(
        self, features: dict[str, torch.Tensor], class_names: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.text_batch(class_names)
        scores = self.global_logits(features, text).softmax(dim=-1)[:, 1]
        raw = self.unsmoothed_map(features, text)
        return scores, smooth_map_tensor(raw, self.options["sigma"])

    # ------------------------------------------------------------------------------------------ training
    def training_loss(
        self,
        features: dict[str, torch.Tensor],
        masks: torch.Tensor,
        labels: torch.Tensor,
        class_names: list[str],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """CE(cos(g, T) / 0.07, label) + lam x sum_layers segmentation_loss(P, gt, normal_dice=True)
        (docs/methods.md §5.4); ``loss`` keeps the global or the local term alone."""
        text = self.text_batch(class_names)
        parts: dict[str, float] = {}
        terms = []
        if self.options["loss"] != "local":
            image_loss = cross_entropy(self.global_logits(features, text), labels)
            parts["loss_global"] = image_loss.item()
            terms.append(image_loss)
        if self.options["loss"] != "global":
            probs = self.layer_probs(features, text)
            local, layer_parts = layer_losses(self.layers, probs, masks.float(), normal_dice=True)
            parts.update(layer_parts)
            terms.append(self.options["lam"] * local)
        return sum(terms), parts

    def load_learned(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Our state dict, or the official prompt-learner one (``epoch_15.pth``'s "prompt_learner";
        converted by :func:`official_to_learned`)."""
        super().load_learned(official_to_learned(state), source)
