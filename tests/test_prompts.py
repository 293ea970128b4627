"""Prompt banks match the official sizes (docs/methods.md §1.2); ensembles are per-sentence normalised
means."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from zsad.prompts import BANKS, get_bank, reduce_sentences, text_features


@pytest.mark.parametrize(
    ("bank", "normal", "abnormal", "templates"),
    [
        ("winclip", 7, 4, 22),
        ("winclip-anomalib", 7, 4, 21),
        ("aprilgan", 7, 5, 35),
        ("adaclip", 7, 5, 4),
        ("clipad", 9, 10, 22),
    ],
)
def test_bank_sizes_follow_the_official_code(bank, normal, abnormal, templates):
    b = get_bank(bank)
    assert (len(b.normal_states), len(b.abnormal_states), len(b.templates)) == (normal, abnormal, templates)
    assert all(t.count("{}") == 1 for t in b.templates)
    n, a = b.sentences("metal_nut")
    assert len(n) == normal * templates and len(a) == abnormal * templates
    assert all("metal_nut" in s for s in n + a)  # class names are used as they are (underscores kept)


def test_winclip_templates_have_no_period_and_clipad_ones_do():
    assert not any(t.endswith(".") for t in BANKS["winclip"].templates)
    assert all(t.endswith(".") for t in BANKS["clipad"].templates)
    anomalib = BANKS["winclip-anomalib"].templates
    assert "a cropped photo of a {}." not in anomalib and "a jpeg corrupted photo of a {}." not in anomalib
    assert anomalib.count("a jpeg corrupted photo of the {}.") == 2 and len(set(anomalib)) == 20
    # every other template is one of the paper's 22, with a period
    assert set(anomalib) <= set(BANKS["clipad"].templates)
    normal, abnormal = BANKS["winclip-anomalib"].sentences("bottle")
    assert (len(normal), len(abnormal)) == (147, 84)


# anomalib's WinCLIP lists (src/anomalib/models/image/winclip/prompting.py at 084331d, 2025-01-08), pinned
# here because anomalib is in no dependency list: states, then templates in anomalib's order.
ANOMALIB_NORMAL_STATES = [
    "{}", "flawless {}", "perfect {}", "unblemished {}",
    "{} without flaw", "{} without defect", "{} without damage",
]  # fmt: skip
ANOMALIB_ANOMALOUS_STATES = ["damaged {}", "{} with flaw", "{} with defect", "{} with damage"]
ANOMALIB_TEMPLATES = [
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.",
    "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.",
    "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
]  # fmt: skip


def test_anomalib_bank_equals_anomalibs_own_list():
    assert list(BANKS["winclip-anomalib"].templates) == ANOMALIB_TEMPLATES
    assert list(BANKS["winclip-anomalib"].normal_states) == ANOMALIB_NORMAL_STATES
    assert list(BANKS["winclip-anomalib"].abnormal_states) == ANOMALIB_ANOMALOUS_STATES


# sha256 (first 16 hex) of every sentence of a bank, in order, for the class "{}": a typo in one word of one
# template or state changes it. The lists were checked once against the official code (APRIL-GAN's
# prompt_ensemble.py, AdaCLIP's method/adaclip.py and anomalib: equal lists in the same order; CLIP-AD's
# util/prompt_ensemble.py: the same 22 templates, the first two in the other order, which no reducer sees).
BANK_HASHES = {
    "winclip": "14bf801a032ff5ac",
    "winclip-anomalib": "cd2a7f130c3b0635",
    "aprilgan": "9630be4de0713967",
    "adaclip": "d8ae5062d3ce1981",
    "clipad": "b82ab050f6cd4132",
}


@pytest.mark.parametrize("bank", sorted(BANK_HASHES))
def test_bank_sentences_are_pinned_by_hash(bank):
    normal, abnormal = get_bank(bank).sentences("{}")
    text = "\n".join(["normal", *normal, "abnormal", *abnormal])
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == BANK_HASHES[bank]


def test_every_bank_is_pinned():
    assert set(BANKS) == set(BANK_HASHES)


def test_unknown_bank_and_reducer_are_clear_errors():
    with pytest.raises(ValueError, match="available"):
        get_bank("nope")
    with pytest.raises(ValueError, match="reducer"):
        reduce_sentences(torch.randn(4, 8), "median")


def test_text_features_is_normalised_mean_of_normalised_sentences(tiny_random):
    t = text_features(tiny_random, "screw", "adaclip")
    assert t.shape == (tiny_random.embed_dim, 2)
    for column, sentences in zip(t.T, get_bank("adaclip").sentences("screw"), strict=True):
        emb = F.normalize(tiny_random.model.encode_text(tiny_random.tokenize(sentences)).float(), dim=-1)
        expected = emb.mean(0) / emb.mean(0).norm()
        assert torch.allclose(column, expected, atol=1e-5)
    raw = text_features(tiny_random, "screw", "adaclip", normalize_sentences=False)
    assert not torch.allclose(raw, t, atol=1e-4)  # anomalib's raw average is a different vector


@pytest.mark.parametrize("reducer", ["mean", "pca", "kde", "mean_shift", "dbscan"])
def test_every_reducer_returns_a_unit_vector_near_the_cluster(reducer):
    g = torch.Generator().manual_seed(0)
    centre = F.normalize(torch.randn(16, generator=g), dim=0)
    x = F.normalize(centre + 0.05 * torch.randn(40, 16, generator=g), dim=-1)
    v = reduce_sentences(x, reducer)
    assert v.norm().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.dot(v, centre).item() > 0.9


def test_pca_reducer_follows_clipad_definition():
    """CLIP-AD projects the dimension-centred embeddings on the top eigenvector of the sentence scatter
    matrix; the same vector is the top left singular vector of the (D, N) centred matrix times sigma."""
    import numpy as np

    from zsad.prompts import reduce_pca

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 12)) + 2.0
    centred = x.T - x.T.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    expected = u[:, 0] * s[0]
    expected = expected if expected @ x.mean(0) >= 0 else -expected
    assert np.allclose(reduce_pca(x), expected, atol=1e-8)
