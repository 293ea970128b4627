"""zsad.backbone against independent references: open_clip's own forwards, hand-written per-head attention,
emulations of the official in-place code (AnomalyCLIP before 2a7c886, CLIP-AD), and real files on disk.

Everything runs on the zsad-tiny architecture with seeded random weights and random LayerNorms.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from references import bilinear_matrix, jitter_layernorms
from safetensors.torch import save_file, save_model

import zsad.backbone as zb
from zsad.backbone import AttnPath, BackboneError, CLIPBackbone, load_clip

CONFIG = json.loads((Path(zb.__file__).parent / "tiny" / "model_configs" / "zsad-tiny.json").read_text())
ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny() -> CLIPBackbone:
    """Random LayerNorms: under the identity init a swapped ln_1/ln_2 or ln_pre/ln_post is invisible."""
    return jitter_layernorms(load_clip("zsad-tiny", pretrained="random", seed=0))


@pytest.fixture(scope="module")
def images(tiny) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, tiny.image_size, tiny.image_size, generator=gen)


@pytest.fixture(scope="module")
def weights_file(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    return path


# ------------------------------------------------------------------------------------ independent references
def embed(visual, images):
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    return visual.ln_pre(x)


def ref_attention(attn: torch.nn.MultiheadAttention, h: torch.Tensor, mode: str) -> torch.Tensor:
    """ "qk" is nn.MultiheadAttention itself; other modes head by head with an explicit softmax, values v."""
    if mode == "qk":
        return attn(h, h, h, need_weights=False)[0]
    width, heads = attn.embed_dim, attn.num_heads
    hd = width // heads
    qkv = h @ attn.in_proj_weight.T + attn.in_proj_bias
    parts = {"q": qkv[..., :width], "k": qkv[..., width : 2 * width], "v": qkv[..., 2 * width :]}
    a, v = parts[mode[0]], parts["v"]
    out = torch.zeros_like(v)
    for head in range(heads):
        cols = slice(head * hd, (head + 1) * hd)
        weights = torch.exp(a[..., cols] @ a[..., cols].transpose(1, 2) / math.sqrt(hd))
        out[..., cols] = (weights / weights.sum(-1, keepdim=True)) @ v[..., cols]
    return attn.out_proj(out)


@torch.no_grad()
def reference_paths(visual, images, path: AttnPath, layers):
    """Original stream with open_clip's blocks, second path written from docs/methods.md §4.1, §5.1."""
    blocks = list(visual.transformer.resblocks)
    stage_len = len(blocks) / path.num_stages
    x, p, tokens, paths = embed(visual, images), None, {}, {}
    for i, blk in enumerate(blocks, 1):
        extra = ref_attention(blk.attn, blk.ln_1(x), path.mode)
        if path.variant == "residual" and i >= path.start_block:
            p = x + extra if i == path.start_block else p + extra
        elif path.variant == "staged":
            p = extra if (i - 1) % stage_len == 0 else p + extra
        x = blk(x)
        if i in layers:
            tokens[i], paths[i] = x.clone(), (x if p is None else p).clone()
    return tokens, paths


def all_tensors(feats) -> list[torch.Tensor]:
    out = [feats.pooled]
    for d in (feats.tokens, feats.tokens_proj, feats.path_tokens, feats.path_tokens_proj):
        out += list(d.values())
    return out


# ------------------------------------------------------------------------------------ model and config
def test_config_is_registered_and_attributes_follow_it(tiny):
    vision, text = CONFIG["vision_cfg"], CONFIG["text_cfg"]
    assert "zsad-tiny" in open_clip.list_models()
    assert open_clip.get_tokenizer("zsad-tiny").context_length == text["context_length"]
    assert tiny.image_size == vision["image_size"] and tiny.patch_size == vision["patch_size"]
    grid = vision["image_size"] // vision["patch_size"]
    assert tiny.grid_size == (grid, grid) and tiny.num_layers == vision["layers"]
    assert tiny.width == vision["width"] and tiny.embed_dim == CONFIG["embed_dim"]
    assert tiny.tokenize(["a photo", "b"]).shape == (2, text["context_length"])
    assert tiny.mean == zb.OPENAI_MEAN and tiny.std == zb.OPENAI_STD
    assert all(not p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.model.training  # the frozen CLIP never enters train mode


def test_default_weights_for():
    assert zb.default_weights_for("zsad-tiny") is None
    assert zb.default_weights_for("ViT-L-14-336") == "openai"
    assert zb.default_weights_for("ViT-B-16-plus-240") == "laion400m_e31"


# ------------------------------------------------------------------------------------ encode_image
@torch.no_grad()
def test_encode_image_equals_open_clip(tiny, images):
    feats = tiny.encode_image(images, layers=(-1,))
    assert torch.allclose(feats.pooled, tiny.model.encode_image(images), atol=ATOL)
    assert list(feats.tokens) == [tiny.num_layers]
    assert torch.allclose(feats.tokens_proj[tiny.num_layers][:, 0], feats.pooled, atol=ATOL)
    assert feats.path_tokens == {} and feats.path_tokens_proj == {}


@torch.no_grad()
def test_cls_only_last_block_equals_the_full_block(tiny, images):
    """Without a tap on the last block and without a second path, only CLS runs there (a speed-up): the
    pooled embedding equals the full block's to float summation order, and so do WinCLIP's windows."""
    from zsad.clip_forward import block_forward, cls_block_forward

    block = tiny.model.visual.transformer.resblocks[-1]
    x = torch.randn(3, 17, tiny.width)
    torch.testing.assert_close(cls_block_forward(block, x), block_forward(block, x)[:, :1], atol=2e-6, rtol=0)
    full = tiny.encode_image(images, layers=(-1,))
    short = tiny.encode_image(images)
    torch.testing.assert_close(short.pooled, full.pooled, atol=2e-6, rtol=0)
    torch.testing.assert_close(short.pooled, tiny.model.encode_image(images), atol=2e-6, rtol=0)


def test_tap_equals_truncated_forward(tiny, images):
    visual = tiny.model.visual
    feats = tiny.encode_image(images, layers=(2, tiny.num_layers))
    x = embed(visual, images)
    for blk in visual.transformer.resblocks[:2]:
        x = blk(x)
    assert torch.allclose(feats.tokens[2], x, atol=ATOL)
    assert torch.allclose(feats.tokens_proj[2], visual.ln_post(x) @ visual.proj, atol=ATOL)
    for blk in visual.transformer.resblocks[2:]:
        x = blk(x)
    assert torch.allclose(feats.tokens[tiny.num_layers], x, atol=ATOL)


@torch.no_grad()
def test_returned_tensors_are_fresh(tiny, images):
    path = AttnPath(mode="vv", start_block=3)
    feats = tiny.encode_image(images, layers=(1, 2, 3, -1), attn_path=path)
    tensors = all_tensors(feats)
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)
    snapshot = [t.clone() for t in tensors]
    for i, t in enumerate(tensors):
        t.add_(1.0)
        assert all(
            torch.equal(o, s) for j, (o, s) in enumerate(zip(tensors, snapshot, strict=True)) if j != i
        )
        t.copy_(snapshot[i])


def test_bad_inputs_raise_clear_errors(tiny, images):
    with pytest.raises(BackboneError, match="1-based"):
        tiny.encode_image(images, layers=(0,))
    with pytest.raises(BackboneError, match="out of range"):
        tiny.encode_image(images, layers=(tiny.num_layers + 1,))
    with pytest.raises(ValueError, match=r"\(B, 3, 128, 128\)"):
        tiny.encode_image(images[:, :, :64, :64])
    with pytest.raises(ValueError, match="mode"):
        AttnPath(mode="qv")
    with pytest.raises(BackboneError, match="start_block"):
        tiny.encode_image(images, attn_path=AttnPath(start_block=tiny.num_layers + 1))


@torch.no_grad()
def test_negative_layers_and_batch_independence(tiny, images):
    one = tiny.encode_image(images[:1], layers=(-2, -1))
    two = tiny.encode_image(images, layers=(tiny.num_layers - 1, tiny.num_layers))
    assert sorted(one.tokens) == [tiny.num_layers - 1, tiny.num_layers]
    for a, b in zip(all_tensors(one), all_tensors(two), strict=True):
        assert torch.allclose(a[0], b[0], atol=ATOL)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["qk", "qq", "kk", "vv"])
@pytest.mark.parametrize("variant,stages", [("residual", 4), ("staged", 3), ("staged", 4)])
def test_attention_path_matches_reference(tiny, images, mode, variant, stages):
    path = AttnPath(mode=mode, variant=variant, start_block=3, num_stages=stages, replace_cls=False)
    layers = range(1, tiny.num_layers + 1)
    feats = tiny.encode_image(images, layers=layers, attn_path=path)
    tokens, paths = reference_paths(tiny.model.visual, images, path, layers)
    visual = tiny.model.visual
    for layer in layers:
        assert torch.allclose(feats.tokens[layer], tokens[layer], atol=ATOL)
        assert torch.allclose(feats.path_tokens[layer], paths[layer], atol=ATOL)
        expected = visual.ln_post(paths[layer]) @ visual.proj
        assert torch.allclose(feats.path_tokens_proj[layer], expected, atol=ATOL)
    if variant == "residual":  # before start_block the path is the original stream
        assert torch.equal(feats.path_tokens[2], feats.tokens[2])
        assert not torch.allclose(feats.path_tokens[3], feats.tokens[3], atol=1e-3)


@torch.no_grad()
def test_cls_replacement_defaults(tiny, images):
    staged = tiny.encode_image(images, layers=(3,), attn_path=AttnPath(variant="staged", num_stages=3))
    assert torch.equal(staged.path_tokens[3][:, 0], staged.tokens[3][:, 0])
    plain = tiny.encode_image(
        images, layers=(3,), attn_path=AttnPath(variant="staged", num_stages=3, replace_cls=False)
    )
    assert torch.equal(staged.path_tokens[3][:, 1:], plain.path_tokens[3][:, 1:])
    assert not torch.allclose(plain.path_tokens[3][:, 0], plain.tokens[3][:, 0], atol=1e-3)
    residual = tiny.encode_image(images, layers=(3,), attn_path=AttnPath(start_block=2))
    assert not torch.allclose(residual.path_tokens[3][:, 0], residual.tokens[3][:, 0], atol=1e-3)


def _two(blk, h):
    """(v-v, q-k) attention outputs of one block, as the official dual-output module returns them."""
    return ref_attention(blk.attn, h, "vv"), ref_attention(blk.attn, h, "qk")


@torch.no_grad()
def anomalyclip_prefix_emulation(visual, images, start, layers):
    """AnomalyCLIP before 2a7c886: in-place `+=` and stored tensors without clone (docs/methods.md §5.6)."""
    x, state, out = embed(visual, images), None, {}
    for i, blk in enumerate(visual.transformer.resblocks, 1):
        if i < start:
            x = x + blk.attn(*[blk.ln_1(x)] * 3, need_weights=False)[0]
            x = x + blk.mlp(blk.ln_2(x))
        elif i == start:
            vv, ori = _two(blk, blk.ln_1(x))
            x_ori = x + ori
            x_ori = x_ori + blk.mlp(blk.ln_2(x_ori))
            x += vv
            state = [x, x_ori]
        else:
            path, x_ori = state
            vv, ori = _two(blk, blk.ln_1(x_ori))
            x_ori += ori
            x_ori = x_ori + blk.mlp(blk.ln_2(x_ori))
            path += vv
            state = [path, x_ori]
        if i in layers:
            out[i] = state[0] if state is not None else x
    return out


@torch.no_grad()
def clipad_emulation(visual, images, num_stages, layers):
    """CLIP-AD's dual path: in-place `x += vv` / `x_ori += ori`, stored lists, CLS copied afterwards."""
    blocks = visual.transformer.resblocks
    x, stored = embed(visual, images), []
    for count, blk in enumerate(blocks):
        if count == 0:
            vv, ori = _two(blk, blk.ln_1(x))
            x_ori = x + ori
            state = [vv, x_ori + blk.mlp(blk.ln_2(x_ori))]
        else:
            path, x_ori = state
            vv, ori = _two(blk, blk.ln_1(x_ori))
            if count % (len(blocks) / num_stages) == 0:
                path = vv
            else:
                path += vv
            x_ori += ori
            state = [path, x_ori + blk.mlp(blk.ln_2(x_ori))]
        if count + 1 in layers:
            stored.append((count + 1, state))
    surgery, original = {}, {}
    for layer, (path, x_ori) in stored:
        path[:, 0] = x_ori[:, 0]
        surgery[layer] = visual.ln_post(path) @ visual.proj
        original[layer] = x_ori.clone()
    return surgery, original


@torch.no_grad()
def test_legacy_residual_reproduces_anomalyclip_aliasing(tiny, images):
    layers = (1, 2, 3, 4, 6)
    path = AttnPath(mode="vv", start_block=3, legacy_aliasing=True)
    feats = tiny.encode_image(images, layers=layers, attn_path=path)
    official = anomalyclip_prefix_emulation(tiny.model.visual, images, 3, layers)
    for layer in layers:
        assert torch.allclose(feats.path_tokens[layer], official[layer], atol=ATOL), layer
    assert torch.allclose(feats.path_tokens[2], feats.path_tokens[6])  # the aliasing really happened
    clean = tiny.encode_image(images, layers=layers, attn_path=AttnPath(mode="vv", start_block=3))
    assert not torch.allclose(clean.path_tokens[4], clean.path_tokens[6], atol=1e-3)
    assert all(torch.equal(feats.tokens[k], clean.tokens[k]) for k in layers)


@torch.no_grad()
@pytest.mark.parametrize("num_stages", [3, 4])
def test_legacy_staged_reproduces_clipad_aliasing(tiny, images, num_stages):
    layers = tuple(range(1, tiny.num_layers + 1))
    path = AttnPath(mode="vv", variant="staged", num_stages=num_stages, legacy_aliasing=True)
    feats = tiny.encode_image(images, layers=layers, attn_path=path)
    surgery, original = clipad_emulation(tiny.model.visual, images, num_stages, layers)
    clean = tiny.encode_image(
        images, layers=layers, attn_path=AttnPath(variant="staged", num_stages=num_stages)
    )
    for layer in layers:
        assert torch.allclose(feats.path_tokens_proj[layer], surgery[layer], atol=ATOL), layer
        assert torch.allclose(feats.tokens[layer], original[layer], atol=ATOL), layer
    assert not torch.allclose(feats.tokens[1], clean.tokens[1], atol=1e-3)
    assert torch.equal(feats.tokens[tiny.num_layers], clean.tokens[tiny.num_layers])


@torch.no_grad()
def test_visual_prompts_adaclip_style(tiny, images):
    gen = torch.Generator().manual_seed(2)
    n, width = 3, tiny.width
    prompts = {1: torch.randn(n, width, generator=gen), 2: torch.randn(2, n, width, generator=gen)}
    prompts[3] = torch.randn(n, width, generator=gen)
    feats = tiny.encode_image(images, layers=(2, 5), visual_prompts=prompts)
    visual = tiny.model.visual
    x = embed(visual, images)
    for i, blk in enumerate(visual.transformer.resblocks, 1):
        if i in prompts:
            p = prompts[i].expand(2, -1, -1)
            x = torch.cat([x, p], 1) if i == 1 else torch.cat([x[:, :-n], p], 1)
        x = blk(x)
        if i in (2, 5):
            assert torch.allclose(feats.tokens[i], x[:, :-n], atol=ATOL)
    assert torch.allclose(feats.pooled, visual.ln_post(x[:, 0]) @ visual.proj, atol=ATOL)


def test_gradients_reach_visual_prompts(tiny, images):
    prompt = torch.zeros(2, tiny.width, requires_grad=True)
    feats = tiny.encode_image(images, layers=(2,), visual_prompts={1: prompt})
    (feats.pooled.sum() + feats.tokens[2].sum()).backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0


@torch.no_grad()
def test_autocast_returns_float32_close_to_fp32(tiny, images):
    path = AttnPath(variant="staged", num_stages=3)
    full = tiny.encode_image(images, layers=(3, -1), attn_path=path)
    half = tiny.encode_image(images, layers=(3, -1), attn_path=path, autocast=True)
    for a, b in zip(all_tensors(full), all_tensors(half), strict=True):
        assert b.dtype == torch.float32 and torch.isfinite(b).all()
        assert F.cosine_similarity(a.flatten(1), b.flatten(1)).min() > 0.99
    text = tiny.encode_text(["a photo of a scratch"], autocast=True)
    assert text.dtype == torch.float32
    assert F.cosine_similarity(text, tiny.encode_text(["a photo of a scratch"])).item() > 0.99
    windows = torch.arange(4).view(1, 4)
    assert tiny.encode_windows(images, windows, autocast=True).dtype == torch.float32


# ------------------------------------------------------------------------------------ image size
def test_image_size_override_equals_open_clip_resize(tiny, weights_file, images):
    size = tiny.image_size + 2 * tiny.patch_size
    bb = load_clip("zsad-tiny", weights_file, image_size=size)
    reference = open_clip.create_model("zsad-tiny", force_image_size=size)
    open_clip.load_checkpoint(reference, str(weights_file))  # open_clip's own bicubic + antialias resize
    big = F.interpolate(images, size=size, mode="bilinear")
    with torch.no_grad():
        assert torch.allclose(bb.encode_image(big).pooled, reference.encode_image(big), atol=ATOL)
    grid = size // tiny.patch_size
    assert bb.image_size == size and bb.grid_size == (grid, grid)
    assert tuple(bb.model.visual.image_size) == (size, size) and tuple(bb.model.visual.grid_size) == (
        grid,
        grid,
    )
    assert bb.model.visual.positional_embedding.shape[0] == grid * grid + 1
    assert bb.weights_id.endswith("+bicubic-aa") and bb.weights_id != tiny.weights_id


def test_bilinear_resize_matches_hand_interpolation(tiny, weights_file):
    size = tiny.image_size + 3 * tiny.patch_size
    bb = load_clip("zsad-tiny", weights_file, image_size=size, interpolation="bilinear", antialias=False)
    old = tiny.model.visual.positional_embedding.detach().double()
    g0, g1 = tiny.grid_size[0], size // tiny.patch_size
    m = torch.from_numpy(bilinear_matrix(g0, g1))
    grid = old[1:].reshape(g0, g0, -1)
    expected = torch.einsum("ia,jb,abc->ijc", m, m, grid).reshape(g1 * g1, -1)
    new = bb.model.visual.positional_embedding.detach().double()
    assert torch.equal(new[0], old[0])  # CLS row kept as is
    assert torch.allclose(new[1:], expected, atol=1e-6)
    assert bb.weights_id.endswith("+bilinear")


def test_resize_never_mutates_the_loaded_parameter():
    model = open_clip.create_model("zsad-tiny")
    old = model.visual.positional_embedding
    state = model.state_dict()
    snapshot = old.detach().clone()
    patch = CONFIG["vision_cfg"]["patch_size"]
    size = CONFIG["vision_cfg"]["image_size"] + 2 * patch
    zb.set_image_size(model, size)
    assert model.visual.positional_embedding is not old
    assert torch.equal(old, snapshot) and torch.equal(state["visual.positional_embedding"], snapshot)
    assert model.visual.positional_embedding.shape[0] == (size // patch) ** 2 + 1
    with pytest.raises(ValueError, match="multiple of the patch size"):
        zb.set_image_size(model, size + 1)


# ------------------------------------------------------------------------------------ encode_windows
@torch.no_grad()
def test_window_with_all_patches_equals_pooled(tiny, images):
    n = tiny.grid_size[0] * tiny.grid_size[1]
    pooled = tiny.encode_image(images).pooled
    windows = torch.stack([torch.arange(n), torch.randperm(n, generator=torch.Generator().manual_seed(0))])
    out = tiny.encode_windows(images, windows)
    assert out.shape == (2, 2, tiny.embed_dim)
    assert torch.allclose(out[:, 0], pooled, atol=ATOL) and torch.allclose(out[:, 1], pooled, atol=1e-4)


@torch.no_grad()
def test_windows_match_manual_masking_and_chunking(tiny, images):
    visual, gw = tiny.model.visual, tiny.grid_size[1]
    windows = torch.tensor(
        [[r * gw + c for r in (i, i + 1) for c in (j, j + 1)] for i, j in [(0, 0), (3, 5), (7, 2)]]
    )
    out = tiny.encode_windows(images, windows)
    x = visual.conv1(images).flatten(2).transpose(1, 2) + visual.positional_embedding[1:]
    cls = (visual.class_embedding + visual.positional_embedding[0]).expand(2, 1, -1)
    for k, window in enumerate(windows):
        seq = visual.ln_pre(torch.cat([cls, x[:, window]], dim=1))
        seq = visual.transformer(seq)  # open_clip's own transformer forward
        assert torch.allclose(out[:, k], visual.ln_post(seq[:, 0]) @ visual.proj, atol=ATOL)
    assert torch.allclose(tiny.encode_windows(images, windows, chunk=1), out, atol=ATOL)
    with pytest.raises(ValueError, match="patch indices"):
        tiny.encode_windows(images, windows + 10_000)


# ------------------------------------------------------------------------------------ encode_text
def reference_text(model, ids, prompts=None, start=1, embeddings=None):
    x = model.token_embedding(ids) if embeddings is None else embeddings
    x = x + model.positional_embedding
    for i, blk in enumerate(model.transformer.resblocks, 1):
        if prompts and i in prompts:
            p = prompts[i].expand(ids.shape[0], -1, -1)
            x = torch.cat([x[:, :start], p, x[:, start + p.shape[1] :]], dim=1)
        x = blk(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ model.text_projection


@torch.no_grad()
def test_encode_text_equals_open_clip(tiny):
    texts = ["a photo of a flawless striped texture", "a scratched metal disc", "x"]
    ids = tiny.tokenize(texts)
    expected = tiny.model.encode_text(ids)
    assert torch.allclose(tiny.encode_text(texts), expected, atol=ATOL)
    assert torch.allclose(tiny.encode_text(ids), expected, atol=ATOL)
    embeddings = tiny.model.token_embedding(ids)
    assert torch.allclose(tiny.encode_text(ids, token_embeddings=embeddings), expected, atol=ATOL)


@torch.no_grad()
def test_deep_prompts_overwrite_positions(tiny):
    ids = tiny.tokenize(["a photo of a damaged object", "a photo of a flawless object"])
    gen = torch.Generator().manual_seed(3)
    prompts = {
        2: torch.randn(4, tiny.text_width, generator=gen),
        3: torch.randn(2, 4, tiny.text_width, generator=gen),
    }
    got = tiny.encode_text(ids, deep_prompts=prompts, prompt_start=1)
    assert torch.allclose(got, reference_text(tiny.model, ids, prompts, 1), atol=ATOL)
    shifted = tiny.encode_text(ids, deep_prompts=prompts, prompt_start=2)
    assert torch.allclose(shifted, reference_text(tiny.model, ids, prompts, 2), atol=ATOL)
    assert not torch.allclose(got, tiny.encode_text(ids), atol=1e-3)


@torch.no_grad()
def test_overwriting_with_existing_activations_changes_nothing(tiny):
    ids = tiny.tokenize(["a photo of a damaged object"])
    model, block, start, n = tiny.model, 3, 1, 4
    x = model.token_embedding(ids) + model.positional_embedding
    for blk in model.transformer.resblocks[: block - 1]:
        x = blk(x, attn_mask=model.attn_mask)
    same = tiny.encode_text(ids, deep_prompts={block: x[:, start : start + n]}, prompt_start=start)
    assert torch.allclose(same, tiny.encode_text(ids), atol=ATOL)
    wrong_block = tiny.encode_text(ids, deep_prompts={block + 1: x[:, start : start + n]}, prompt_start=start)
    assert not torch.allclose(wrong_block, tiny.encode_text(ids), atol=1e-4)


def test_gradients_reach_text_prompts(tiny):
    ids = tiny.tokenize(["a photo of a damaged object"])
    prompt = torch.zeros(4, tiny.text_width, requires_grad=True)
    embeddings = tiny.model.token_embedding(ids).detach().requires_grad_(True)
    tiny.encode_text(ids, deep_prompts={2: prompt}, token_embeddings=embeddings).sum().backward()
    assert prompt.grad.abs().sum() > 0 and embeddings.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())


def test_bad_text_inputs(tiny):
    ids = tiny.tokenize(["a"])
    with pytest.raises(ValueError, match="do not fit"):
        tiny.encode_text(ids, deep_prompts={1: torch.zeros(tiny.context_length, tiny.text_width)})
    with pytest.raises(BackboneError, match="text block"):
        tiny.encode_text(ids, deep_prompts={tiny.num_text_layers + 1: torch.zeros(2, tiny.text_width)})
    with pytest.raises(ValueError, match="token_embeddings"):
        tiny.encode_text(ids, token_embeddings=torch.zeros(1, 3, tiny.text_width))


# ------------------------------------------------------------------------------------ loading weights
def _same_outputs(a: CLIPBackbone, b: CLIPBackbone, images) -> bool:
    with torch.no_grad():
        same_img = torch.allclose(a.encode_image(images).pooled, b.encode_image(images).pooled, atol=ATOL)
        same_txt = torch.allclose(a.encode_text(["a scratch"]), b.encode_text(["a scratch"]), atol=ATOL)
    return same_img and same_txt


def test_safetensors_roundtrip_and_weights_id(tiny, weights_file, images):
    bb = load_clip("zsad-tiny", weights_file)
    assert _same_outputs(bb, tiny, images)
    assert bb.weights_id == "sha256-" + hashlib.sha256(weights_file.read_bytes()).hexdigest()[:16]
    assert bb.pretrained == str(weights_file)


def test_nested_ddp_checkpoint_and_plain_bin(tiny, tmp_path, images):
    state = tiny.model.state_dict()
    nested = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, nested)
    assert _same_outputs(load_clip("zsad-tiny", nested), tiny, images)
    plain = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(state, plain)
    assert _same_outputs(load_clip("zsad-tiny", str(plain)), tiny, images)


def test_fp16_file_as_the_trainer_writes_it(tiny, tmp_path, images):
    model = open_clip.create_model("zsad-tiny")
    model.load_state_dict(tiny.model.state_dict())
    path = tmp_path / "half.safetensors"
    save_model(model.half(), str(path))
    bb = load_clip("zsad-tiny", path)
    assert bb.model.visual.proj.dtype == torch.float32
    with torch.no_grad():
        cos = F.cosine_similarity(bb.encode_image(images).pooled, tiny.encode_image(images).pooled)
    assert cos.min() > 0.999


class _JitLike(torch.nn.Module):
    """An OpenAI-style TorchScript archive: the CLIP's modules and parameters plus the extra JIT tensors."""

    def __init__(self, clip) -> None:
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, param in clip.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, value in (("input_resolution", 128), ("context_length", 32), ("vocab_size", 49408)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.logit_scale


def test_openai_style_jit_archive(tiny, tmp_path, images):
    path = tmp_path / "ViT-tiny.pt"
    with pytest.warns(FutureWarning):  # torch.jit is deprecated upstream; OpenAI still ships these archives
        torch.jit.save(torch.jit.script(_JitLike(tiny.model)), str(path))
    bb = load_clip("zsad-tiny", path)
    assert bb.quick_gelu and isinstance(
        bb.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU
    )
    assert bb.weights_id.endswith("+quickgelu")
    assert _same_outputs(load_clip("zsad-tiny", path, quick_gelu=False), tiny, images)


def test_quick_gelu_changes_the_activation(tiny, weights_file, images):
    quick = load_clip("zsad-tiny", weights_file, quick_gelu=True)
    assert quick.quick_gelu and not tiny.quick_gelu
    assert not _same_outputs(quick, tiny, images)


def test_pickle_needing_full_unpickling_is_refused(tiny, tmp_path):
    path = tmp_path / "with_args.pth"
    torch.save({"state_dict": tiny.model.state_dict(), "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(BackboneError, match=r"argparse.Namespace.*weights_only=False"):
        load_clip("zsad-tiny", path)


def test_file_errors(tiny, tmp_path):
    missing = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(BackboneError, match=str(missing)):
        load_clip("zsad-tiny", missing)
    with pytest.raises(BackboneError, match="known tag"):
        load_clip("zsad-tiny", "laion2b")
    partial = {k: v.contiguous() for k, v in tiny.model.state_dict().items() if k != "visual.proj"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(BackboneError, match="does not fit model 'zsad-tiny'"):
        load_clip("zsad-tiny", tmp_path / "partial.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read weights file"):
        load_clip("zsad-tiny", tmp_path / "junk.pt")


def test_unknown_and_unsupported_models():
    with pytest.raises(BackboneError, match="list_models"):
        load_clip("ViT-Nope-99")
    with pytest.raises(BackboneError, match="not supported"):
        load_clip("RN50", "random")


def test_offline_tag_gives_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(BackboneError) as info:
        load_clip("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path))
    message = str(info.value)
    assert time.time() - start < 10
    for needle in (
        "'ViT-B-32'",
        "laion2b_s34b_b79k",
        "open_clip_pytorch_model.bin",
        str(tmp_path),
        "pretrained=",
    ):
        assert needle in message


def test_cached_tag_loads_offline(tiny, monkeypatch, tmp_path, images):
    repo, revision = "zsad/fake-tiny", "0123456789abcdef0123456789abcdef01234567"
    folder = tmp_path / "models--zsad--fake-tiny"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    torch.save(tiny.model.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    real = open_clip.get_pretrained_cfg

    def fake_cfg(name, tag):
        return (
            {"hf_hub": f"{repo}/", "quick_gelu": True}
            if (name, tag) == ("zsad-tiny", "faketag")
            else real(name, tag)
        )

    monkeypatch.setattr(open_clip, "get_pretrained_cfg", fake_cfg)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb = load_clip("zsad-tiny", "faketag", cache_dir=str(tmp_path))
    assert bb.weights_id == "faketag+quickgelu" and bb.quick_gelu
    assert _same_outputs(
        load_clip("zsad-tiny", "faketag", cache_dir=str(tmp_path), quick_gelu=False), tiny, images
    )


def test_shipped_tiny_weights(tiny, weights_file, monkeypatch, tmp_path, images):
    monkeypatch.setattr(zb, "WEIGHTS_FILE", tmp_path / "zsad-tiny.safetensors")
    with pytest.raises(BackboneError, match="python -m zsad.tiny train"):
        load_clip("zsad-tiny")
    monkeypatch.setattr(zb, "WEIGHTS_FILE", weights_file)
    bb = load_clip("zsad-tiny")
    assert bb.pretrained is None and bb.weights_id.startswith("sha256-")
    assert _same_outputs(bb, tiny, images)


def test_random_init_is_seeded_and_warns_without_pretrained(tmp_path):
    a, b = load_clip("zsad-tiny", "random", seed=5), load_clip("zsad-tiny", "random", seed=5)
    c = load_clip("zsad-tiny", "random", seed=6)
    assert a.weights_id == "random-5" and c.weights_id == "random-6"
    assert torch.equal(a.model.visual.proj, b.model.visual.proj)
    assert not torch.equal(a.model.visual.proj, c.model.visual.proj)
    torch.manual_seed(0)
    drawn = load_clip("zsad-tiny", "random")
    torch.manual_seed(0)
    assert load_clip("zsad-tiny", "random").weights_id == drawn.weights_id
    copy = tmp_path / "zsad-tiny-copy.json"
    copy.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(copy)
    with pytest.warns(UserWarning, match="random init"):
        load_clip("zsad-tiny-copy")


def test_weights_label_says_where_weights_came_from(tiny_random):
    assert tiny_random.weights_label == "random"
    if zb.WEIGHTS_FILE.exists():
        shipped = zb.load_clip("zsad-tiny")
        assert shipped.weights_label.startswith("shipped zsad-tiny weights (sha256-")
