"""AnomalyCLIP against references written from docs/methods.md §5 (fp32, max |diff| < 1e-4), stage by stage,
plus its behaviour on the embedded world (trained prompts beat the untrained CLIP baseline on held-out
categories).

The references below re-implement the CLIP towers in numpy from open_clip's weights (LayerNorms jittered so
that a swapped or skipped norm shows), never calling zsad's forwards.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.transformer import QuickGELU
from references import bilinear_matrix
from scipy.ndimage import gaussian_filter
from scipy.special import erf
from torch import nn

from zsad import methods
from zsad.backbone import load_clip
from zsad.methods.anomalyclip import AnomalyCLIP, PromptLearner, default_dpam_start

TOL = 1e-4
SIZE = 128


# ------------------------------------------------------------------------------------------ numpy CLIP
def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def layer_norm(x, ln):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + ln.eps) * np_(ln.weight) + np_(ln.bias)


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def unit(x, axis=-1):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def attention(x, attn, mode="qk", causal=False):
    """Multi-head self-attention with weights softmax(a bᵀ / sqrt(d)) over (a, b) = mode, values v."""
    length, width = x.shape
    heads = attn.num_heads
    qkv = x @ np_(attn.in_proj_weight).T + np_(attn.in_proj_bias)
    parts = {"q": qkv[:, :width], "k": qkv[:, width : 2 * width], "v": qkv[:, 2 * width :]}
    d = width // heads
    out = np.zeros_like(x)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        s = parts[mode[0]][:, sl] @ parts[mode[1]][:, sl].T / np.sqrt(d)
        if causal:
            s = s + np.triu(np.full((length, length), -np.inf), 1)
        out[:, sl] = softmax(s) @ parts["v"][:, sl]
    return out @ np_(attn.out_proj.weight).T + np_(attn.out_proj.bias)


def mlp(x, block):
    h = x @ np_(block.mlp.c_fc.weight).T + np_(block.mlp.c_fc.bias)
    if isinstance(block.mlp.gelu, QuickGELU):  # OpenAI weights, AnomalyCLIP's build (docs/methods.md §13.1)
        h = h / (1 + np.exp(-1.702 * h))
    else:  # zsad-tiny's own activation
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    return h @ np_(block.mlp.c_proj.weight).T + np_(block.mlp.c_proj.bias)


def np_vision(model, image, mode, start, taps):
    """docs/methods.md §5.1: the original ViT plus, from block ``start``, a path = input + attn_mode(LN_1
    input) at the first block, + attn_mode(LN_1 original input) later, no FFN. Returns (path tokens after
    ln_post + proj per tap, last CLS @ proj without ln_post)."""
    visual = model.visual
    w = np_(visual.conv1.weight)
    width, _, p, _ = w.shape
    g = SIZE // p
    img = image.double().numpy()
    patches = img.reshape(3, g, p, g, p).transpose(1, 3, 0, 2, 4).reshape(g * g, -1)
    x = np.concatenate([np_(visual.class_embedding)[None], patches @ w.reshape(width, -1).T])
    x = layer_norm(x + np_(visual.positional_embedding), visual.ln_pre)
    path, out = None, {}
    for i, block in enumerate(visual.transformer.resblocks, 1):
        h = layer_norm(x, block.ln_1)
        if i >= start:
            extra = attention(h, block.attn, mode)
            path = x + extra if i == start else path + extra
        x = x + attention(h, block.attn)
        x = x + mlp(layer_norm(x, block.ln_2), block)
        if i in taps:
            out[i] = layer_norm(x if path is None else path, visual.ln_post) @ np_(visual.proj)
    return out, x[0] @ np_(visual.proj)


def np_text(model, ids, embeddings, deep):
    """Text tower (docs/methods.md §5.2): given word embeddings, positions; before block b in ``deep``
    positions 1..n are overwritten; causal blocks; ln_final; EOT (argmax id) row @ text_projection."""
    x = embeddings + np_(model.positional_embedding)[: ids.shape[1]]
    outs = []
    for row, seq in zip(ids, x, strict=True):
        for i, block in enumerate(model.transformer.resblocks, 1):
            if i in deep:
                seq = seq.copy()
                seq[1 : 1 + len(deep[i])] = deep[i]
            seq = seq + attention(layer_norm(seq, block.ln_1), block.attn, causal=True)
            seq = seq + mlp(layer_norm(seq, block.ln_2), block)
        seq = layer_norm(seq, model.ln_final)
        outs.append(seq[int(np.argmax(row))] @ np_(model.text_projection))
    return np.stack(outs)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def jittered():
    """zsad-tiny architecture, seeded random weights, every LayerNorm randomised (see module docstring)."""
    clip = load_clip("zsad-tiny", pretrained="random", seed=5)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for module in clip.model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(0.3 * torch.randn(module.weight.shape, generator=g))
                module.bias.add_(0.1 * torch.randn(module.bias.shape, generator=g))
    return clip


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


def make(clip, **options):
    torch.manual_seed(3)
    det = methods.create("anomalyclip", backbone=clip, **options)
    with torch.no_grad():  # prompts far from their init, so a skipped one changes the text
        for p in det.learned.parameters():
            p.normal_(0, 0.5)
    return det


def reference_text(det, object_word="object", fp16=False):
    """(D, 2) unit columns: template word embeddings with positions 1..12 replaced by ctx_pos / ctx_neg."""
    model = det.backbone.model
    ids = det.backbone.tokenize([f"{'X ' * 12}{object_word}.", f"{'X ' * 12}damaged {object_word}."]).numpy()
    emb = np_(model.token_embedding.weight)[ids]
    emb[0, 1:13], emb[1, 1:13] = np_(det.learned.ctx_pos), np_(det.learned.ctx_neg)
    deep = {}
    for b, p in enumerate(det.learned.compound_prompts_text, start=2):
        deep[b] = np_(p.half().float()) if fp16 else np_(p)
    return unit(np_text(model, ids, emb, deep)).T


# ------------------------------------------------------------------------------------------ faithfulness
def test_learned_parameters_are_only_the_prompts():
    vit_l = PromptLearner(width=768, n_ctx=12, t_n_ctx=4, depth=9)
    assert sum(p.numel() for p in vit_l.parameters()) == 2 * 12 * 768 + 8 * 4 * 768 == 43_008
    assert default_dpam_start(24) == 6 and default_dpam_start(12) == 3 and default_dpam_start(6) == 2


@pytest.mark.parametrize("fp16", [False, True])
def test_text_overwrites_words_after_sot_and_deep_positions_1_to_4(jittered, fp16):
    det = make(jittered, deep_prompt_fp16=fp16)
    ours = det.encode_prompts().detach().numpy()
    deep = det.learned.compound_prompts_text
    assert deep[0].shape == (4, 128) and len(deep) == 3  # blocks 2..4 of the 4-block text tower
    assert np.abs(ours - reference_text(det, fp16=fp16)).max() < TOL
    # the fp16 rounding is visible, and every deep block matters
    assert np.abs(ours - reference_text(det, fp16=not fp16)).max() > 1e-6
    with torch.no_grad():
        det.learned.compound_prompts_text[-1].normal_(0, 0.5)
    assert np.abs(det.encode_prompts().detach().numpy() - ours).max() > 1e-3


def test_object_aware_prompts_carry_the_class_name(jittered):
    det = make(jittered, object_aware=True)
    text = det.text_batch(["pill", "wood", "pill"]).detach().numpy()
    assert np.abs(text[0] - reference_text(det, "pill")).max() < TOL
    assert np.abs(text[1] - reference_text(det, "wood")).max() < TOL
    assert np.abs(text[0] - text[1]).max() > 1e-3
    agnostic = make(jittered)
    same = agnostic.text_batch(["pill", "wood"]).detach()
    assert torch.equal(same[0], same[1])


@pytest.mark.parametrize("mode", ["vv", "qq", "kk", "qk"])
def test_dpam_path_and_cls_without_ln_post(jittered, images, mode):
    det = make(jittered, dpam=mode, layers=[3, 6])
    feats = det.extract_features(images)
    for b in range(2):
        ref, cls = np_vision(jittered.model, images[b], mode, det.options["dpam_start"], {3, 6})
        for layer in (3, 6):
            assert np.abs(feats[f"path_{layer}"][b].numpy() - ref[layer]).max() < TOL
        assert np.abs(feats["cls_proj"][b].numpy() - cls).max() < TOL
    assert (feats["cls_proj"] - feats["pooled"]).abs().max() > 1e-2  # ln_post really is skipped
    # fresh layers, no aliasing (docs/methods.md §5.6)
    assert (feats["path_3"] - feats["path_6"]).abs().max() > 1e-2


def test_maps_and_scores_match_reference(jittered, images):
    det = make(jittered, layers=[4, 6], sigma=4.0)
    feats = det.extract_features(images)
    text = reference_text(det)
    h, w = jittered.grid_size
    up_h, up_w = bilinear_matrix(h, SIZE), bilinear_matrix(w, SIZE)
    raw = np.zeros((2, SIZE, SIZE))
    for layer in (4, 6):
        tokens = unit(feats[f"path_{layer}"][:, 1:].double().numpy())
        probs = softmax(tokens @ text / 0.07)  # on the token grid (docs/methods.md §5.3)
        grid = probs.transpose(0, 2, 1).reshape(2, 2, h, w)
        up = np.einsum("ih,bkhw,jw->bkij", up_h, grid, up_w)  # probabilities upsampled
        raw += (up[:, 1] + 1.0 - up[:, 0]) / 2.0
    ref_maps = np.stack([gaussian_filter(m, sigma=4.0) for m in raw])
    g = unit(feats["cls_proj"].double().numpy())
    ref_scores = softmax(g @ text / 0.07)[:, 1]
    scores, maps = det.predict(images, ["nut", "nut"])
    with torch.no_grad():
        assert np.abs(det.unsmoothed_map(feats, det.text_batch(["a", "a"])).numpy() - raw).max() < TOL
    assert np.abs(maps.numpy() - ref_maps).max() < TOL
    assert np.abs(scores.numpy() - ref_scores).max() < TOL
    # upsampling logits instead of probabilities would differ (docs/methods.md pitfall 3)
    tokens = unit(feats["path_6"][:, 1:].double().numpy())
    logit_grid = (tokens @ text / 0.07).transpose(0, 2, 1).reshape(2, 2, h, w)
    via_logits = softmax(np.einsum("ih,bkhw,jw->bkij", up_h, logit_grid, up_w), axis=1)[:, 1]
    probs_grid = softmax(tokens @ text / 0.07).transpose(0, 2, 1).reshape(2, 2, h, w)
    via_probs = np.einsum("ih,bkhw,jw->bkij", up_h, probs_grid, up_w)[:, 1]
    assert np.abs(via_logits - via_probs).max() > 1e-3


def np_focal(probs, mask, smooth=1e-5):
    """docs/methods.md §1.4: one-hot clamped to [smooth, 1 - smooth], pt = sum(onehot p) + smooth,
    loss = -(1 - pt)^2 log pt averaged."""
    onehot = np.stack([1 - mask, mask], axis=1).clip(smooth, 1 - smooth)
    pt = (onehot * probs).sum(axis=1) + smooth
    return (-((1 - pt) ** 2) * np.log(pt)).mean()


def np_dice(p, g):
    inter = (p * g).reshape(len(p), -1).sum(1)
    total = p.reshape(len(p), -1).sum(1) + g.reshape(len(g), -1).sum(1)
    return 1 - ((2 * inter + 1) / (total + 1)).mean()


@pytest.mark.parametrize("loss", ["glocal", "global", "local"])
def test_loss_is_ce_plus_lambda_focal_and_two_dice(jittered, images, loss):
    det = make(jittered, layers=[5, 6], loss=loss)
    feats = det.extract_features(images)
    masks = torch.zeros(2, SIZE, SIZE)
    masks[1, 30:70, 40:90] = 1
    labels = torch.tensor([0, 1])
    total, parts = det.training_loss(feats, masks, labels, ["a", "b"])
    text = reference_text(det)
    logits = unit(feats["cls_proj"].double().numpy()) @ text / 0.07
    ce = -np.log(softmax(logits)[[0, 1], [0, 1]]).mean()
    h, w = jittered.grid_size
    up_h, up_w = bilinear_matrix(h, SIZE), bilinear_matrix(w, SIZE)
    m = masks.double().numpy()
    local = 0.0
    for layer in (5, 6):
        probs = softmax(unit(feats[f"path_{layer}"][:, 1:].double().numpy()) @ text / 0.07)
        up = np.einsum("ih,bkhw,jw->bkij", up_h, probs.transpose(0, 2, 1).reshape(2, 2, h, w), up_w)
        local += np_focal(up, m) + np_dice(up[:, 1], m) + np_dice(up[:, 0], 1 - m)
    expected = {"glocal": ce + 4 * local, "global": ce, "local": 4 * local}[loss]
    assert abs(total.item() - expected) < TOL
    assert ("loss_global" in parts) == (loss != "local")
    total.backward()
    grads = [p.grad for p in det.learned.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_official_checkpoint_format_and_quirks(jittered, tmp_path, images):
    from safetensors.torch import save_file

    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in jittered.model.state_dict().items()}, str(weights))
    source = make(jittered).learned
    official = {
        "ctx_pos": source.ctx_pos.detach()[None, None],
        "ctx_neg": source.ctx_neg.detach()[None, None],
        **{f"compound_prompts_text.{i}": p.detach() for i, p in enumerate(source.compound_prompts_text)},
        "token_prefix_pos": torch.zeros(1, 1, 1, 128),
        "token_suffix_pos": torch.zeros(1, 1, 19, 128),
        "tokenized_prompts_pos": torch.zeros(1, 1, 32, dtype=torch.int32),
        **{f"compound_prompt_projections.{i}.weight": torch.zeros(896, 128) for i in range(3)},
    }
    torch.save({"prompt_learner": official}, tmp_path / "epoch_15.pth")
    det = methods.from_official(
        "anomalyclip",
        checkpoint=tmp_path / "epoch_15.pth",
        weights=weights,
        backbone="zsad-tiny",
        image_size=160,
    )
    assert torch.equal(det.learned.ctx_neg, source.ctx_neg)
    assert det.options["deep_prompt_fp16"] and not det.options["cls_ln_post"]
    assert det.options["dpam"] == "vv" and det.layers == (6,)
    assert np.abs(det.encode_prompts().detach().numpy() - reference_text(det, fp16=True)).max() < TOL
    # positional embedding: bilinear without antialias (16 -> 20 grid), CLS row kept
    pos = np_(jittered.model.visual.positional_embedding)
    grid = pos[1:].reshape(16, 16, -1)
    resized = np.einsum("ih,hwc,jw->ijc", bilinear_matrix(16, 20), grid, bilinear_matrix(16, 20))
    ours = det.backbone.model.visual.positional_embedding.detach().numpy()
    assert np.abs(ours[1:] - resized.reshape(400, -1)).max() < TOL and np.allclose(ours[0], pos[0])
    with pytest.raises(ValueError, match="unexpected"):
        det.load_learned({**official, "something_else": torch.zeros(1)})


def test_bad_options_are_clear(tiny_random):
    with pytest.raises(ValueError, match="layers must be 1-based"):
        AnomalyCLIP(tiny_random, layers=[7])
    with pytest.raises(ValueError, match="dpam"):
        AnomalyCLIP(tiny_random, dpam="vk")
    with pytest.raises(ValueError, match="loss"):
        AnomalyCLIP(tiny_random, loss="both")
    with pytest.raises(ValueError, match="does not fit"):
        AnomalyCLIP(tiny_random, object_aware=True).text_batch(["a " * 40])


# ------------------------------------------------------------------------------------------ embedded world
@pytest.fixture(scope="module")
def trained(tiny_trained, tmp_path_factory):
    """Prompts trained 3 epochs on the embedded auxiliary set (SynthAD seen categories), seed 111."""
    from zsad.tiny import embedded_aux_root
    from zsad.train import train

    work = tmp_path_factory.mktemp("anomalyclip")
    options = dict(backbone="zsad-tiny", epochs=3, cache=work / "cache", progress=False)
    return {
        loss: train("anomalyclip", embedded_aux_root(), work / loss, loss=loss, **options)
        for loss in ("glocal", "global")
    }, work


def held_out_table(checkpoint, dataset):
    from zsad.evaluate import evaluate
    from zsad.train import load_checkpoint

    return evaluate(load_checkpoint(checkpoint), dataset, progress=False).table


def test_trained_prompts_localise_held_out_defects(trained, synthad_root, heldout_classes):
    """Measured (shipped zsad-tiny, 3 epochs, SynthAD default test split, wood + pill): glocal pixel AUROC
    0.746 (pill 0.854, wood 0.639), image AUROC 0.775; the untrained CLIP baseline: 0.482 / 0.850. The
    global term alone: image AUROC 0.880, pixel 0.554. On this world the map terms pull the shared prompts
    away from the image score (the glocal image AUROC stays below the baseline's)."""
    from zsad.data import load_dataset

    test = load_dataset(synthad_root, "test", image_size=128, classes=heldout_classes)
    glocal = held_out_table(trained[0]["glocal"], test)
    assert glocal.loc["mean", "pixel_auroc"] > 0.68
    assert glocal.drop(index="mean")["pixel_auroc"].min() > 0.58
    assert glocal.loc["mean", "image_auroc"] > 0.70
    global_only = held_out_table(trained[0]["global"], test)
    assert global_only.loc["mean", "image_auroc"] >= 0.85
    assert glocal.loc["mean", "pixel_auroc"] > global_only.loc["mean", "pixel_auroc"] + 0.1


@pytest.fixture(scope="module")
def paper_schedule(tiny_trained, tmp_path_factory):
    """The paper's schedule (15 epochs, seed 111, glocal, lambda 4) on the paper-size embedded auxiliary set
    (2,496 images of the seen categories; the papers' auxiliary sets hold 1,725-2,162)."""
    from zsad.tiny import embedded_aux_root
    from zsad.train import read_config, train

    work = tmp_path_factory.mktemp("anomalyclip-paper")
    aux = embedded_aux_root(scale="paper-size")
    out = train("anomalyclip", aux, work / "ck", backbone="zsad-tiny", cache=work / "cache", progress=False)
    assert read_config(out)["train"]["epochs"] == 15 and read_config(out)["aux"]["images"] == 2496
    return out


def test_paper_size_aux_set_extends_the_quick_one(paper_schedule):
    """Same seed and categories, 4x the images per kind: the quick set's images are its first ones."""
    from zsad.data.meta import read_meta
    from zsad.tiny import embedded_aux_root

    quick, paper = embedded_aux_root(), embedded_aux_root(scale="paper-size")
    small, large = read_meta(quick)["test"], read_meta(paper)["test"]
    assert sorted(small) == sorted(large) and "wood" not in large and "pill" not in large
    for cls in ("carpet", "screw"):
        assert len(large[cls]) == 4 * len(small[cls]) == 192
        for rel in ("test/good/000.png", "test/hole/005.png", "ground_truth/hole/005_mask.png"):
            assert (quick / cls / rel).read_bytes() == (paper / cls / rel).read_bytes()
    with pytest.raises(ValueError, match="scale"):
        embedded_aux_root(scale="huge")


def test_paper_schedule_beats_the_baseline_maps_and_keeps_its_image_auroc(paper_schedule):
    """The issue's target, on the held-out measure set (:func:`zsad.tiny.heldout_measure_root`: wood +
    pill, 40 good + 60 defective images each, the card's images), the untrained baseline run here on the same
    images. Measured (training seeds 111 / 0 / 1): image AUROC 85.4 / 83.7 / 84.9 vs the baseline's 83.7;
    pixel AUROC 76.8 / 72.2 / 79.1 vs 52.8. With the 624-image quick set and 3 epochs the image AUROC stays
    below (79.8 / 79.6 / 81.5): the map terms take the shared prompts until the auxiliary set is large
    enough."""
    from zsad.data import load_dataset
    from zsad.evaluate import evaluate
    from zsad.tiny import heldout_measure_root

    test = load_dataset(heldout_measure_root(), "test", image_size=SIZE)
    assert len(test) == 200
    baseline = evaluate(methods.create("clip", "zsad-tiny"), test, progress=False).table.loc["mean"]
    ours = held_out_table(paper_schedule, test).loc["mean"]
    assert ours["image_auroc"] >= baseline["image_auroc"]
    assert ours["pixel_auroc"] > baseline["pixel_auroc"] + 0.15


def test_fine_tuning_on_the_target_train_half_raises_pixel_auroc(trained, synthad_root):
    """docs/methods.md §12.2 on the embedded world: the held-out "wood" test split is cut in two halves
    (seeded, per label; :func:`zsad.data.meta.finetuning_split`); the prompts start from the zero-shot
    checkpoint (``init_from``) and are fine-tuned on the ``train`` half, both are evaluated on the ``test``
    half.
    Measured: pixel AUROC 0.544 zero-shot -> 0.770 after 15 epochs. (On "pill", where zero-shot is already
    0.857, the same fine-tune drops to 0.793: 15 images overfit.)"""
    from zsad.data import load_dataset
    from zsad.data.meta import finetuning_split, read_meta, write_meta
    from zsad.train import read_config, train

    checkpoints, work = trained
    split, _ = finetuning_split(read_meta(synthad_root), "wood", seed=0)
    meta = write_meta(split, work / "finetune.json")
    tuned = train(
        "anomalyclip",
        synthad_root,
        work / "tuned",
        meta=meta,
        split="train",
        backbone="zsad-tiny",
        epochs=15,
        init_from=checkpoints["glocal"],
        cache=work / "cache",
        progress=False,
    )
    assert read_config(tuned)["aux"]["split"] == "train"
    assert read_config(tuned)["aux"]["images"] == len(split["train"]["wood"])
    target = load_dataset(synthad_root, "test", image_size=128, meta=meta)
    before = held_out_table(checkpoints["glocal"], target).loc["mean", "pixel_auroc"]
    after = held_out_table(tuned, target).loc["mean", "pixel_auroc"]
    assert after > before + 0.1
