"""Forward passes over open_clip's CLIP, written from the model's own submodules (used by ``zsad.backbone``;
import from there). Pure functions: nothing here keeps state or changes a parameter or an earlier tensor.

All sequences are batch-first (B, L, W). Blocks are 1-based; "layer l" is the residual stream after block l.
A block is open_clip's ``ResidualAttentionBlock``: x + ls_1(attn(ln_1 x)), then + ls_2(mlp(ln_2 x)).

The second attention path, as read in the official code (zqhang/AnomalyCLIP 45ed4dd
``AnomalyCLIP_lib/AnomalyCLIP.py``; ByChelsea/CLIP-AD f004973 ``open_clip/transformer.py``): the block's own
``in_proj`` gives q, k, v per head; the path's attention weights are softmax(a bᵀ · d_head^-0.5) with
(a, b) = (q, k), (q, q), (k, k) or (v, v); the values are always v, then the block's ``out_proj``. Both
repositories only implement v-v (they set q = k = v and multiply by v); q-q and k-k follow AnomalyCLIP's DPAM
ablation (docs/methods.md §12.1) with v kept as the values. The path never runs the FFN and always reads LN_1
of the original stream's block input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer, text_global_pool
from torch import Tensor, nn

_MODE_PAIRS = {"qk": (0, 1), "qq": (0, 0), "kk": (1, 1), "vv": (2, 2)}  # indices into (q, k, v)


@dataclass(frozen=True)
class AttnPath:
    """Second attention path run beside the original one (CLIP Surgery family;
    docs/methods.md §4.1, §5.1, §12.1).

    mode: which similarity gives the path's attention weights: "qk" (plain attention, a sanity mode), "qq",
        "kk" or "vv" (AnomalyCLIP's DPAM default and CLIP-AD). Values are always v.
    variant: "residual" (AnomalyCLIP): at ``start_block`` the path is the block input plus the path attention;
        at later blocks it adds the path attention of LN_1(original input). Before ``start_block`` the path
        tokens are a copy of the original tokens (what AnomalyCLIP returns for those layers).
        "staged" (CLIP-AD SDP): every block computes the path attention; at stage starts (1-based blocks
        c + 1 with c % (L / num_stages) == 0, i.e. 1, 4, 7, 10 for L = 12) the path is reset to that output
        alone, inside a stage it accumulates. ``start_block`` is ignored.
    replace_cls: write the original stream's CLS (same layer) into the path's CLS before ``ln_post`` +
        ``proj``, as CLIP-AD does. None means True for "staged" and False for "residual".
    legacy_aliasing: reproduce the official in-place aliasing (docs/methods.md §4.6, §5.6, pitfall 1), only
        for bit-parity with released checkpoints. "residual" (AnomalyCLIP before 2a7c886): the path tokens of
        every stored layer >= start_block - 1 equal the final path. "staged" (CLIP-AD): stored original
        tokens of layer l < L also hold block l+1's attention residual, and a path layer inside a stage holds
        the path at the end of its stage.
    """

    mode: str = "vv"
    variant: str = "residual"
    start_block: int = 6
    num_stages: int = 4
    legacy_aliasing: bool = False
    replace_cls: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in _MODE_PAIRS:
            raise ValueError(f"AttnPath.mode must be one of {sorted(_MODE_PAIRS)}, got {self.mode!r}")
        if self.variant not in ("residual", "staged"):
            raise ValueError(f"AttnPath.variant must be 'residual' or 'staged', got {self.variant!r}")
        if self.start_block < 1 or self.num_stages < 1:
            raise ValueError("AttnPath.start_block and num_stages are 1-based counts and must be >= 1")

    @property
    def cls_from_original(self) -> bool:
        return self.variant == "staged" if self.replace_cls is None else self.replace_cls


@dataclass
class ImageFeatures:
    """Output of ``CLIPBackbone.encode_image``. Dict keys are 1-based layers (negative requests resolved).

    pooled: (B, D) ln_post(CLS) @ proj after the last block, not normalised.
    tokens: layer -> (B, 1+N, W) raw residual stream after that block (CLS at 0).
    tokens_proj: layer -> (B, 1+N, D) ln_post + proj of ``tokens``.
    path_tokens / path_tokens_proj: the same for the second path (empty without an ``AttnPath``).
    Every tensor is a fresh float32 tensor, never a view of another.
    """

    pooled: Tensor
    tokens: dict[int, Tensor]
    tokens_proj: dict[int, Tensor]
    path_tokens: dict[int, Tensor]
    path_tokens_proj: dict[int, Tensor]


def attention(
    attn: nn.MultiheadAttention,
    x: Tensor,
    modes: tuple[str, ...],
    mask: Tensor | None = None,
    queries: int | None = None,
):
    """Self-attention with ``attn``'s weights on batch-first x, one output per mode (see module docstring):
    softmax(a bᵀ / sqrt(d_head)) v per head, then the shared out-projection. "qk" is nn.MultiheadAttention.
    q, k, v are projected once however many modes are asked for. ``queries``: only the first n rows of the
    output (keys and values still come from every token)."""
    batch, length, width = x.shape
    heads = attn.num_heads
    rows = length if queries is None else queries
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    qkv = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    mask = None if mask is None else mask.to(qkv.dtype)[..., :rows, :]
    outs = []
    for mode in modes:
        a, b = _MODE_PAIRS[mode]
        out = F.scaled_dot_product_attention(qkv[a][..., :rows, :], qkv[b], qkv[2], attn_mask=mask)
        outs.append(attn.out_proj(out.transpose(1, 2).reshape(batch, rows, width)))
    return outs


def attention_weights(attn: nn.MultiheadAttention, x: Tensor, mode: str) -> Tensor:
    """The weights softmax(a bᵀ / sqrt(d_head)) that :func:`attention` applies to v for ``mode``, per head:
    (B, heads, L, L), rows summing to 1. For looking at the DPAM strategies (AnomalyCLIP's DPAM,
    docs/methods.md §5.1, §12.1); the forward itself uses the fused kernel of :func:`attention`."""
    if mode not in _MODE_PAIRS:
        raise ValueError(f"mode must be one of {sorted(_MODE_PAIRS)}, got {mode!r}")
    batch, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    qkv = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    a, b = _MODE_PAIRS[mode]
    return (qkv[a] @ qkv[b].transpose(-1, -2) * (width // heads) ** -0.5).softmax(dim=-1)


def mlp_residual(block: ResidualAttentionBlock, x: Tensor) -> Tensor:
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def block_forward(block: ResidualAttentionBlock, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """One standard CLIP block, as open_clip's ResidualAttentionBlock."""
    x = x + block.ls_1(attention(block.attn, block.ln_1(x), ("qk",), mask)[0])
    return mlp_residual(block, x)


def cls_block_forward(block: ResidualAttentionBlock, x: Tensor) -> Tensor:
    """A block whose output is read only at CLS (the last block when no patch token of it is used): keys and
    values from every token, the query, residual and MLP for CLS alone -> (B, 1, W). Equals row 0 of
    :func:`block_forward` up to float summation order, at about 1/length of its query-side cost."""
    a = attention(block.attn, block.ln_1(x), ("qk",), queries=1)[0]
    return mlp_residual(block, x[:, :1] + block.ls_1(a))


def embed_image(visual: VisionTransformer, images: Tensor) -> Tensor:
    """Patch embedding + CLS + positional embedding + ln_pre -> (B, 1+N, W). Patch dropout is skipped: it is
    a training-time op and the backbone always runs in eval mode."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(x)


def project(visual: VisionTransformer, x: Tensor) -> Tensor:
    return visual.ln_post(x) @ visual.proj


def _batched(prompts: Tensor, x: Tensor, what: str) -> Tensor:
    """(n, W) or (B, n, W) prompts -> (B, n, W) in x's dtype."""
    prompts = prompts.to(x.dtype)
    prompts = prompts.expand(x.shape[0], -1, -1) if prompts.dim() == 2 else prompts
    if prompts.dim() != 3 or prompts.shape[0] != x.shape[0] or prompts.shape[2] != x.shape[2]:
        raise ValueError(f"{what} must be (n, {x.shape[2]}) or ({x.shape[0]}, n, {x.shape[2]})")
    return prompts


def place_prompts(x: Tensor, prompts: Tensor, current: int) -> tuple[Tensor, int]:
    """AdaCLIP visual prompts (docs/methods.md §6.1): appended at the end of the sequence the first time
    (current = 0), the last ``current`` tokens replaced afterwards. Returns the sequence and the prompt
    count."""
    prompts = _batched(prompts, x, "visual prompts")
    if current and prompts.shape[1] != current:
        raise ValueError(f"visual prompts must keep one length; got {prompts.shape[1]} after {current}")
    return torch.cat([x[:, : x.shape[1] - current], prompts], dim=1), prompts.shape[1]


def overwrite(x: Tensor, prompts: Tensor, start: int) -> Tensor:
    """Replace sequence positions start .. start+n-1 by ``prompts`` ((n, W) or (N, n, W)), out of place."""
    prompts = _batched(prompts, x, "deep prompts")
    end = start + prompts.shape[1]
    if start < 0 or end > x.shape[1]:
        raise ValueError(
            f"deep prompts at positions {start}..{end - 1} do not fit a sequence of {x.shape[1]}"
        )
    return torch.cat([x[:, :start], prompts, x[:, end:]], dim=1)


def stage_starts(num_layers: int, num_stages: int) -> set[int]:
    """1-based blocks where CLIP-AD resets its path: 0-based c with c % (L / S) == 0 (its exact test)."""
    return {c + 1 for c in range(num_layers) if c % (num_layers / num_stages) == 0}


def vision_forward(
    visual: VisionTransformer,
    images: Tensor,
    taps: list[int],
    path: AttnPath | None = None,
    prompts: dict[int, Tensor] | None = None,
) -> ImageFeatures:
    """The one image forward: original stream, optional second path, optional visual prompts; stores clones
    of the requested layers (prompt tokens removed), then applies the legacy aliasing rules if asked."""
    blocks = visual.transformer.resblocks
    prompts = prompts or {}
    staged = path is not None and path.variant == "staged"
    legacy = path is not None and path.legacy_aliasing
    first = 1 if staged else (path.start_block if path is not None else len(blocks) + 1)
    starts = stage_starts(len(blocks), path.num_stages) if staged else {first}
    if prompts and path is not None and min(prompts) > first:
        raise ValueError("visual prompts must enter no later than the attention path's first block")
    x, p, n_prompt = embed_image(visual, images), None, 0
    tokens: dict[int, Tensor] = {}
    path_tokens: dict[int, Tensor] = {}
    in_stage: list[int] = []  # legacy staged: stored path layers that CLIP-AD's in-place `+=` still reaches
    # Nothing reads the last block's patch tokens unless it is tapped or a second path runs: CLS only there.
    cls_only = len(blocks) not in taps and path is None
    for i, block in enumerate(blocks, 1):
        if i in prompts:
            x, n_prompt = place_prompts(x, prompts[i], n_prompt)
        if cls_only and i == len(blocks):
            x = cls_block_forward(block, x)
            break
        h = block.ln_1(x)
        if i >= first:
            outs = attention(block.attn, h, ("qk",) if path.mode == "qk" else ("qk", path.mode))
            a, extra = outs[0], block.ls_1(outs[-1])
            if i in starts:
                p, in_stage = (extra if staged else x + extra), []
            else:
                p = p + extra
                for layer in in_stage if legacy and staged else ():
                    path_tokens[layer] = p[:, : p.shape[1] - n_prompt].clone()
        else:
            a = attention(block.attn, h, ("qk",))[0]
        x = x + block.ls_1(a)
        if legacy and staged and i - 1 in tokens:  # CLIP-AD's `x_ori += attn` reaches the stored layer i-1
            tokens[i - 1] = x[:, : x.shape[1] - n_prompt].clone()
        x = mlp_residual(block, x)
        if i in taps:
            tokens[i] = x[:, : x.shape[1] - n_prompt].clone()
            if path is not None:
                src = x if p is None else p
                path_tokens[i] = src[:, : src.shape[1] - n_prompt].clone()
                in_stage.append(i)
    if legacy and not staged:  # AnomalyCLIP's `x += x_res` reaches every stored path tensor from start-1 on
        for layer in [t for t in taps if t >= first - 1]:
            path_tokens[layer] = p[:, : p.shape[1] - n_prompt].clone()
    if path is not None and path.cls_from_original:
        path_tokens = {k: torch.cat([tokens[k][:, :1], v[:, 1:]], dim=1) for k, v in path_tokens.items()}
    return ImageFeatures(
        pooled=project(visual, x[:, 0]).float(),
        tokens={k: v.float() for k, v in tokens.items()},
        tokens_proj={k: project(visual, v).float() for k, v in tokens.items()},
        path_tokens={k: v.float() for k, v in path_tokens.items()},
        path_tokens_proj={k: project(visual, v).float() for k, v in path_tokens.items()},
    )


def window_forward(visual: VisionTransformer, images: Tensor, windows: Tensor, per_pass: int) -> Tensor:
    """WinCLIP token masking (docs/methods.md §2.1): the embedded sequence once, then CLS + each window's
    tokens through all blocks, ``per_pass`` windows at a time -> ln_post + proj of CLS, (B, K, D)."""
    x = embed_image(visual, images)
    index = torch.cat([windows.new_zeros(len(windows), 1), windows + 1], dim=1).to(x.device)
    outs = []
    for s in range(0, len(index), per_pass):
        part = index[s : s + per_pass]
        seq = x[:, part].reshape(-1, part.shape[1], x.shape[2])  # (B * k, 1 + n, W)
        *body, last = visual.transformer.resblocks
        for block in body:
            seq = block_forward(block, seq)
        seq = cls_block_forward(last, seq)  # only each window's CLS is read
        outs.append(project(visual, seq[:, 0]).view(images.shape[0], len(part), -1))
    return torch.cat(outs, dim=1)


def text_forward(
    model: nn.Module,
    ids: Tensor,
    prompts: dict[int, Tensor] | None = None,
    prompt_start: int = 1,
    token_embeddings: Tensor | None = None,
) -> Tensor:
    """open_clip's CLIP text tower with per-block position overwrite (docs/methods.md §5.2, §6.1, pitfall 12):
    embeddings (or ``token_embeddings``) + positions, causal blocks, ln_final, EOT pooling, projection."""
    prompts = prompts or {}
    length = ids.shape[1]
    mask = None if model.attn_mask is None else model.attn_mask[:length, :length]
    x = model.token_embedding(ids) if token_embeddings is None else token_embeddings
    x = x + model.positional_embedding[:length].to(x.dtype)
    for i, block in enumerate(model.transformer.resblocks, 1):
        if i in prompts:
            x = overwrite(x, prompts[i], prompt_start)
        x = block_forward(block, x, mask)
    x = model.ln_final(x)
    pool = getattr(model, "text_pool_type", "argmax")
    x = text_global_pool(x, ids, pool, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x if proj is None else x @ proj
