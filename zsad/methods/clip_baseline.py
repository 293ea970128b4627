"""Plain CLIP prompt-ensemble baseline (the "CLIP" row of AnomalyCLIP Table 1; docs/methods.md §1.2).

Text: per class, ``[t_normal, t_abnormal]`` from a hand-crafted prompt bank (per-sentence normalisation,
mean, re-normalisation). Image score: ``softmax(scale * <g, T>)[abnormal]`` on the pooled, projected CLS
embedding g. Pixel map: the same softmax on every last-layer patch token after ``ln_post`` + ``proj``,
computed on the token grid and bilinearly upsampled to the input size. No training, no smoothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from zsad.backbone import CLIPBackbone
from zsad.methods.base import Detector, check_precision, upsample_grid
from zsad.prompts import text_features


class CLIPBaseline(Detector):
    """Zero-shot CLIP with a prompt ensemble; options: ``prompt_bank``, ``logit_scale``, ``precision``."""

    method_id = "clip"
    paper = "Radford et al. 2021 (CLIP), as the baseline of WinCLIP / AnomalyCLIP Table 1"
    default_backbone = "ViT-L-14-336"
    default_weights = "openai"
    default_image_size = 518

    def __init__(
        self,
        backbone: CLIPBackbone,
        prompt_bank: str = "winclip",
        logit_scale: float = 100.0,
        precision: str = "fp32",
        **options: Any,
    ) -> None:
        super().__init__(
            backbone,
            prompt_bank=prompt_bank,
            logit_scale=logit_scale,
            precision=check_precision(precision),
            **options,
        )
        self.prompt_bank = prompt_bank
        self.logit_scale = logit_scale
        self._text: dict[str, torch.Tensor] = {}

    def text(self, class_name: str) -> torch.Tensor:
        if class_name not in self._text:
            self._text[class_name] = text_features(self.backbone, class_name, self.prompt_bank)
        return self._text[class_name]

    def feature_key(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.name,
            "weights": self.backbone.weights_id,
            "size": self.image_size,
            "layers": [self.backbone.num_layers],
            "kind": "pooled+last-proj",
            "precision": self.options["precision"],
        }

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        last = self.backbone.num_layers
        feats = self.backbone.encode_image(images, layers=(last,), autocast=self.autocast)
        return {"pooled": feats.pooled, "patches": feats.tokens_proj[last][:, 1:]}

    @torch.no_grad()
    def predict_features(self, features: dict[str, torch.Tensor], class_names: list[str]):
        text = torch.stack([self.text(c) for c in class_names])  # (B, D, 2)
        pooled = F.normalize(features["pooled"].float(), dim=-1)
        patches = F.normalize(features["patches"].float(), dim=-1)
        scores = (self.logit_scale * torch.einsum("bd,bdk->bk", pooled, text)).softmax(-1)[:, 1]
        patch_probs = (self.logit_scale * torch.einsum("bnd,bdk->bnk", patches, text)).softmax(-1)[..., 1]
        return scores, upsample_grid(patch_probs, self.backbone.grid_size, self.image_size)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(images, class_names)
        return self.predict_features(self.extract_features(images), class_names)
