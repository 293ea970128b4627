"""The trained methods on the embedded world: heads trained on SynthAD categories zsad-tiny saw (the embedded
auxiliary set), evaluated on the held-out ones, against the untrained CLIP baseline and zero-shot WinCLIP.

Floors are the measured values minus a stated margin, and each control stands for one named break that must
fall below the floor. (Negating the heads is no control: it gives the complement map, 1 - AUROC, which passes
whenever the forward test passes.)
"""

from __future__ import annotations

import pytest
import torch

from zsad import methods
from zsad.data import load_dataset
from zsad.evaluate import evaluate
from zsad.tiny import embedded_aux_root
from zsad.train import load_checkpoint, train

# The CI configuration of the notebooks (02_aprilgan, 03b_clipad_sdp_plus): seeded, few epochs.
CONFIGS = {"aprilgan": {"preset": "aux-mvtec"}, "clipad-sdp-plus": {"epochs": 5}}


@pytest.fixture(scope="module")
def heldout(synthad_root, heldout_classes, tiny_trained):
    return load_dataset(synthad_root, "test", tiny_trained.image_size, heldout_classes)


@pytest.fixture(scope="module")
def baselines(heldout, tiny_trained):
    return {
        name: evaluate(methods.create(name, backbone=tiny_trained), heldout, progress=False).table.loc["mean"]
        for name in ("clip", "winclip")
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_trained):
    root = tmp_path_factory.mktemp("trained")
    aux = embedded_aux_root()  # frozen features go to the default cache, shared with the notebooks
    out = {}
    for method, config in CONFIGS.items():
        out[method] = train(method, aux, root / method, backbone="zsad-tiny", progress=False, **config)
    return out


def _mean(detector, heldout):
    return evaluate(detector, heldout, progress=False).table.loc["mean"]


# APRIL-GAN's held-out pixel AUROC, measured 0.826 (CLIP baseline 0.482); margin 0.02
APRILGAN_FLOOR = 0.806


def test_aprilgan_localises_unseen_categories(trained, heldout, baselines):
    ours = _mean(load_checkpoint(trained["aprilgan"]), heldout)
    assert ours["pixel_auroc"] > APRILGAN_FLOOR
    assert ours["pixel_auroc"] > baselines["winclip"]["pixel_auroc"]
    assert ours["image_auroc"] >= baselines["clip"]["image_auroc"] - 0.01  # the same CLIP text score


# SDP+'s held-out pixel AUROC, measured 0.750 (SDP 0.646, CLIP baseline 0.482); margin 0.02
SDP_PLUS_FLOOR = 0.73


def test_sdp_plus_beats_sdp_and_the_baseline(trained, heldout, baselines, tiny_trained):
    detector = load_checkpoint(trained["clipad-sdp-plus"])
    ours = _mean(detector, heldout)
    sdp = _mean(methods.create("clipad-sdp", backbone=tiny_trained), heldout)
    assert ours["pixel_auroc"] > SDP_PLUS_FLOOR
    assert ours["pixel_auroc"] > baselines["clip"]["pixel_auroc"] + 0.2
    assert ours["pixel_auroc"] > sdp["pixel_auroc"] + 0.05
    # break "trained heads never loaded" (seeded fresh heads on the SDP map): measured 0.496
    torch.manual_seed(0)
    untrained = _mean(methods.create("clipad-sdp-plus", backbone=detector.backbone), heldout)
    assert untrained["pixel_auroc"] < SDP_PLUS_FLOOR


def test_heads_of_the_wrong_layers_or_untrained_heads_fall_below_the_floor(trained, heldout):
    detector = load_checkpoint(trained["aprilgan"])
    # break "heads assigned to the wrong layers" (layer order reversed): measured 0.746
    states = [{k: v.clone() for k, v in fc.state_dict().items()} for fc in detector.learned.fc]
    for fc, state in zip(detector.learned.fc, states[::-1], strict=True):
        fc.load_state_dict(state)
    assert _mean(detector, heldout)["pixel_auroc"] < APRILGAN_FLOOR
    # break "trained heads never loaded" (seeded fresh heads): measured 0.493
    torch.manual_seed(0)
    untrained = _mean(methods.create("aprilgan", backbone=detector.backbone), heldout)
    assert untrained["pixel_auroc"] < APRILGAN_FLOOR
