"""CLIP-AD SDP+: the training-free SDP map plus learned linear heads (Chen et al., arXiv 2311.00453;
docs/methods.md §4.5).

SDP+ keeps everything of :class:`zsad.methods.clipad_sdp.ClipADSDP` (staged v-v path, RVS text vectors,
feature surgery, image score) and adds one ``Linear(width -> embed_dim)`` per stage end (896 -> 640 for
ViT-B-16-plus-240, layers 3/6/9/12) on the **original-path** raw tokens of those layers (CLS dropped). The
heads' maps are made like APRIL-GAN's: 100 <normalise(head(tokens)), T> with the same RVS text vectors T,
logits upsampled bilinearly with ``align_corners=True``, softmax, abnormal channel, summed over layers.

    map = gaussian_sigma( SDP surgery map + sum_l softmax(up(logits_l))[abnormal] )

Smoothing sigma 8 (the VisA-target run of the paper uses 2: ``sigma=2``). Training (docs/methods.md §4.5): per
layer focal + dice(abnormal); Adam lr 1e-4 with default betas, batch 8, 5 epochs, seed 42. The official loader
does not shuffle: ``shuffle=False`` (preset "official") reproduces it; the default here shuffles.

Aliasing (docs/methods.md §4.6): the official dual-path block adds the next block's attention output *in
place* to the stored original tokens of layers 3, 6 and 9, and SDP+ was trained and evaluated on those tokens.
``legacy_aliasing=True`` reproduces it (``from_official`` sets it); the default reads clean tokens.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from zsad.backbone import CLIPBackbone, ImageFeatures
from zsad.losses import layer_losses
from zsad.methods.base import TrainableDetector
from zsad.methods.clipad_sdp import ClipADSDP
from zsad.methods.heads import LinearHeads, token_logits, upsampled_probs


class ClipADSDPPlus(ClipADSDP, TrainableDetector):
    """CLIP-AD SDP+; options are those of :class:`ClipADSDP` (``legacy_aliasing`` also changes the tokens
    the heads read). See the module docstring."""

    method_id: ClassVar[str] = "clipad-sdp-plus"
    train_settings: ClassVar[dict[str, Any]] = {
        "epochs": 5,
        "batch_size": 8,
        "lr": 1e-4,
        "optimizer": "adam",
        "betas": (0.9, 0.999),
        "mosaic": 0.0,
        "shuffle": True,
        "seed": 42,
    }
    train_presets: ClassVar[dict[str, dict[str, Any]]] = {"official": {"shuffle": False}}
    inference_options: ClassVar[tuple[str, ...]] = ("sigma", "image_score", "precision")

    def __init__(self, backbone: CLIPBackbone, **options: Any) -> None:
        super().__init__(backbone, **options)
        # Initialised on the CPU's RNG, so every device starts from the same values.
        self.learned = LinearHeads(backbone.width, backbone.embed_dim, len(self.layers)).to(backbone.device)

    def feature_key(self) -> dict[str, Any]:
        return {**super().feature_key(), "kind": "clipad-staged-vv+ori"}

    def select_features(self, feats: ImageFeatures) -> dict[str, torch.Tensor]:
        """The SDP features plus ``tokens_l`` (B, 1+N, W): the original path's raw tokens of each layer."""
        out = super().select_features(feats)
        out.update({f"tokens_{layer}": feats.tokens[layer] for layer in self.layers})
        return out

    def layer_probs(self, features: dict[str, torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the heads' upsampled two-state probabilities (B, 2, S, S)."""
        projected = self.learned([features[f"tokens_{layer}"][:, 1:].float() for layer in self.layers])
        return [
            upsampled_probs(token_logits(p, text), self.backbone.grid_size, self.image_size)
            for p in projected
        ]

    def unsmoothed_map(self, features: dict[str, torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        return self.surgery_map(features, text) + sum(p[:, 1] for p in self.layer_probs(features, text))

    def training_loss(
        self,
        features: dict[str, torch.Tensor],
        masks: torch.Tensor,
        labels: torch.Tensor,
        class_names: list[str],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum over layers of focal + dice(abnormal) on the heads' maps (docs/methods.md §4.5)."""
        with torch.no_grad():
            text = torch.stack([self.text_features(name) for name in class_names]).float()
        return layer_losses(self.layers, self.layer_probs(features, text), masks)
