"""APRIL-GAN against references written from docs/methods.md §3.3 (fp32, max |diff| < 1e-4), stage by
stage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from references import bilinear_matrix_aligned, dice_loss_np, focal_loss_np
from safetensors.torch import save_file

from zsad import methods
from zsad.methods.aprilgan import AprilGAN, quarter_layers
from zsad.methods.memory_bank import FewShotError

TOL = 1e-4


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def unit(x, axis=-1):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


@pytest.fixture(scope="module")
def detector(tiny_random):
    torch.manual_seed(3)
    det = methods.create("aprilgan", backbone=tiny_random)
    with torch.no_grad():  # heads far from their init, so a skipped head changes the maps
        for fc in det.learned.fc:
            fc.weight.normal_(0, 0.3)
            fc.bias.normal_(0, 0.3)
    return det


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(3, 3, 128, 128, generator=g), ["nut", "carpet", "nut"]


def reference_zero_shot(det, feats, names):
    """docs/methods.md §3.3 in numpy: per layer head -> unit -> 100 <., T> -> grid ->
    bilinear(align_corners=True) -> softmax over the 2 states -> abnormal; sum over layers.
    Score softmax(100 <g, T>)[abnormal]."""
    text = np.stack([det.text_features(c).numpy() for c in names])  # (B, D, 2)
    h, w = det.backbone.grid_size
    size = det.image_size
    up_h, up_w = bilinear_matrix_aligned(h, size), bilinear_matrix_aligned(w, size)
    maps = np.zeros((len(names), size, size))
    layer_maps = []
    for i, layer in enumerate(det.layers):
        tokens = feats[f"tokens_{layer}"][:, 1:].numpy().astype(np.float64)
        weight = det.learned.fc[i].weight.detach().numpy().astype(np.float64)
        bias = det.learned.fc[i].bias.detach().numpy().astype(np.float64)
        proj = unit(tokens @ weight.T + bias)
        logits = 100.0 * np.einsum("bnd,bdk->bnk", proj, text)  # (B, N, 2)
        grid = logits.transpose(0, 2, 1).reshape(len(names), 2, h, w)
        up = np.einsum("ih,bkhw,jw->bkij", up_h, grid, up_w)
        layer_map = softmax(up, axis=1)[:, 1]
        layer_maps.append(layer_map)
        maps += layer_map
    pooled = unit(feats["pooled"].numpy().astype(np.float64))
    scores = softmax(100.0 * np.einsum("bd,bdk->bk", pooled, text), axis=1)[:, 1]
    return scores, maps, layer_maps


def test_quarter_layers():
    assert quarter_layers(24) == (6, 12, 18, 24)
    assert quarter_layers(12) == (3, 6, 9, 12)
    assert quarter_layers(6) == (2, 3, 5, 6)


def test_zero_shot_matches_reference(detector, batch):
    images, names = batch
    feats = detector.extract_features(images)
    scores, maps = detector.predict(images, names)
    ref_scores, ref_maps, layer_maps = reference_zero_shot(detector, feats, names)
    assert np.abs(maps.numpy() - ref_maps).max() < TOL
    assert np.abs(scores.numpy() - ref_scores).max() < TOL
    assert maps.shape == (3, 128, 128) and maps.max() <= len(detector.layers)
    assert np.abs(layer_maps[0] - layer_maps[-1]).max() > 1e-2  # the layers differ: a skipped one shows


def test_softmax_after_upsampling_is_not_softmax_before(detector, batch):
    images, names = batch
    feats = detector.extract_features(images)
    text = detector._text_batch(names)
    logits = detector.layer_logits(feats, text)[0]
    grid = logits.transpose(1, 2).reshape(3, 2, *detector.backbone.grid_size)
    before = torch.nn.functional.interpolate(
        grid.softmax(dim=1), size=(128, 128), mode="bilinear", align_corners=True
    )[:, 1]
    after = detector.layer_probs(feats, names)[0][:, 1]
    assert (before - after).abs().max() > 1e-3


def test_training_loss_is_focal_plus_dice_per_layer(detector, batch):
    """docs/methods.md §3.4: per-layer focal(probs) + dice(abnormal), summed, on the reference's maps."""
    images, names = batch
    feats = detector.extract_features(images)
    masks = torch.zeros(3, 128, 128)
    masks[1, 40:70, 30:90] = 1
    loss, parts = detector.training_loss(feats, masks, torch.tensor([0, 1, 0]), names)
    _, _, layer_maps = reference_zero_shot(detector, feats, names)
    expected = sum(
        focal_loss_np(np.stack([1.0 - abnormal, abnormal], axis=1), masks.numpy())
        + dice_loss_np(abnormal, masks.numpy())
        for abnormal in layer_maps
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(parts) == {f"loss_layer{x}" for x in detector.layers}
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in detector.learned.parameters())
    detector.learned.zero_grad()


def test_few_shot_memory_map_and_scores(tiny_random, batch):
    torch.manual_seed(0)
    det = methods.create("aprilgan", backbone=tiny_random, image_score="official-transductive")
    images, names = batch
    g = torch.Generator().manual_seed(11)
    refs = torch.randn(2, 3, 128, 128, generator=g)
    with pytest.raises(FewShotError):
        det.fit_few_shot(refs, ["nut", "nut"]).predict(images, names)
    det.fit_few_shot(refs, ["nut", "nut"])
    nut = [0, 2]
    feats = det.extract_features(images[nut])
    ref_feats = det.extract_features(refs)
    zero_scores, zero_maps, _ = reference_zero_shot(det, feats, ["nut", "nut"])
    h, w = det.backbone.grid_size
    up = bilinear_matrix_aligned(h, 128)
    memory_map = np.zeros((2, 128, 128))
    for layer in det.layers:
        test_tokens = unit(feats[f"tokens_{layer}"][:, 1:].numpy().astype(np.float64))
        memory = unit(ref_feats[f"tokens_{layer}"][:, 1:].numpy().reshape(-1, det.backbone.width))
        dist = (1.0 - np.einsum("bnd,md->bnm", test_tokens, memory)).min(axis=-1).reshape(2, h, w)
        memory_map += np.einsum("ih,bhw,jw->bij", up, dist, up)
    scores, maps = det.predict(images[nut], ["nut", "nut"])
    assert np.abs(maps.numpy() - (zero_maps + memory_map)).max() < TOL
    # official score: 0.5 (text prob + per-class min-max of the map max), applied over the test set
    frame = pd.DataFrame(
        {
            "cls_name": ["nut", "nut"],
            "score": scores.numpy(),
            **{k: v.numpy() for k, v in det.last_score_parts.items()},
        }
    )
    final = det.finalize_scores(frame)["score"].to_numpy()
    peak = (zero_maps + memory_map).reshape(2, -1).max(axis=1)
    norm = (peak - peak.min()) / (peak.max() - peak.min())
    assert np.abs(final - 0.5 * (zero_scores + norm)).max() < TOL
    # the single-image default
    bounded = methods.create("aprilgan", backbone=tiny_random)
    bounded.learned.load_state_dict(det.learned.state_dict())
    bounded.fit_few_shot(refs, ["nut", "nut"])
    one = bounded.predict(images[:1], ["nut"])[0].numpy()
    assert one[0] == pytest.approx(0.5 * (zero_scores[0] + peak[0] / (3 * len(det.layers))), abs=TOL)


def test_official_checkpoint_format_and_quirks(tiny_random, tmp_path):
    torch.manual_seed(5)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_random.model.state_dict().items()}, str(weights))
    heads = AprilGAN(tiny_random).learned
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_()
    torch.save({"trainable_linearlayer": heads.state_dict()}, tmp_path / "epoch_3.pth")
    det = methods.from_official(
        "aprilgan", checkpoint=tmp_path / "epoch_3.pth", weights=weights, backbone="zsad-tiny"
    )
    for a, b in zip(det.learned.parameters(), heads.parameters(), strict=True):
        assert torch.equal(a, b)
    assert det.options["image_score"] == "official-transductive"
    assert not det.backbone.quick_gelu  # exact GELU, as APRIL-GAN's model JSON (docs/methods.md §13.1)
    w = det.backbone.model.visual.transformer.resblocks[0].mlp.c_fc.weight
    # fp16-rounded like open_clip's OpenAI loader (docs/methods.md §13.8)
    assert torch.equal(w, w.half().float())
    assert not torch.equal(tiny_random.model.visual.transformer.resblocks[0].mlp.c_fc.weight, w)
    torch.save({"linear_layers": heads.state_dict()}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="expected a dict with 'trainable_linearlayer'"):
        methods.from_official(
            "aprilgan", checkpoint=tmp_path / "wrong.pth", weights=weights, backbone="zsad-tiny"
        )
    bad = {"trainable_linearlayer": {**heads.state_dict(), "fc.0.weight": torch.zeros(3, 3)}}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"fc.0.weight: \(3, 3\)"):
        methods.from_official(
            "aprilgan", checkpoint=tmp_path / "bad.pth", weights=weights, backbone="zsad-tiny"
        )
    with pytest.raises(ValueError, match="has learned parts"):
        methods.from_official("aprilgan", weights=weights, backbone="zsad-tiny")


def test_bad_options_are_clear(tiny_random):
    with pytest.raises(ValueError, match="layers must be 1-based"):
        methods.create("aprilgan", backbone=tiny_random, layers=[0, 7])
    with pytest.raises(ValueError, match="image_score"):
        methods.create("aprilgan", backbone=tiny_random, image_score="max")
