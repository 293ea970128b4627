"""MFP-CLIP: Yuan, Jie, Zhang, Li, Gao, *Exploring the Efficacy of Multi-Form Prompts for Zero-Shot
Industrial Anomaly Detection*, arXiv 2503.12910 (2025) (docs/methods.md §7; the source write-up's sections
3.2-3.6 and 4.1).

**No public code exists.** Everything below the paper's stated design is our choice and is marked "ours".

Stated by the paper (write-up sections 3-4; docs/methods.md §7):

1. Frozen OpenAI ViT-L-14-336 at 518 px; patch embeddings after blocks 6, 12, 18, 24 (four stages).
2. **SP (self prompt, 3.4):** a CNN's local features of the same image, K = 5 linear adapters -> a 5 x D
   visual prompt concatenated with the patch embeddings of **stage 1** and passed through self-attention.
3. **Linear projection** of the patch features to the joint space (one per tapped layer), then
4. **MPFA (multi-patch feature aggregation, 3.5):** average pooling over the N x N neighbourhood of every
   patch embedding; N = 3 in the ablation text (the implementation paragraph says 5): ``mpfa_n``, default 3.
5. **I2TP (image-to-text prompt, 3.3):** visual (CNN) features turned into text-prompt content.
6. Coarse map: cosine similarity of the aggregated patch embeddings with the (I2TP-enriched) text.
7. **MP (mask prompt, 3.6):** the coarse map fed back as a mask-form visual prompt that refines the map.
8. Loss: focal + dice on the map M, BCE on the image score S. Adam, lr 1e-3, lr x 1/(epoch + 1) per epoch,
   batch 1, 100 epochs (``train_settings``; the decay is the trainer's ``lr_decay="inverse-epoch"``).

Our choices where the write-up is silent (each switchable or an option, all recorded in the checkpoint):

- **CNN (ours):** torchvision ResNet-18, frozen (:mod:`zsad.methods.local_cnn`); its 5 feature levels
  (stem, layer1..4), each global-average-pooled and layer-normalised (no affine: a scale-free input, needed
  for a random CNN), feed the K = 5 adapters, one level per adapter ``Linear(C_k -> width)``. Weights:
  ImageNet ``"IMAGENET1K_V1"`` for real CLIP weights, a seeded random CNN for zsad-tiny / random CLIPs
  (option ``cnn_weights``: tag, file or "random").
- **SP wiring (ours):** the 5 prompt tokens are appended to the sequence before the first block of each
  stage in ``sp_stages`` (default ``(1,)``: block 1) and stay in the sequence to the last block, so every
  later block attends to them; a later stage in ``sp_stages`` replaces them with its own adapters' tokens
  (the backbone's ``visual_prompts`` hook, AdaCLIP semantics). The prompt tokens never reach an output.
- **Heads (ours, APRIL-GAN-like):** raw residual tokens of each tapped layer (CLS dropped) ->
  ``Linear(width -> embed_dim)``; logits 100 x cos(token, t), upsampled (bilinear, ``align_corners=True``),
  then softmax over {normal, abnormal} (heads.py, docs/methods.md pitfall 3). The final map is the **mean**
  over layers of the abnormal probability; no Gaussian smoothing.
- **MPFA (ours in detail):** ``avg_pool2d`` with an N x N window, stride 1, zero padding of N // 2 not
  counted (``count_include_pad=False``), so border patches average their existing neighbours and the grid
  keeps its size; N must be odd. N = 1 is the identity, i.e. the same model as ``mpfa=False``.
- **I2TP (ours):** CoCoOp-style conditional tokens. The 5 pooled CNN levels (layer-normalised,
  concatenated) -> one ``Linear`` -> ``i2tp_tokens`` (4) text-width vectors that replace the placeholders of
  "X X X X flawless {class}." and "X X X X damaged {class}." (positions 1..4 after SOT), one pair per image,
  through the frozen text tower. Each state's text vector is normalise(t_template + normalise(t_i2tp)),
  t_template being the hand-written ensemble (APRIL-GAN's 7/5 states x 35 templates, docs/methods.md §1.2)
  that is *all* the text when I2TP is off ("without I2TP the text embeddings come from the templates only",
  write-up 4.3).
- **MP (ours):** a SAM-style dense mask prompt. The coarse map (mean over layers of the abnormal probability
  on the token grid) -> per layer ``Conv2d(1 -> embed_dim, 3 x 3)`` (zero-initialised, so MP starts as the
  identity) -> added to that layer's aggregated patch embeddings; the similarity with the text is taken
  again and gives the refined map. The coarse maps get the same focal + dice loss as the refined ones (deep
  supervision, so that the prompt is a segmentation; ``mp_coarse_loss``).
- **Image score (ours):** S = softmax(100 x cos(g, T))[abnormal], g = CLIP's pooled embedding of the
  (SP-prompted) forward; BCE(S, label). Loss = sum_layers [focal + dice](refined) + [coarse terms] + BCE.
- Layers on other depths: the quarter points ceil(L k / 4) (2, 3, 5, 6 on the 6-block zsad-tiny); stage s
  starts after the (s-1)-th quarter point.

Caching (design.md "Speed"): with SP on, the prompt enters block 1, so every ViT block sees it and the ViT
must run (forward and backward, frozen weights) at every step; the trainer then caches only the CNN levels
and the preprocessed image. With SP off the ViT features are exact to cache (tapped tokens + pooled), as in
APRIL-GAN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from zsad.backbone import CLIPBackbone
from zsad.losses import binary_cross_entropy, layer_losses
from zsad.methods.base import ViTL14Trainable, check_layers, check_precision, paper_schedule, quarter_layers
from zsad.methods.heads import LOGIT_SCALE, LinearHeads, token_logits, upsampled_probs
from zsad.methods.local_cnn import LEVELS, LocalCNN, load_local_cnn
from zsad.prompts import class_phrase, text_features

STATE_WORDS = ("flawless", "damaged")  # ours: the I2TP sentences' state words (normal, abnormal)
# The template ensemble is a pure function of the frozen text tower: shared by every detector on the same
# weights (the ablation builds many), keyed by (model name, weights id, phrase, bank).
_TEMPLATE_MEMO: dict[tuple[str, str, str, str], torch.Tensor] = {}


def mpfa(tokens: torch.Tensor, grid: tuple[int, int], n: int) -> torch.Tensor:
    """Multi-patch feature aggregation (write-up 3.5): every patch embedding replaced by the mean over its
    N x N neighbourhood on the token grid (stride 1; out-of-grid neighbours not counted). (B, h*w, D) -> same.
    """
    if n < 1 or n % 2 == 0:
        raise ValueError(f"MPFA window N must be a positive odd integer; got {n}")
    if n == 1:
        return tokens
    batch, count, dim = tokens.shape
    grid_map = tokens.transpose(1, 2).reshape(batch, dim, *grid)
    pooled = F.avg_pool2d(grid_map, n, stride=1, padding=n // 2, count_include_pad=False)
    return pooled.reshape(batch, dim, count).transpose(1, 2)


def stage_starts(num_layers: int) -> tuple[int, ...]:
    """First block (1-based) of each of the four stages: 1, then one after each quarter point (1, 7, 13, 19
    for 24 blocks)."""
    ends = quarter_layers(num_layers)
    return tuple(dict.fromkeys([1, *(e + 1 for e in ends[:-1] if e < num_layers)]))


class MFPLearned(nn.Module):
    """Every learned parameter of MFP-CLIP; absent modules are switched off.

    heads: one ``Linear(width -> embed_dim)`` per tapped layer (the linear projection).
    sp: per SP stage, K = 5 adapters ``Linear(C_k -> width)``, one per CNN level (the visual prompt).
    i2tp: ``Linear(sum C_k -> n_tokens x text_width)`` (the image-to-text prompt).
    mp: per tapped layer, ``Conv2d(1 -> embed_dim, 3)``, zero-initialised (the mask prompt).
    """

    def __init__(
        self,
        width: int,
        embed_dim: int,
        text_width: int,
        n_layers: int,
        cnn_channels: Sequence[int],
        sp_stages: int,
        i2tp_tokens: int,
        mp: bool,
    ) -> None:
        super().__init__()
        self.heads = LinearHeads(width, embed_dim, n_layers)
        self.sp = nn.ModuleList(
            nn.ModuleList(nn.Linear(c, width) for c in cnn_channels) for _ in range(sp_stages)
        )
        self.i2tp = nn.Linear(sum(cnn_channels), i2tp_tokens * text_width) if i2tp_tokens else None
        self.i2tp_shape = (i2tp_tokens, text_width)
        self.mp = None
        if mp:
            self.mp = nn.ModuleList(nn.Conv2d(1, embed_dim, 3, padding=1) for _ in range(n_layers))
            for conv in self.mp:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    def visual_prompts(
        self, levels: Sequence[torch.Tensor], starts: Sequence[int]
    ) -> dict[int, torch.Tensor]:
        """Block -> (B, K, width) prompt tokens of each SP stage (write-up eq. of 3.4: P_u = [A_k(f_k)])."""
        return {
            block: torch.stack([a(f) for a, f in zip(adapters, levels, strict=True)], dim=1)
            for block, adapters in zip(starts, self.sp, strict=True)
        }

    def text_tokens(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, n_tokens, text_width) image-conditioned word embeddings (I2TP)."""
        return self.i2tp(torch.cat(list(levels), dim=-1)).view(-1, *self.i2tp_shape)


class MFPCLIP(ViTL14Trainable):
    """MFP-CLIP on a frozen CLIP; see the module docstring for what is the paper's and what is ours.

    Options:
        layers: 1-based blocks whose tokens make maps (default the quarter points: 6, 12, 18, 24).
        i2tp, sp, mpfa, mp: switch each module (all on by default; the ablation turns one off).
        mpfa_n: MPFA window N (odd; default 3, the ablation text's value; the paper's implementation
            paragraph says 5).
        sp_stages: stages (1..4) whose first block receives the SP prompt (default (1,), the paper's).
        i2tp_tokens: image-conditioned word tokens (ours: 4).
        mp_coarse_loss: also supervise the coarse maps when MP is on (ours: True).
        cnn, cnn_weights, cnn_seed: the SP / I2TP CNN (ours: "resnet18"; weights None = "IMAGENET1K_V1" on
            real CLIP weights, "random" on zsad-tiny and random CLIPs; seed of a random CNN).
        bank, replace_underscores: the hand-written prompt ensemble (APRIL-GAN's, docs/methods.md §1.2).
        precision: "fp32" (default) or "bf16" (autocast of the image tower).
    """

    method_id: ClassVar[str] = "mfpclip"
    paper: ClassVar[str] = "Yuan, Jie, Zhang, Li, Gao, MFP-CLIP, arXiv 2503.12910"
    # The paper gives no seed: the siblings' 111 of paper_schedule (ours).
    train_settings: ClassVar[dict[str, Any]] = paper_schedule(
        epochs=100,
        batch_size=1,
        lr=1e-3,
        optimizer="adam",
        betas=(0.9, 0.999),  # "Adam" with no betas given: PyTorch's defaults (ours)
        lr_decay="inverse-epoch",
    )
    inference_options: ClassVar[tuple[str, ...]] = ("precision",)

    def __init__(
        self,
        backbone: CLIPBackbone,
        layers: Sequence[int] | None = None,
        i2tp: bool = True,
        sp: bool = True,
        mpfa: bool = True,
        mp: bool = True,
        mpfa_n: int = 3,
        sp_stages: Sequence[int] = (1,),
        i2tp_tokens: int = 4,
        mp_coarse_loss: bool = True,
        cnn: str = "resnet18",
        cnn_weights: str | None = None,
        cnn_seed: int = 0,
        bank: str = "aprilgan",
        replace_underscores: bool = False,
        precision: str = "fp32",
    ) -> None:
        n_layers = backbone.num_layers
        layers = check_layers(layers, n_layers, default=quarter_layers(n_layers))
        if isinstance(mpfa_n, bool) or not isinstance(mpfa_n, int) or mpfa_n < 1 or mpfa_n % 2 == 0:
            raise ValueError(f"mpfa_n (MPFA window N) must be a positive odd integer; got {mpfa_n!r}")
        starts = stage_starts(n_layers)
        sp_stages = tuple(int(s) for s in sp_stages)
        if sp and (not sp_stages or any(not 1 <= s <= len(starts) for s in sp_stages)):
            raise ValueError(f"sp_stages must be stages in 1..{len(starts)}; got {list(sp_stages)}")
        if i2tp and not 1 <= int(i2tp_tokens) <= 8:
            raise ValueError(f"i2tp_tokens must be in 1..8; got {i2tp_tokens}")
        if cnn_weights is None:
            real = backbone.pretrained is not None and not backbone.weights_id.startswith("random-")
            cnn_weights = "IMAGENET1K_V1" if real and backbone.name != "zsad-tiny" else "random"
        super().__init__(
            backbone,
            layers=list(layers),
            i2tp=bool(i2tp),
            sp=bool(sp),
            mpfa=bool(mpfa),
            mp=bool(mp),
            mpfa_n=int(mpfa_n),
            sp_stages=sorted(set(sp_stages)),
            i2tp_tokens=int(i2tp_tokens),
            mp_coarse_loss=bool(mp_coarse_loss),
            cnn=str(cnn),
            cnn_weights=str(cnn_weights),
            cnn_seed=int(cnn_seed),
            bank=bank,
            replace_underscores=bool(replace_underscores),
            precision=check_precision(precision),
        )
        self.layers = layers
        self.sp_blocks = tuple(starts[s - 1] for s in self.options["sp_stages"]) if sp else ()
        self.cnn: LocalCNN | None = None
        channels: list[int] = []
        if sp or i2tp:
            self.cnn = load_local_cnn(cnn, cnn_weights, int(cnn_seed)).to(backbone.device)
            channels = self.cnn.channels
        self.learned = MFPLearned(
            backbone.width,
            backbone.embed_dim,
            backbone.text_width,
            len(layers),
            channels,
            len(self.sp_blocks),
            int(i2tp_tokens) if i2tp else 0,
            bool(mp),
        ).to(backbone.device)  # initialised on the CPU's RNG, so every device starts from the same values
        self._text: dict[str, torch.Tensor] = {}
        self._ids: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------ text
    def template_text(self, class_name: str) -> torch.Tensor:
        """(D, 2) hand-written ensemble [t_normal, t_abnormal] of one class, computed once."""
        if class_name not in self._text:
            phrase = class_phrase(class_name, self.options["replace_underscores"])
            bank = self.options["bank"]
            key = (self.backbone.name, self.backbone.weights_id, phrase, str(bank))
            if key not in _TEMPLATE_MEMO or not isinstance(bank, str):
                _TEMPLATE_MEMO[key] = text_features(self.backbone, phrase, bank)
            self._text[class_name] = _TEMPLATE_MEMO[key]
        return self._text[class_name]

    def i2tp_ids(self, class_name: str) -> torch.Tensor:
        """Token ids (2, L) of "X x n flawless {class}." and "X x n damaged {class}." (ours)."""
        if class_name not in self._ids:
            phrase = class_phrase(class_name, self.options["replace_underscores"])
            prefix = " ".join(["X"] * self.options["i2tp_tokens"])
            ids = self.backbone.tokenize([f"{prefix} {w} {phrase}." for w in STATE_WORDS])
            if bool((ids[:, -1] != 0).any()):
                raise ValueError(f"the I2TP prompt for {class_name!r} does not fit the text context length")
            self._ids[class_name] = ids
        return self._ids[class_name]

    def text_batch(self, features: dict[str, torch.Tensor], class_names: Sequence[str]) -> torch.Tensor:
        """(B, D, 2) unit columns per image: the template ensemble, enriched by I2TP when it is on."""
        template = torch.stack([self.template_text(c) for c in class_names]).to(self.backbone.device)
        if not self.options["i2tp"]:
            return template
        tokens = self.learned.text_tokens(self.cnn_levels(features))  # (B, n, Wt)
        ids = torch.cat([self.i2tp_ids(c) for c in class_names]).to(self.backbone.device)  # (2B, L)
        with torch.no_grad():
            words = self.backbone.model.token_embedding(ids)
        n = self.options["i2tp_tokens"]
        ctx = tokens.repeat_interleave(2, dim=0).to(words.dtype)  # both sentences of an image share them
        embeddings = torch.cat([words[:, :1], ctx, words[:, 1 + n :]], dim=1)
        conditioned = F.normalize(self.backbone.encode_text(ids, token_embeddings=embeddings), dim=-1)
        conditioned = conditioned.view(len(class_names), 2, -1).transpose(1, 2)  # (B, D, 2)
        return F.normalize(template + conditioned, dim=1)

    # ------------------------------------------------------------------------------------------ features
    def feature_key(self) -> dict[str, Any]:
        cnn = None if self.cnn is None else f"{self.cnn.name}:{self.cnn.weights_id}"
        # SP on: the ViT must run with the prompt at every step, so only the image and the CNN are cached.
        kind = "mfpclip-image+cnn" if self.options["sp"] else "mfpclip-raw-tokens+pooled"
        return self.frozen_feature_key(kind, layers=list(self.layers), cnn=cnn)

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen per-image features: ``cnn_k`` (B, C_k) pooled CNN levels when SP or I2TP is on; with SP the
        preprocessed ``image`` (the prompted ViT runs later), without it ``tokens_l`` and ``pooled``."""
        out: dict[str, torch.Tensor] = {}
        if self.cnn is not None:
            levels = self.cnn(images.to(self.backbone.device))
            out.update({f"cnn_{k}": v for k, v in enumerate(levels)})
        if self.options["sp"]:
            out["image"] = images.float()
        else:
            feats = self.backbone.encode_image(images, layers=self.layers, autocast=self.autocast)
            out["pooled"] = feats.pooled
            out.update({f"tokens_{layer}": feats.tokens[layer] for layer in self.layers})
        return out

    def cnn_levels(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The pooled CNN levels, layer-normalised without affine (ours: scale-free adapter input)."""
        levels = [features[f"cnn_{k}"].float().to(self.backbone.device) for k in range(LEVELS)]
        return [F.layer_norm(v, v.shape[-1:]) for v in levels]

    def vit_features(self, features: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(per-layer patch tokens (B, N, width) without CLS, pooled (B, D)); with SP the ViT runs here with
        the prompt tokens (differentiable in the adapters)."""
        if not self.options["sp"]:
            tokens = [features[f"tokens_{layer}"][:, 1:].float() for layer in self.layers]
            return tokens, features["pooled"].float()
        prompts = self.learned.visual_prompts(self.cnn_levels(features), self.sp_blocks)
        feats = self.backbone.encode_image(
            features["image"], layers=self.layers, autocast=self.autocast, visual_prompts=prompts
        )
        return [feats.tokens[layer][:, 1:] for layer in self.layers], feats.pooled

    # ------------------------------------------------------------------------------------------ maps
    def forward_maps(self, features: dict[str, torch.Tensor], class_names: Sequence[str]) -> dict[str, Any]:
        """The whole differentiable pipeline -> {"score": (B,), "refined": [(B, 2, S, S)] per layer,
        "coarse": [(B, 2, S, S)] per layer (only with MP), "coarse_grid": (B, h, w)}."""
        text = self.text_batch(features, class_names)
        tokens, pooled = self.vit_features(features)
        grid, size = self.backbone.grid_size, self.image_size
        n = self.options["mpfa_n"] if self.options["mpfa"] else 1
        embedded = [mpfa(p, grid, n) for p in self.learned.heads(tokens)]  # projection, then MPFA
        coarse_logits = [token_logits(e, text) for e in embedded]
        out: dict[str, Any] = {}
        if self.learned.mp is not None:
            # Coarse segmentation on the token grid: mean over layers of the abnormal probability.
            coarse = torch.stack([c.softmax(dim=-1)[..., 1] for c in coarse_logits]).mean(dim=0)
            coarse_grid = coarse.view(-1, 1, *grid)
            refined_logits = []
            for conv, e in zip(self.learned.mp, embedded, strict=True):
                prompt = conv(coarse_grid).flatten(2).transpose(1, 2)  # (B, N, D) dense mask prompt
                refined_logits.append(token_logits(e + prompt, text))
            out["coarse"] = [upsampled_probs(c, grid, size) for c in coarse_logits]
            out["coarse_grid"] = coarse_grid[:, 0]
        else:
            refined_logits = coarse_logits
        out["refined"] = [upsampled_probs(r, grid, size) for r in refined_logits]
        g = F.normalize(pooled.float(), dim=-1)
        out["score"] = (LOGIT_SCALE * torch.einsum("bd,bdk->bk", g, text)).softmax(dim=-1)[:, 1]
        return out

    @torch.no_grad()
    def predict_features(
        self, features: dict[str, torch.Tensor], class_names: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.forward_maps(features, class_names)
        maps = torch.stack([p[:, 1] for p in out["refined"]]).mean(dim=0)
        return out["score"], maps

    def training_loss(
        self,
        features: dict[str, torch.Tensor],
        masks: torch.Tensor,
        labels: torch.Tensor,
        class_names: list[str],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """sum_layers [focal + dice](refined map) (+ the same on the coarse maps with MP and
        ``mp_coarse_loss``) + BCE(S, label) (write-up 3.6)."""
        out = self.forward_maps(features, class_names)
        masks = masks.float().to(self.backbone.device)
        loss, parts = layer_losses(self.layers, out["refined"], masks)
        if "coarse" in out and self.options["mp_coarse_loss"]:
            coarse, coarse_parts = layer_losses(self.layers, out["coarse"], masks)
            loss = loss + coarse
            parts.update({f"coarse_{k}": v for k, v in coarse_parts.items()})
        image_loss = binary_cross_entropy(out["score"], labels.to(out["score"].device))
        parts["loss_bce"] = image_loss.item()
        return loss + image_loss, parts
