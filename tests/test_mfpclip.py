"""MFP-CLIP (docs/methods.md §7): MPFA against an independent reference, SP / I2TP / MP wiring, module
switches, gradients, the SP CNN's weights handling, the trainer's lr schedule, a checkpoint round trip, and
(slow) the embedded world: trained on SynthAD seen categories, evaluated on the held-out ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from references import bilinear_matrix_aligned, dice_loss_np, focal_loss_np
from safetensors.torch import save_file
from test_adaclip import block, layer_norm, linear, np_, np_vision, softmax, unit

from zsad import methods
from zsad.backbone import BackboneError
from zsad.methods.aprilgan import AprilGAN
from zsad.methods.local_cnn import LEVELS, load_local_cnn
from zsad.methods.mfpclip import MFPCLIP, mpfa, stage_starts
from zsad.train import load_checkpoint, read_log, resolve_settings, train

TOL = 1e-5
MODULES = ("i2tp", "sp", "mpfa", "mp")


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 3, 128, 128, generator=g), ["nut", "carpet"]


def make(backbone, seed: int = 3, **options) -> MFPCLIP:
    """A detector whose learned parts are far from their init (MP's zero-init conv would hide MP)."""
    torch.manual_seed(seed)
    det = methods.create("mfpclip", backbone=backbone, **options)
    with torch.no_grad():
        for p in det.learned.parameters():
            p.normal_(0, 0.05)
    return det


@pytest.fixture(scope="module")
def full(tiny_random):
    return make(tiny_random)


# ------------------------------------------------------------------------------------------ end to end
def reference_conv3x3(grid: np.ndarray, conv) -> np.ndarray:
    """Conv2d(1 -> D, 3 x 3, zero padding 1) written out: (h, w) -> (h, w, D)."""
    weight, bias = np_(conv.weight)[:, 0], np_(conv.bias)  # (D, 3, 3), (D,)
    padded = np.pad(grid, 1)
    h, w = grid.shape
    cells = [[padded[i : i + 3, j : j + 3] for j in range(w)] for i in range(h)]
    return np.array([[np.einsum("dij,ij->d", weight, cell) + bias for cell in row] for row in cells])


def reference_mfpclip(det, features, image, class_name, b):
    """MFP-CLIP for one image from the module's formulas (write-up 3.3-3.6 and our stated choices), numpy:
    CNN levels -> layer norm -> SP prompt [A_k(f_k)] appended before block 1 -> raw tokens of the tapped
    layers; I2TP tokens at positions 1..n of "X X X X flawless/damaged {class}.",
    t = unit(t_template + unit(t_i2tp)); per layer projection -> MPFA (3 x 3) -> coarse logits 100 cos(e, t);
    MP: coarse grid (mean over layers of P_a) -> 3 x 3 conv added to e -> refined logits; maps
    bilinear(align_corners) + softmax; score
    softmax(100 cos(g, t))[abnormal]. Returns (score, refined probs per layer, coarse probs per layer)."""
    model, learned = det.backbone.model, det.learned
    levels = [features[f"cnn_{k}"][b].double().numpy() for k in range(LEVELS)]
    levels = [(v - v.mean()) / np.sqrt(v.var() + 1e-5) for v in levels]
    prompt = np.stack([linear(f, a) for f, a in zip(levels, learned.sp[0], strict=True)])  # (5, width)
    raw, pooled = np_vision(model, image, {0: prompt}, det.layers)
    # I2TP: the image-conditioned word tokens overwrite the placeholders before the positional embedding
    n = det.options["i2tp_tokens"]
    ctx = linear(np.concatenate(levels), learned.i2tp).reshape(n, -1)
    ids = det.backbone.tokenize([f"{' '.join(['X'] * n)} {w} {class_name}." for w in ("flawless", "damaged")])
    ids = ids.numpy()
    words = np_(model.token_embedding.weight)[ids]
    words[:, 1 : 1 + n] = ctx
    x = words + np_(model.positional_embedding)[: ids.shape[1]]
    for blk in model.transformer.resblocks:
        x = block(x, blk, causal=True)
    conditioned = layer_norm(x, model.ln_final)[np.arange(2), ids.argmax(axis=1)] @ np_(model.text_projection)
    template = det.template_text(class_name).double().numpy()  # (D, 2), the ensemble of test_prompts.py
    text = unit(template + unit(conditioned).T, axis=0)
    h = w = int(np.sqrt(len(raw[det.layers[0]])))
    up = bilinear_matrix_aligned(h, 128)

    def probs(logits):  # (N, 2) -> (2, S, S)
        return softmax(np.stack([up @ logits[:, c].reshape(h, w) @ up.T for c in range(2)]), axis=0)

    embedded = [
        reference_mpfa(linear(raw[layer], fc)[None], h, w, 3)[0]
        for layer, fc in zip(det.layers, learned.heads.fc, strict=True)
    ]
    coarse = [100 * unit(e) @ text for e in embedded]
    coarse_grid = np.mean([softmax(c)[:, 1] for c in coarse], axis=0).reshape(h, w)
    refined = [
        100 * unit(e + reference_conv3x3(coarse_grid, conv).reshape(h * w, -1)) @ text
        for e, conv in zip(embedded, learned.mp, strict=True)
    ]
    score = softmax(100 * unit(pooled) @ text)[1]
    return score, [probs(r) for r in refined], [probs(c) for c in coarse]


def test_end_to_end_maps_score_and_loss_match_reference(full, batch):
    """Every module on, learned parts far from their init: maps, scores and the training loss
    (sum_layers [focal + dice](refined) + the same on the coarse maps + BCE(S, label)) against the
    reference."""
    images, names = batch
    features = full.extract_features(images)
    scores, maps = full.predict(images, names)
    masks = (torch.rand(2, 128, 128, generator=torch.Generator().manual_seed(5)) > 0.8).float()
    labels = np.array([1.0, 0.0])
    loss = full.training_loss(features, masks, torch.tensor(labels), names)[0]
    expected_loss, refs = 0.0, []
    for b in range(2):
        score, refined, coarse = reference_mfpclip(full, features, images[b], names[b], b)
        refs.append(score)
        assert np.abs(maps[b].numpy() - np.mean([p[1] for p in refined], axis=0)).max() < 1e-4
        assert abs(float(scores[b]) - score) < 1e-5
        mask = masks[b].numpy()[None]
        for p in refined + coarse:
            expected_loss += (focal_loss_np(p[None], mask) + dice_loss_np(p[1][None], mask)) / 2
    refs = np.array(refs)
    expected_loss += -np.mean(labels * np.log(refs) + (1 - labels) * np.log(1 - refs))
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)


def test_defaults_follow_the_paper_and_record_our_choices(tiny_random):
    det = methods.create("mfpclip", backbone=tiny_random)
    assert det.layers == (2, 3, 5, 6)  # the quarter points of 6 blocks (6, 12, 18, 24 on ViT-L)
    assert det.sp_blocks == (1,)  # SP at stage 1: before block 1
    assert {k: det.options[k] for k in (*MODULES, "mpfa_n")} == {**dict.fromkeys(MODULES, True), "mpfa_n": 3}
    assert det.options["cnn"] == "resnet18" and det.options["cnn_weights"] == "random"  # no ImageNet offline
    assert len(det.learned.sp[0]) == LEVELS == 5  # K = 5 adapters -> a 5 x width prompt
    s = resolve_settings(MFPCLIP, None)
    assert (s.epochs, s.batch_size, s.lr, s.optimizer, s.lr_decay) == (100, 1, 1e-3, "adam", "inverse-epoch")
    assert [s.epoch_lr(e) for e in range(3)] == pytest.approx([1e-3, 5e-4, 1e-3 / 3])
    assert stage_starts(24) == (1, 7, 13, 19) and stage_starts(6) == (1, 3, 4, 6)


def reference_mpfa(tokens: np.ndarray, h: int, w: int, n: int) -> np.ndarray:
    """Mean over the existing neighbours of each patch in an n x n window, written as loops."""
    out = np.zeros_like(tokens)
    r = n // 2
    grid = tokens.reshape(tokens.shape[0], h, w, -1)
    for i in range(h):
        for j in range(w):
            window = grid[:, max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1]
            out[:, i * w + j] = window.mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("n", [1, 3, 5])
def test_mpfa_is_an_n_by_n_neighbourhood_mean(n):
    tokens = torch.randn(2, 5 * 7, 4, generator=torch.Generator().manual_seed(n))
    ours = mpfa(tokens, (5, 7), n).numpy()
    assert np.abs(ours - reference_mpfa(tokens.numpy(), 5, 7, n)).max() < TOL


@pytest.mark.parametrize("n", [0, 2, 4, -1])
def test_mpfa_rejects_even_or_nonpositive_windows(tiny_random, n):
    with pytest.raises(ValueError, match="positive odd integer"):
        mpfa(torch.zeros(1, 4, 2), (2, 2), n)
    with pytest.raises(ValueError, match="mpfa_n"):
        methods.create("mfpclip", backbone=tiny_random, mpfa_n=n)


def test_bad_options_are_clear_errors(tiny_random):
    with pytest.raises(ValueError, match="sp_stages must be stages in 1..4"):
        methods.create("mfpclip", backbone=tiny_random, sp_stages=[5])
    with pytest.raises(ValueError, match="layers must be 1-based"):
        methods.create("mfpclip", backbone=tiny_random, layers=[0, 7])
    with pytest.raises(ValueError, match="only torchvision ResNets"):
        methods.create("mfpclip", backbone=tiny_random, cnn="vgg11")
    with pytest.raises(BackboneError, match="neither a tag of resnet18"):
        methods.create("mfpclip", backbone=tiny_random, cnn_weights="imagenet")
    with pytest.raises(BackboneError, match="CNN weights file not found"):
        methods.create("mfpclip", backbone=tiny_random, cnn_weights="/no/such/resnet.pth")


def test_extract_features_cache_only_what_is_frozen(full, tiny_random, batch):
    images, _ = batch
    feats = full.extract_features(images)
    # SP on: the prompt reaches every ViT block, so only the image and the CNN levels are frozen.
    assert set(feats) == {"image"} | {f"cnn_{k}" for k in range(LEVELS)}
    assert [feats[f"cnn_{k}"].shape[1] for k in range(LEVELS)] == [64, 64, 128, 256, 512]
    off = make(tiny_random, sp=False, i2tp=False)
    assert set(off.extract_features(images)) == {"pooled"} | {f"tokens_{layer}" for layer in off.layers}
    assert off.cnn is None  # neither module needs the CNN
    assert full.feature_key() != off.feature_key()


def test_sp_prompt_is_five_tokens_that_change_every_layer(full, batch):
    images, names = batch
    feats = full.extract_features(images)
    prompts = full.learned.visual_prompts(full.cnn_levels(feats), full.sp_blocks)
    assert list(prompts) == [1] and prompts[1].shape == (2, 5, full.backbone.width)
    tokens, pooled = full.vit_features(feats)
    plain = full.backbone.encode_image(images, layers=full.layers)
    for layer, t in zip(full.layers, tokens, strict=True):
        assert t.shape == (2, 16 * 16, full.backbone.width)  # prompt tokens never reach an output
        assert (t - plain.tokens[layer][:, 1:]).abs().max() > 1e-3
    assert (pooled - plain.pooled).abs().max() > 1e-3
    two = make(full.backbone, sp_stages=[1, 2])
    assert two.sp_blocks == (1, 3) and len(two.learned.sp) == 2


def test_i2tp_text_depends_on_the_image_and_enriches_the_templates(full, batch):
    images, _ = batch
    feats = full.extract_features(images)
    text = full.text_batch(feats, ["nut", "nut"])
    assert text.shape == (2, full.backbone.embed_dim, 2)
    assert torch.allclose(text.norm(dim=1), torch.ones(2, 2), atol=1e-5)
    assert (text[0] - text[1]).abs().max() > 1e-3  # same class, different images -> different text
    template = full.template_text("nut")
    assert (text[0] - template).abs().max() > 1e-3
    full.options["i2tp"] = False
    try:
        assert torch.equal(full.text_batch(feats, ["nut", "nut"])[0], template)
    finally:
        full.options["i2tp"] = True


def test_mp_starts_as_identity_and_refines_once_trained(tiny_random, batch):
    images, names = batch
    torch.manual_seed(0)
    det = methods.create("mfpclip", backbone=tiny_random)  # zero-initialised mask-prompt convs
    with torch.no_grad():
        out = det.forward_maps(det.extract_features(images), names)
    assert out["coarse_grid"].shape == (2, 16, 16)
    for coarse, refined in zip(out["coarse"], out["refined"], strict=True):
        assert torch.equal(coarse, refined)
    with torch.no_grad():
        det.learned.mp[0].weight.normal_(0, 0.5)
        out = det.forward_maps(det.extract_features(images), names)
    assert (out["coarse"][0] - out["refined"][0]).abs().max() > 1e-3
    assert torch.equal(out["coarse"][1], out["refined"][1])  # only layer 2's conv changed


@pytest.mark.parametrize("module", MODULES)
def test_each_module_switch_changes_the_output(full, batch, module):
    """The same learned parameters with one module off give other maps (and SP/I2TP other scores)."""
    images, names = batch
    scores, maps = full.predict(images, names)
    off = methods.create("mfpclip", backbone=full.backbone, **{module: False})
    state = full.learned_state()
    off.load_learned({k: v for k, v in state.items() if k in off.learned.state_dict()})
    own = set(off.learned.state_dict())
    assert own == set(state) if module == "mpfa" else own < set(state)  # MPFA has no parameters
    off_scores, off_maps = off.predict(images, names)
    assert (maps - off_maps).abs().max() > 1e-3
    if module in ("sp", "i2tp"):
        assert (scores - off_scores).abs().max() > 1e-5


def test_mpfa_off_is_n_equal_one(full, batch):
    images, names = batch
    n1 = methods.create("mfpclip", backbone=full.backbone, mpfa_n=1)
    n1.load_learned(full.learned_state())
    off = methods.create("mfpclip", backbone=full.backbone, mpfa=False)
    off.load_learned(full.learned_state())
    assert torch.equal(n1.predict(images, names)[1], off.predict(images, names)[1])


def test_all_modules_off_is_aprilgan_heads_averaged(tiny_random, batch):
    """No SP, I2TP, MPFA or MP: APRIL-GAN's heads and text, with the mean over layers instead of the sum."""
    images, names = batch
    det = make(tiny_random, **dict.fromkeys(MODULES, False))
    april = AprilGAN(tiny_random)
    april.learned.load_state_dict({k.removeprefix("heads."): v for k, v in det.learned_state().items()})
    ours_s, ours_m = det.predict(images, names)
    their_s, their_m = april.predict(images, names)
    assert torch.allclose(ours_m * len(det.layers), their_m, atol=1e-5)
    assert torch.allclose(ours_s, their_s, atol=1e-6)


def test_gradients_reach_exactly_the_learned_parameters(full, batch):
    images, names = batch
    feats = full.extract_features(images)
    masks = torch.zeros(2, 128, 128)
    masks[0, 40:70, 30:90] = 1.0
    full.learned.zero_grad(set_to_none=True)
    loss, parts = full.training_loss(feats, masks, torch.tensor([1, 0]), names)
    loss.backward()
    assert {"loss_bce", "loss_layer2", "coarse_loss_layer6"} <= set(parts)
    for name, p in full.learned.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    frozen = [*full.backbone.parameters(), *full.cnn.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    full.learned.zero_grad(set_to_none=True)


def test_cnn_weights_tag_file_and_offline_error(tmp_path, monkeypatch):
    import torchvision

    random_cnn = load_local_cnn("resnet18", "random", seed=5)
    file = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in random_cnn.net.state_dict().items()}, str(file))
    from_file = load_local_cnn("resnet18", file)
    assert from_file.weights_id.startswith("sha256-")
    x = torch.randn(1, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(random_cnn(x), from_file(x), strict=True))
    assert load_local_cnn("resnet18", "random", seed=6)(x)[4].ne(random_cnn(x)[4]).any()

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(BackboneError, match="resnet18-f37072fd.pth") as err:
        load_local_cnn("resnet18", "IMAGENET1K_V1")
    assert "hub/checkpoints" in str(err.value) and "cnn_weights='random'" in str(err.value)
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(random_cnn.net.state_dict(), cached)  # a file in torch.hub's cache is used, no download
    tagged = load_local_cnn("resnet18", "IMAGENET1K_V1")
    assert tagged.weights_id == "IMAGENET1K_V1" and torch.equal(tagged(x)[0], random_cnn(x)[0])


def test_trainer_round_trip_with_inverse_epoch_decay(synthad_root, tmp_path):
    out = train(
        "mfpclip", synthad_root, tmp_path / "ck", backbone="zsad-tiny", weights="random", epochs=2,
        batch_size=16, classes=["carpet"], cache=tmp_path / "cache", progress=False,
    )  # fmt: skip
    log = read_log(out)
    assert len(log) == 2 and all(np.isfinite(row["loss"]) for row in log)
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 / 2)  # 1/(epoch+1), epoch 2
    det = load_checkpoint(out)
    assert det.options["cnn_weights"] == "random" and det.sp_blocks == (1,)
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    again = load_checkpoint(out)
    assert torch.equal(det.predict(images, ["carpet"] * 2)[1], again.predict(images, ["carpet"] * 2)[1])


# ------------------------------------------------------------------------------------------- embedded world
@pytest.mark.slow
def test_embedded_world_localises_unseen_categories(tmp_path, synthad_root, heldout_classes, tiny_trained):
    """Trained on the embedded aux set (seen categories), evaluated on the held-out ones: clearly above the
    untrained CLIP baseline (~0.48); untrained parts stay far below."""
    from zsad.data import load_dataset
    from zsad.evaluate import evaluate
    from zsad.tiny import embedded_aux_root

    heldout = load_dataset(synthad_root, "test", 128, heldout_classes)
    clip = evaluate(methods.create("clip", backbone=tiny_trained), heldout, progress=False).table.loc["mean"]
    # The CI configuration of notebooks/06_mfpclip.ipynb: three seen categories, one epoch, batch 4.
    out = train("mfpclip", embedded_aux_root(), tmp_path / "ck", backbone="zsad-tiny", epochs=1, batch_size=4,
                classes=["carpet", "capsule", "screw"], progress=False)  # fmt: skip
    det = load_checkpoint(out)
    ours = evaluate(det, heldout, progress=False).table.loc["mean"]
    assert ours["pixel_auroc"] > clip["pixel_auroc"] + 0.1
    # break "trained parts never loaded" (negated heads are no control: their complement map passes whenever
    # the assertion above does)
    torch.manual_seed(0)
    untrained = evaluate(methods.create("mfpclip", backbone=det.backbone), heldout, progress=False)
    assert untrained.table.loc["mean", "pixel_auroc"] < ours["pixel_auroc"] - 0.1
