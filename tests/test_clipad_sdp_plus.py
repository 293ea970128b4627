"""CLIP-AD SDP+ (docs/methods.md §4.5, §4.6) against a reference written from the definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from references import bilinear_matrix_aligned, dice_loss_np, focal_loss_np
from safetensors.torch import save_file
from scipy.ndimage import gaussian_filter

from zsad import methods
from zsad.methods.clipad_sdp import ClipADSDP
from zsad.methods.clipad_sdp_plus import ClipADSDPPlus

TOL = 1e-4


@pytest.fixture(scope="module")
def detector(tiny_random):
    torch.manual_seed(4)
    det = ClipADSDPPlus(tiny_random, rvs="mean")
    with torch.no_grad():
        for p in det.learned.parameters():
            p.normal_(0, 0.3)
    return det


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(9))


def heads_reference(det, feats, names, per_layer=False):
    """Sum over layers of softmax(bilinear_aligned(100 <unit(head(ori tokens)), T>))[abnormal]; with
    ``per_layer`` the list of each layer's (normal, abnormal) probabilities (B, 2, S, S) instead."""
    text = np.stack([det.text_features(c).numpy() for c in names]).astype(np.float64)
    h, w = det.backbone.grid_size
    up_h, up_w = bilinear_matrix_aligned(h, 128), bilinear_matrix_aligned(w, 128)
    total, layers = np.zeros((len(names), 128, 128)), []
    for i, layer in enumerate(det.layers):
        tokens = feats[f"tokens_{layer}"][:, 1:].numpy().astype(np.float64)
        fc = det.learned.fc[i]
        proj = tokens @ fc.weight.detach().numpy().T + fc.bias.detach().numpy()
        proj /= np.linalg.norm(proj, axis=-1, keepdims=True)
        logits = 100.0 * np.einsum("bnd,bdk->bnk", proj, text).transpose(0, 2, 1).reshape(-1, 2, h, w)
        up = np.einsum("ih,bkhw,jw->bkij", up_h, logits, up_w)
        e = np.exp(up - up.max(axis=1, keepdims=True))
        layers.append(e / e.sum(axis=1, keepdims=True))
        total += layers[-1][:, 1]
    return layers if per_layer else total


def test_map_is_smoothed_sdp_map_plus_heads(detector, images):
    names = ["nut", "carpet"]
    feats = detector.extract_features(images)
    sdp = ClipADSDP(detector.backbone, rvs="mean", sigma=0)
    _, sdp_map = sdp.predict(images, names)
    expected = sdp_map.numpy().astype(np.float64) + heads_reference(detector, feats, names)
    expected = np.stack([gaussian_filter(m, sigma=8) for m in expected])
    scores, maps = detector.predict(images, names)
    assert np.abs(maps.numpy() - expected).max() < TOL
    # the image score is SDP's: the heads only change the map
    assert torch.allclose(scores, ClipADSDP(detector.backbone, rvs="mean").predict(images, names)[0])


def test_heads_read_original_path_tokens_and_aliasing_is_an_option(tiny_random, images):
    clean = ClipADSDPPlus(tiny_random, rvs="mean").extract_features(images)
    legacy = ClipADSDPPlus(tiny_random, rvs="mean", legacy_aliasing=True).extract_features(images)
    plain = tiny_random.encode_image(images, layers=clean_layers(tiny_random))
    for layer in clean_layers(tiny_random):
        assert torch.equal(clean[f"tokens_{layer}"], plain.tokens[layer])
    first, last = clean_layers(tiny_random)[0], clean_layers(tiny_random)[-1]
    # official in-place aliasing: a stored non-final layer also holds the next block's attention output
    assert (legacy[f"tokens_{first}"] - clean[f"tokens_{first}"]).abs().max() > 1e-3
    assert torch.equal(legacy[f"tokens_{last}"], clean[f"tokens_{last}"])


def clean_layers(backbone):
    return ClipADSDPPlus(backbone, rvs="mean").layers


def test_training_loss_and_settings(detector, images):
    feats = detector.extract_features(images)
    masks = torch.zeros(2, 128, 128)
    masks[0, 10:50, 20:60] = 1
    loss, parts = detector.training_loss(feats, masks, torch.tensor([1, 0]), ["nut", "nut"])
    assert loss.requires_grad and set(parts) == {f"loss_layer{x}" for x in detector.layers}
    # docs/methods.md §4.5: per layer focal(both states) + dice(abnormal) on the heads' maps, summed
    probs = heads_reference(detector, feats, ["nut", "nut"], per_layer=True)
    expected = sum(focal_loss_np(p, masks.numpy()) + dice_loss_np(p[:, 1], masks.numpy()) for p in probs)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    s = ClipADSDPPlus.train_settings
    assert (s["lr"], s["epochs"], s["batch_size"], s["seed"]) == (1e-4, 5, 8, 42)
    assert ClipADSDPPlus.train_presets["official"] == {"shuffle": False}


def test_official_checkpoint_and_quirks(tiny_random, tmp_path):
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_random.model.state_dict().items()}, str(weights))
    heads = ClipADSDPPlus(tiny_random, rvs="mean").learned
    torch.save({"linear_layers": heads.state_dict()}, tmp_path / "train_on_visa.pth")
    det = methods.from_official(
        "clipad-sdp-plus", checkpoint=tmp_path / "train_on_visa.pth", weights=weights, backbone="zsad-tiny"
    )
    assert all(torch.equal(a, b) for a, b in zip(det.learned.parameters(), heads.parameters(), strict=True))
    assert det.options["legacy_aliasing"] and det.options["text_precision"] == "fp16-official"
    assert det.options["rvs"] == "dbscan" and det.options["image_score"] == "minmax-sum"
    plain = methods.create("clipad-sdp-plus", backbone=tiny_random)
    assert not plain.options["legacy_aliasing"] and plain.options["image_score"] == "global"
    with pytest.raises(ValueError, match="training-free"):
        methods.from_official("clipad-sdp", checkpoint=tmp_path / "train_on_visa.pth")
