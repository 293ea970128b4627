"""WinCLIP / WinCLIP+ (zsad/methods/winclip.py) against independent references (docs/methods.md §2).

The faithfulness test re-runs the randomly initialised zsad-tiny by hand: patch embedding, CLS and positional
embedding, then for every window (explicit loops over its top-left corner) the transformer on CLS + the
window's tokens, ``ln_post`` + ``proj`` of the CLS, the two-way softmax written out, the harmonic means with
Python loops over patches, and a hand-written bilinear upsampling (``align_corners=False``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zsad.methods.memory_bank import FewShotError
from zsad.methods.winclip import (
    WinCLIP,
    WinCLIPPlus,
    harmonic_aggregation,
    harmonic_mean,
    incidence_matrix,
    window_indices,
)
from zsad.prompts import text_features


@pytest.fixture(scope="module")
def tiny():
    from zsad.backbone import load_clip

    # 64 px (an 8x8 grid: 49 + 36 windows) keeps the hand-written window loops fast on a shared CPU.
    return load_clip("zsad-tiny", pretrained="random", image_size=64, seed=0)


@pytest.fixture(scope="module")
def images(tiny):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, tiny.image_size, tiny.image_size, generator=gen)


@pytest.fixture(scope="module")
def zero_shot(tiny):
    return WinCLIP(tiny)


# ----------------------------------------------------------------------------------- pure pieces
def _loop_windows(h: int, w: int, size: int) -> list[list[int]]:
    return [
        [(r + i) * w + (c + j) for i in range(size) for j in range(size)]
        for r in range(h - size + 1)
        for c in range(w - size + 1)
    ]


def _loop_harmonic(window_scores: list[float], windows: list[list[int]], num_patches: int) -> list[float]:
    """M(p) = n_p / sum over windows containing p of 1 / score, one patch at a time."""
    out = []
    for p in range(num_patches):
        covering = [s for s, win in zip(window_scores, windows, strict=True) if p in win]
        if any(s == 0 for s in covering):
            out.append(0.0)
        else:
            out.append(len(covering) / sum(1.0 / s for s in covering) if covering else 0.0)
    return out


@pytest.mark.parametrize(("grid", "size"), [((15, 15), 2), ((15, 15), 3), ((4, 6), 2), ((5, 3), 3)])
def test_window_indices_match_explicit_loops(grid, size):
    got = window_indices(grid, size)
    assert got.tolist() == _loop_windows(*grid, size)


def test_paper_window_counts_on_the_15x15_grid():
    assert window_indices((15, 15), 2).shape == (196, 4)
    assert window_indices((15, 15), 3).shape == (169, 9)
    with pytest.raises(ValueError, match="does not fit"):
        window_indices((4, 4), 5)


def test_harmonic_aggregation_vectorised_equals_loop():
    gen = torch.Generator().manual_seed(3)
    for grid, size in [((5, 4), 2), ((6, 6), 3)]:
        windows = window_indices(grid, size)
        scores = torch.rand(2, windows.shape[0], generator=gen) * 0.98 + 0.01
        got = harmonic_aggregation(scores, incidence_matrix(windows, grid[0] * grid[1]))
        loops = _loop_windows(*grid, size)
        for b in range(2):
            expected = _loop_harmonic(scores[b].tolist(), loops, grid[0] * grid[1])
            torch.testing.assert_close(
                got[b].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0
            )


def test_harmonic_aggregation_hand_computed_and_edge_cases():
    # 3x3 grid, four 2x2 windows scored 1, 3/4, 1/2, 1/4: the centre patch is in all four,
    # so it gets 4 / (1 + 4/3 + 2 + 4) = 0.48; the corners keep their single window's score.
    windows = window_indices((3, 3), 2)
    incidence = incidence_matrix(windows, 9)
    got = harmonic_aggregation(torch.tensor([[1.0, 0.75, 0.5, 0.25]]), incidence)[0]
    assert got[4].item() == pytest.approx(4 / (1 + 4 / 3 + 2 + 4))
    assert got[[0, 2, 6, 8]].tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert got[1].item() == pytest.approx(2 / (1 + 4 / 3))
    # Constant window scores give a constant map; a zero window zeroes exactly the patches it covers.
    torch.testing.assert_close(
        harmonic_aggregation(torch.full((2, 4), 0.3), incidence), torch.full((2, 9), 0.3)
    )
    zeroed = harmonic_aggregation(torch.tensor([[0.0, 0.5, 0.5, 0.5]]), incidence)[0]
    assert not zeroed.isnan().any()
    assert (zeroed[[0, 1, 3, 4]] == 0).all() and (zeroed[[2, 5, 6, 7, 8]] > 0).all()
    # harmonic_mean over scales
    torch.testing.assert_close(
        harmonic_mean([torch.tensor([0.5]), torch.tensor([0.25])]), torch.tensor([1 / 3])
    )


# ----------------------------------------------------------------------------------- hand-written reference
def _bilinear_half_pixel(grid_map: list[list[float]], size: int) -> torch.Tensor:
    """Bilinear upsampling with align_corners=False written out: source = (i + 0.5) * in / out - 0.5."""
    h, w = len(grid_map), len(grid_map[0])
    out = torch.empty(size, size, dtype=torch.float64)

    def axis(i: int, n: int) -> tuple[int, int, float]:
        src = min(max((i + 0.5) * n / size - 0.5, 0.0), n - 1)
        lo = int(math.floor(src))
        hi = min(lo + 1, n - 1)
        return lo, hi, src - lo

    for y in range(size):
        y0, y1, fy = axis(y, h)
        for x in range(size):
            x0, x1, fx = axis(x, w)
            top = grid_map[y0][x0] * (1 - fx) + grid_map[y0][x1] * fx
            bottom = grid_map[y1][x0] * (1 - fx) + grid_map[y1][x1] * fx
            out[y, x] = top * (1 - fy) + bottom * fy
    return out


def _ascore(f: torch.Tensor, text: torch.Tensor, tau: float = 0.07) -> float:
    cos_n = float(F.cosine_similarity(f, text[:, 0], dim=0))
    cos_a = float(F.cosine_similarity(f, text[:, 1], dim=0))
    return math.exp(cos_a / tau) / (math.exp(cos_n / tau) + math.exp(cos_a / tau))


@torch.no_grad()
def _reference_winclip(backbone, image: torch.Tensor, class_name: str, scales=(2, 3)):
    """Image score, grid map and upsampled map of WinCLIP zero-shot, one window at a time."""
    v = backbone.model.visual
    x = v.conv1(image[None])
    h, w = x.shape[-2:]
    tokens = x.flatten(2).transpose(1, 2)
    cls = v.class_embedding.reshape(1, 1, -1)
    sequence = torch.cat([cls, tokens], dim=1) + v.positional_embedding

    def embed(patches: list[int]) -> torch.Tensor:
        sub = sequence[:, [0] + [1 + p for p in patches]]
        out = v.transformer(v.ln_pre(sub))
        return (v.ln_post(out[:, 0]) @ v.proj)[0]

    text = text_features(backbone, class_name, "winclip")
    num = h * w
    image_score = _ascore(embed(list(range(num))), text)
    per_scale = []
    for s in scales:
        windows = _loop_windows(h, w, s)
        per_scale.append(_loop_harmonic([_ascore(embed(win), text) for win in windows], windows, num))
    combined = [len(scales) + 1.0 for _ in range(num)]
    for p in range(num):
        combined[p] /= 1.0 / image_score + sum(1.0 / m[p] for m in per_scale)
    grid_map = [combined[r * w : (r + 1) * w] for r in range(h)]
    return image_score, grid_map, _bilinear_half_pixel(grid_map, image.shape[-1])


def test_map_and_score_match_hand_written_reference(tiny, images, zero_shot):
    image_score, _, expected_map = _reference_winclip(tiny, images[0], "wood")
    scores, maps = zero_shot.predict(images[:1], ["wood"])
    assert scores.dtype == torch.float32 and maps.dtype == torch.float32
    assert maps.shape == (1, tiny.image_size, tiny.image_size)
    assert abs(scores[0].item() - image_score) < 1e-4
    assert (maps[0].double() - expected_map).abs().max() < 1e-4


def test_batch_equals_one_by_one_with_mixed_classes(zero_shot, images):
    names = ["wood", "nut", "wood"]
    scores, maps = zero_shot.predict(images, names)
    for i, name in enumerate(names):
        s, m = zero_shot.predict(images[i : i + 1], [name])
        torch.testing.assert_close(scores[i : i + 1], s, atol=1e-5, rtol=0)
        torch.testing.assert_close(maps[i : i + 1], m, atol=1e-5, rtol=0)


def test_predict_scales_are_consistent_with_predict(zero_shot, images):
    parts = zero_shot.predict_scales(images[:2], ["wood", "wood"])
    assert set(parts) == {"image", "window_2", "window_3", "zero_shot", "final"}
    scores, maps = zero_shot.predict(images[:2], ["wood", "wood"])
    torch.testing.assert_close(parts["final"], maps)
    # The image scale is the CLS score broadcast over the image.
    torch.testing.assert_close(parts["image"], scores[:, None, None].expand_as(maps), atol=1e-6, rtol=0)


def test_caoyunkang_aggregation_matches_their_formula(tiny, images):
    """caoyunkang/WinClip: per scale, mean over covering windows of 1 / P(normal); mean over scales
    (the full image counts as one scale); map = 1 - 1 / that mean."""
    detector = WinCLIP(tiny, aggregation="caoyunkang")
    features = detector.extract_features(images[:1])
    text = detector.text_features("wood")
    grid = tiny.grid_size
    num = grid[0] * grid[1]

    def normal_prob(f: torch.Tensor) -> float:
        return 1.0 - _ascore(f, text)

    per_scale = [[1.0 / normal_prob(features["image"][0])] * num]
    for s in detector.scales:
        windows = _loop_windows(*grid, s)
        recip = [1.0 / normal_prob(f) for f in features[f"window_{s}"][0]]
        per_scale.append(
            [
                sum(r for r, win in zip(recip, windows, strict=True) if p in win)
                / sum(p in win for win in windows)
                for p in range(num)
            ]
        )
    expected = [1.0 - 1.0 / (sum(m[p] for m in per_scale) / len(per_scale)) for p in range(num)]
    got = detector._maps(features, ["wood"])["zero_shot"].reshape(-1)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)


def test_bf16_autocast_stays_close_to_fp32(tiny, images, zero_shot):
    scores, maps = WinCLIP(tiny, precision="bf16").predict(images[:2], ["wood", "wood"])
    ref_scores, ref_maps = zero_shot.predict(images[:2], ["wood", "wood"])
    assert scores.dtype == maps.dtype == torch.float32
    assert (scores - ref_scores).abs().max() < 0.05 and (maps - ref_maps).abs().max() < 0.05


def test_text_options_change_the_text_and_are_cached(tiny, monkeypatch):
    paper = WinCLIP(tiny)
    anomalib = WinCLIP(tiny, prompt_bank="winclip-anomalib", normalize_sentences=False)
    t_paper, t_anomalib = paper.text_features("wood"), anomalib.text_features("wood")
    assert t_paper.shape == (tiny.embed_dim, 2)
    torch.testing.assert_close(t_paper.norm(dim=0), torch.ones(2))
    assert (t_paper - t_anomalib).abs().max() > 1e-4
    # The sentences are encoded once per backbone: every WinCLIP(+) on this backbone reuses them.
    assert paper.text_features("wood") is t_paper
    calls = []
    original = type(tiny).encode_text
    monkeypatch.setattr(
        type(tiny), "encode_text", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    torch.testing.assert_close(WinCLIPPlus(tiny).text_features("wood"), t_paper, rtol=0, atol=0)
    assert not calls
    WinCLIP(tiny).text_features("pill")
    assert calls


# ----------------------------------------------------------------------------------- few-shot
def test_self_reference_gives_zero_few_shot_map(tiny, images, zero_shot):
    plus = WinCLIPPlus(tiny)
    plus.fit_few_shot(images[:2], ["wood", "nut"])
    parts = plus.predict_scales(images[:2], ["wood", "nut"])
    assert parts["few_shot"].abs().max() < 1e-5
    scores, maps = plus.predict(images[:2], ["wood", "nut"])
    zs_scores, zs_maps = zero_shot.predict(images[:2], ["wood", "nut"])
    torch.testing.assert_close(maps, zs_maps / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, zs_scores / 2, atol=1e-5, rtol=0)


def test_few_shot_maps_match_brute_force_association(tiny, images):
    plus = WinCLIPPlus(tiny)
    plus.fit_few_shot(images[1:3], ["wood", "wood"])
    features = plus.extract_features(images[:1])
    refs = plus.extract_features(images[1:3])
    maps = plus._maps(features, ["wood"])
    grid = tiny.grid_size
    num = grid[0] * grid[1]

    def association(query: torch.Tensor, memory: torch.Tensor) -> list[float]:
        return [min((1.0 - float(F.cosine_similarity(q, m, dim=0))) / 2 for m in memory) for q in query]

    patch = association(features["patch"][0], refs["patch"].reshape(-1, refs["patch"].shape[-1]))
    terms = [patch]
    for s in plus.scales:
        key = f"window_{s}"
        window_scores = association(features[key][0], refs[key].reshape(-1, refs[key].shape[-1]))
        terms.append(_loop_harmonic(window_scores, _loop_windows(*grid, s), num))
    expected = torch.tensor([sum(t[p] for t in terms) / len(terms) for p in range(num)], dtype=torch.float64)
    torch.testing.assert_close(maps["few_shot"].reshape(-1).double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(maps["final"], (maps["zero_shot"] + maps["few_shot"]) / 2)


def test_patch_features_are_ln_post_of_the_last_block(tiny, images):
    plus = WinCLIPPlus(tiny)
    last = tiny.num_layers
    feats = tiny.encode_image(images[:1], layers=(last,))
    expected = tiny.model.visual.ln_post(feats.tokens[last][:, 1:])
    got = plus.extract_features(images[:1])["patch"]
    assert got.shape == (1, tiny.grid_size[0] * tiny.grid_size[1], tiny.width)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    raw = WinCLIPPlus(tiny, patch_features="raw").extract_features(images[:1])["patch"]
    torch.testing.assert_close(raw, feats.tokens[last][:, 1:], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------- errors and registry
def test_bad_inputs_and_options_raise_clear_errors(tiny, zero_shot, images):
    with pytest.raises(ValueError, match="backbone runs at"):
        zero_shot.predict(torch.zeros(1, 3, 48, 48), ["wood"])
    with pytest.raises(ValueError, match="class names"):
        zero_shot.predict(images[:2], ["wood"])
    plus = WinCLIPPlus(tiny)
    plus.fit_few_shot(images[:1], ["wood"])
    with pytest.raises(FewShotError, match=r"'nut'.*fit_few_shot"):
        plus.predict(images[:2], ["wood", "nut"])
    with pytest.raises(NotImplementedError, match="zero-shot only"):
        zero_shot.fit_few_shot(images[:1], ["wood"])
    with pytest.raises(ValueError, match="does not fit"):
        WinCLIP(tiny, scales=(2, 40))
    with pytest.raises(ValueError, match="aggregation"):
        WinCLIP(tiny, aggregation="mean")
    with pytest.raises(ValueError, match="temperature"):
        WinCLIP(tiny, temperature=0)
    with pytest.raises(ValueError, match="prompt_bank"):
        WinCLIP(tiny, prompt_bank="nope")
    with pytest.raises(ValueError, match="patch_features"):
        WinCLIPPlus(tiny, patch_features="nope")
    with pytest.raises(TypeError, match="unknown option"):
        WinCLIP(tiny, patch_features="raw")  # a WinCLIP+ option
    with pytest.raises(TypeError, match="unknown option"):
        WinCLIPPlus(tiny, temprature=0.07)


def test_registry_builds_both_ids_on_the_tiny_backbone():
    from zsad.methods import create

    zs = create("winclip", backbone="zsad-tiny", weights="random")
    fs = create("winclip-fewshot", backbone="zsad-tiny", weights="random")
    assert isinstance(zs, WinCLIP) and not isinstance(zs, WinCLIPPlus) and isinstance(fs, WinCLIPPlus)
    assert zs.grid == tuple(zs.backbone.grid_size) and zs.image_size == zs.backbone.image_size
    assert WinCLIP.default_backbone == "ViT-B-16-plus-240" and WinCLIP.default_weights == "laion400m_e31"
    assert fs.config()["method"] == "winclip-fewshot" and fs.config()["scales"] == [2, 3]


# ------------------------------------------------------------------------ behaviour on the trained world
def test_zero_and_few_shot_on_held_out_categories(tiny_trained, synthad_root, heldout_classes):
    """Calibrated on the shipped zsad-tiny (measured: image 0.850, pixel 0.818 zero-shot; pixel 0.84-0.88 with
    k = 1, 2, 4). Window embeddings must localise where plain patch-text similarity does not (0.482)."""
    from zsad.data import load_dataset
    from zsad.evaluate import evaluate, fit_few_shot
    from zsad.methods.clip_baseline import CLIPBaseline

    size = tiny_trained.image_size
    test_set = load_dataset(synthad_root, "test", image_size=size, classes=heldout_classes)
    train_set = load_dataset(synthad_root, "train", image_size=size, classes=heldout_classes)
    zero = evaluate(WinCLIP(tiny_trained), test_set, progress=False).table.loc["mean"]
    plain = evaluate(CLIPBaseline(tiny_trained), test_set, progress=False).table.loc["mean"]
    assert zero["image_auroc"] > 0.80
    assert zero["pixel_auroc"] > 0.70
    assert zero["pixel_auroc"] > plain["pixel_auroc"] + 0.15
    for k in (1, 2, 4):
        plus = WinCLIPPlus(tiny_trained)
        fit_few_shot(plus, train_set, k, seed=0)
        few = evaluate(plus, test_set, progress=False).table.loc["mean"]
        assert few["pixel_auroc"] > zero["pixel_auroc"], f"{k}-shot pixel AUROC did not beat zero-shot"
