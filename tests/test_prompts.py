"""Prompt banks match the official sizes (methods.md 1.2); ensembles are per-sentence normalised means."""

from __future__ import annotations

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


def test_anomalib_bank_equals_anomalibs_own_list():
    prompting = pytest.importorskip("anomalib.models.image.winclip.prompting")
    assert list(BANKS["winclip-anomalib"].templates) == list(prompting.TEMPLATES)
    assert list(BANKS["winclip-anomalib"].normal_states) == list(prompting.NORMAL_STATES)
    assert list(BANKS["winclip-anomalib"].abnormal_states) == list(prompting.ANOMALOUS_STATES)


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
