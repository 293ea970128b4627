"""APRIL-GAN (VAND 2023 challenge): Chen, Han, Zhang, arXiv 2305.17382 (docs/methods.md §3).

Zero-shot track (trained on an auxiliary dataset, docs/methods.md §3.1-§3.4):

1. Frozen CLIP (paper: OpenAI ViT-L-14-336 at 518 px). The **raw residual-stream tokens** after blocks
   6, 12, 18, 24 (no ``ln_post``, no ``proj``, CLS dropped) each go through one learned
   ``Linear(width -> embed_dim)`` with bias: the whole learned model (4 x 0.79M parameters for ViT-L).
2. Text: per class, the 7 normal / 5 abnormal states x 35 templates ensemble (per-sentence normalisation,
   mean, re-normalisation; docs/methods.md §1.2), columns [t_normal, t_abnormal].
3. Per layer: logits = 100 <normalise(head(tokens)), T>, reshaped to the token grid, **upsampled as logits**
   to S x S (bilinear, ``align_corners=True``), **then** a softmax over the two states
   (docs/methods.md pitfall 3); the map is the **sum** over layers of the abnormal probability (range [0, 4]);
   no smoothing (docs/methods.md pitfall 6).
4. Image score: softmax(100 <g, T>)[abnormal] on the pooled CLS embedding g (``ln_post`` + ``proj``).
5. Training loss, per layer: focal(softmax map, gt) + dice(abnormal channel, gt); no image loss and no
   normal-channel dice. Adam lr 1e-3, betas (0.5, 0.999), batch 8, seed 111; 3 epochs with mosaic 0.2 when
   the auxiliary set is MVTec (preset "aux-mvtec"), 15 without mosaic when it is VisA (preset "aux-visa").

Few-shot track (``fit_few_shot``, docs/methods.md §3.3): the raw patch tokens of k normal images per class at
the same layers form a memory; a test token scores min over the memory of (1 - cos), each layer's map is
upsampled (``align_corners=True``) and the layers are summed; this memory map is **added** to the zero-shot
map. Image score, option ``image_score``:

- ``"bounded"`` (default, scores one image on its own): 0.5 x (text probability + max(map) / (3 L)), where
  3 L bounds the combined map of L layers (each zero-shot layer map <= 1, each memory map <= 2), so the map
  term lies in [0, 1] like the text term. This is our choice.
- ``"official-transductive"``: the official 0.5 x (text probability + per-class min-max of max(map) over
  the whole test set). It needs the test set, so ``predict`` returns the raw parts and
  :meth:`AprilGAN.finalize_scores` (the evaluator calls it) applies the min-max per class.
- ``"text"``: the text probability alone (the zero-shot score).

Layers on other depths: the quarter points ceil(L k / 4), k = 1..4 (6, 12, 18, 24 for 24 blocks; 3, 6, 9,
12 for 12; 2, 3, 5, 6 for the 6-block zsad-tiny).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from zsad.backbone import CLIPBackbone
from zsad.losses import layer_losses
from zsad.methods.base import (
    ViTL14Trainable,
    check_choice,
    check_layers,
    check_precision,
    paper_schedule,
    quarter_layers,
)
from zsad.methods.heads import LOGIT_SCALE, LinearHeads, token_logits, upsampled_probs
from zsad.methods.memory_bank import PatchMemory, upsample_sum
from zsad.prompts import class_phrase, text_features

if TYPE_CHECKING:
    import pandas as pd

IMAGE_SCORES = ("bounded", "official-transductive", "text")


class AprilGAN(ViTL14Trainable):
    """APRIL-GAN zero-shot heads plus the optional few-shot memory. See the module docstring.

    Options:
        layers: 1-based blocks whose raw tokens feed the heads (default :func:`quarter_layers`).
        image_score: "bounded" (default), "official-transductive" or "text" (few-shot only; zero-shot
            always uses the text probability).
        bank: prompt bank (default "aprilgan", 7/5 x 35); replace_underscores: "metal_nut" -> "metal nut".
        precision: "fp32" (default) or "bf16" (autocast of the frozen image tower).
    """

    method_id: ClassVar[str] = "aprilgan"
    paper: ClassVar[str] = "Chen, Han, Zhang, APRIL-GAN (VAND 2023 challenge), arXiv 2305.17382"
    few_shot: ClassVar[bool] = True
    train_settings: ClassVar[dict[str, Any]] = paper_schedule(
        epochs=15, batch_size=8, lr=1e-3, optimizer="adam", betas=(0.5, 0.999)
    )
    train_presets: ClassVar[dict[str, dict[str, Any]]] = {
        "aux-mvtec": {"epochs": 3, "mosaic": 0.2},  # the model for VisA and the other targets
        "aux-visa": {"epochs": 15, "mosaic": 0.0},  # the model for MVTec
    }
    inference_options: ClassVar[tuple[str, ...]] = ("image_score", "precision")

    def __init__(
        self,
        backbone: CLIPBackbone,
        layers: Sequence[int] | None = None,
        image_score: str = "bounded",
        bank: str = "aprilgan",
        replace_underscores: bool = False,
        precision: str = "fp32",
    ) -> None:
        layers = check_layers(layers, backbone.num_layers, default=quarter_layers(backbone.num_layers))
        check_choice("image_score", image_score, IMAGE_SCORES)
        super().__init__(
            backbone,
            layers=list(layers),
            image_score=image_score,
            bank=bank,
            replace_underscores=bool(replace_underscores),
            precision=check_precision(precision),
        )
        self.layers = layers
        # Initialised on the CPU's RNG, so every device starts from the same values.
        self.learned = LinearHeads(backbone.width, backbone.embed_dim, len(layers)).to(backbone.device)
        self.memory: PatchMemory | None = None
        self._text: dict[str, torch.Tensor] = {}
        self.last_score_parts: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------ text
    def text_features(self, class_name: str) -> torch.Tensor:
        """(D, 2) unit columns [t_normal, t_abnormal] of one class, computed once (docs/methods.md §3.2)."""
        if class_name not in self._text:
            phrase = class_phrase(class_name, self.options["replace_underscores"])
            self._text[class_name] = text_features(self.backbone, phrase, self.options["bank"])
        return self._text[class_name]

    def _text_batch(self, class_names: Sequence[str]) -> torch.Tensor:
        return torch.stack([self.text_features(c) for c in class_names])

    # ------------------------------------------------------------------------------------------ features
    def feature_key(self) -> dict[str, Any]:
        return self.frozen_feature_key("raw-tokens+pooled", layers=list(self.layers))

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone.encode_image(images, layers=self.layers, autocast=self.autocast)
        out = {"pooled": feats.pooled}
        out.update({f"tokens_{layer}": feats.tokens[layer] for layer in self.layers})
        return out

    # ------------------------------------------------------------------------------------------ maps
    def layer_logits(self, features: dict[str, torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the token logits (B, N, 2) of the learned heads (CLS dropped before the head)."""
        projected = self.learned([features[f"tokens_{layer}"][:, 1:].float() for layer in self.layers])
        return [token_logits(p, text) for p in projected]

    def layer_probs(self, features: dict[str, torch.Tensor], class_names: list[str]) -> list[torch.Tensor]:
        """Per layer, the upsampled two-state probabilities (B, 2, S, S)."""
        text = self._text_batch(class_names)
        return [
            upsampled_probs(logits, self.backbone.grid_size, self.image_size)
            for logits in self.layer_logits(features, text)
        ]

    def training_loss(
        self,
        features: dict[str, torch.Tensor],
        masks: torch.Tensor,
        labels: torch.Tensor,
        class_names: list[str],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum over layers of focal + dice(abnormal) (docs/methods.md §3.4)."""
        return layer_losses(self.layers, self.layer_probs(features, class_names), masks)

    # ------------------------------------------------------------------------------------------ few-shot
    @torch.no_grad()
    def fit_few_shot(self, images: torch.Tensor, class_names: list[str]) -> AprilGAN:
        """Store the raw patch tokens of these normal images as their classes' memory
        (docs/methods.md §3.3)."""
        self.check_input(images, class_names)
        feats = self.backbone.encode_image(images, layers=self.layers, autocast=self.autocast)
        if self.memory is None:
            self.memory = PatchMemory(self.layers, self.backbone.grid_size)
        self.memory.fit(feats, class_names)
        return self

    def memory_map(self, features: dict[str, torch.Tensor], class_names: list[str]) -> torch.Tensor:
        tokens = {layer: features[f"tokens_{layer}"][:, 1:] for layer in self.layers}
        distances = self.memory.bank.distances(class_names, tokens)
        return upsample_sum(distances, self.backbone.grid_size, self.image_size)

    # ------------------------------------------------------------------------------------------ predict
    @torch.no_grad()
    def predict_features(
        self, features: dict[str, torch.Tensor], class_names: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.memory is not None:
            self.memory.bank.check_fitted(class_names)
        text = self._text_batch(class_names)
        maps = sum(p[:, 1] for p in self.layer_probs(features, class_names))
        pooled = F.normalize(features["pooled"].float(), dim=-1)
        text_prob = (LOGIT_SCALE * torch.einsum("bd,bdk->bk", pooled, text)).softmax(dim=-1)[:, 1]
        if self.memory is None:
            self.last_score_parts = {}
            return text_prob, maps
        maps = maps + self.memory_map(features, class_names)
        map_max = maps.flatten(1).amax(dim=1)
        self.last_score_parts = {"text": text_prob, "map_max": map_max}
        mode = self.options["image_score"]
        if mode == "text":
            return text_prob, maps
        if mode == "bounded":
            return 0.5 * (text_prob + map_max / (3 * len(self.layers))), maps
        return 0.5 * text_prob, maps  # completed per class by finalize_scores

    def finalize_scores(self, scores: pd.DataFrame) -> pd.DataFrame:
        """``image_score="official-transductive"`` with few-shot: 0.5 x (text + per-class min-max of the map
        max over the test set); any other setting returns ``scores`` unchanged."""
        if self.memory is None or self.options["image_score"] != "official-transductive":
            return scores
        missing = {"cls_name", "text", "map_max"} - set(scores.columns)
        if missing:
            raise ValueError(f"{self.method_id}: finalize_scores needs the columns {sorted(missing)}")
        out = scores.copy()
        out["score"] = out["score"].astype(np.float64)
        for _, index in out.groupby("cls_name").groups.items():
            m = out.loc[index, "map_max"].to_numpy(dtype=np.float64)
            span = m.max() - m.min()
            norm = (m - m.min()) / span if span > 0 else np.zeros_like(m)
            out.loc[index, "score"] = 0.5 * (out.loc[index, "text"].to_numpy() + norm)
        return out
