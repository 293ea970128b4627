"""Train zsad-tiny: a small open_clip CLIP learned contrastively on SynthAD images with state captions.

The embedded world (design.md) needs a CLIP whose image and text towers relate "flawless"/"damaged" words
to what images show, so that every zero-shot method runs offline through the same code as ViT-L-14-336.

Objective = open_clip's symmetric InfoNCE (``ClipLoss``) on (image, caption) pairs, plus an auxiliary
zero-shot term: each image is classified against a normal and an abnormal caption of its own category with
the CLIP logits (cross-entropy). The auxiliary term is the "normal/abnormal head" lever from the prototype
(``shared/prototypes/tinyclip/README.md``) but lives in the CLIP embedding space itself, so nothing outside
open_clip's ``CLIP`` is needed at inference. Held-out categories never appear in training (images or words).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from zsad.tiny import CARD_FILE, CONFIG_DIR, DEFAULT_HELDOUT, TINY_DIR, WEIGHTS_FILE

# glibc keeps freed autograd buffers in per-thread arenas and RSS grows by ~40 MB/step on long CPU runs
# (prototype lesson); these settings must be in the environment before the process starts.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "1048576",
    "MALLOC_TRIM_THRESHOLD_": "1048576",
    "MALLOC_ARENA_MAX": "2",
}


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 850
    batch_size: int = 96
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 50
    images_per_category: int = 1200
    render_size: int = 224
    heldout: tuple[str, ...] = DEFAULT_HELDOUT
    p_defect: float = 0.5
    p_specific: float = 0.6
    aux_weight: float = 1.0
    # Objects carry small defects relative to the frame and were the weak spot of the first run: render
    # twice as many of them, and sometimes say "object" instead of the noun so that state words carry the
    # meaning on their own (zero-shot targets have nouns the text tower never saw).
    object_images_factor: float = 2.0
    p_generic_noun: float = 0.15
    threads: int = 2
    extra: dict = field(default_factory=dict)


def _render_chunk(args: tuple[int, int, str, int, int, int, float]) -> tuple[np.ndarray, list[dict]]:
    from zsad.data import synth

    seed, cat_index, category, n, size, out_size, p_defect = args
    rng = np.random.default_rng([seed, 7919, cat_index])
    images, _, infos = synth.sample_batch(rng, [category], n, size, p_defect=p_defect, out_size=out_size)
    return images, [{**info, "category": category} for info in infos]


def build_training_set(cfg: TrainConfig, image_size: int) -> tuple[np.ndarray, list[dict]]:
    """Render the seen categories once into memory (uint8), in two worker processes."""
    from zsad.data import synth

    seen = [c for c in synth.CATEGORIES if c not in cfg.heldout]
    jobs = [
        (
            cfg.seed,
            synth.CATEGORIES.index(c),
            c,
            round(cfg.images_per_category * (cfg.object_images_factor if c in synth.OBJECTS else 1.0)),
            cfg.render_size,
            image_size,
            cfg.p_defect,
        )
        for c in seen
    ]
    with Pool(2) as pool:
        parts = list(tqdm(pool.imap(_render_chunk, jobs), total=len(jobs), desc="render SynthAD train"))
    images = np.concatenate([p[0] for p in parts])
    infos = [info for p in parts for info in p[1]]
    return images, infos


def _generic_noun(rng: np.random.Generator, text: str, category: str, p: float) -> str:
    from zsad.data.synth import fix_articles

    return fix_articles(text.replace(category, "object")) if rng.random() < p else text


def _to_tensor(batch: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def _augment(rng: np.random.Generator, batch: np.ndarray) -> np.ndarray:
    """Flips and 90-degree turns: SynthAD textures and objects have no canonical orientation."""
    out = batch.copy()
    for i in range(len(out)):
        img = out[i]
        if rng.random() < 0.5:
            img = img[:, ::-1]
        if rng.random() < 0.5:
            img = img[::-1]
        out[i] = np.rot90(img, k=int(rng.integers(4)))
    return out


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(cfg: TrainConfig, out_dir: Path | None = None) -> dict:
    """Train from scratch; write ``zsad-tiny.safetensors`` (fp16) and the card into ``out_dir``."""
    import open_clip
    from safetensors.torch import save_model

    from zsad import backbone as zb  # registers the zsad-tiny config with open_clip
    from zsad.data import synth

    out_dir = Path(out_dir) if out_dir is not None else TINY_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)

    model = open_clip.create_model("zsad-tiny")
    tokenizer = open_clip.get_tokenizer("zsad-tiny")
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    mean = torch.tensor(zb.OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(zb.OPENAI_STD).view(1, 3, 1, 1)

    t_render = time.time()
    images, infos = build_training_set(cfg, image_size)
    render_seconds = time.time() - t_render

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    clip_loss = open_clip.ClipLoss()
    history: list[dict] = []
    model.train()
    t_train = time.time()
    bar = tqdm(range(cfg.steps), desc="train zsad-tiny")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = rng.integers(0, len(images), cfg.batch_size)
        batch = _to_tensor(_augment(rng, images[idx]), mean, std)
        chosen = [infos[i] for i in idx]
        captions = [
            _generic_noun(
                rng,
                synth.caption(rng, info["category"], info, p_specific=cfg.p_specific),
                info["category"],
                cfg.p_generic_noun,
            )
            for info in chosen
        ]
        # Auxiliary zero-shot pair per category in the batch: one normal and one generic abnormal caption.
        categories = sorted({info["category"] for info in chosen})
        pairs = [
            synth.caption(rng, c, {"defect": state}, p_specific=0.0)
            for c in categories
            for state in (None, "scratch")
        ]
        labels = torch.tensor([info["defect"] is not None for info in chosen], dtype=torch.long)
        which = torch.tensor([categories.index(info["category"]) for info in chosen])
        tokens = tokenizer(captions + pairs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            image_features = model.encode_image(batch, normalize=True).float()
            text_features = model.encode_text(tokens, normalize=True).float()
        n = cfg.batch_size
        scale = model.logit_scale.exp()
        loss_clip = clip_loss(image_features, text_features[:n], scale)
        pair_features = text_features[n:].reshape(len(categories), 2, -1)[which]  # (B, 2, D)
        aux_logits = scale * torch.einsum("bd,bkd->bk", image_features, pair_features)
        loss_aux = F.cross_entropy(aux_logits, labels)
        loss = loss_clip + cfg.aux_weight * loss_aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        history.append({"step": step, "loss": loss.item(), "clip": loss_clip.item(), "aux": loss_aux.item()})
        bar.set_postfix(loss=f"{loss.item():.3f}", aux=f"{loss_aux.item():.3f}")
    train_seconds = time.time() - t_train

    model.eval()
    weights = out_dir / WEIGHTS_FILE.name
    save_model(model.half(), str(weights), metadata={"format": "pt", "model": "zsad-tiny"})
    card = {
        "name": "zsad-tiny",
        "config": json.loads((CONFIG_DIR / "zsad-tiny.json").read_text()),
        "train": {**asdict(cfg), "heldout": list(cfg.heldout)},
        "heldout_categories": list(cfg.heldout),
        "seen_categories": [c for c in synth.CATEGORIES if c not in cfg.heldout],
        "data": f"SynthAD (zsad.data.synth, generator version {synth.SYNTH_VERSION}), "
        f"{len(images)} training images "
        f"rendered at {cfg.render_size}px and resized to {image_size}px",
        "render_seconds": round(render_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / cfg.steps, 3),
        "final_loss": float(np.mean([h["loss"] for h in history[-25:]])),
        "loss_curve": [round(h["loss"], 4) for h in history[:: max(1, cfg.steps // 100)]],
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "cpu_threads": cfg.threads,
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
    }
    (out_dir / CARD_FILE.name).write_text(json.dumps(card, indent=2) + "\n")
    return card
