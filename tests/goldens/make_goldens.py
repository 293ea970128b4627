"""Cut the oracle drivers' outputs down to the golden files of tests/goldens/ (docs/goldens.md).

    python tests/goldens/make_goldens.py --oracles /path/to/golden/out

Reads ``<oracles>/<method>.npz`` and the checkpoints the drivers wrote; needs no official code. Small arrays
are kept whole; an array of more than WHOLE_LIMIT values keeps SAMPLES values at flat positions drawn from
``default_rng(crc32(name))``, with the positions and the shape. The input images and masks go once into
inputs.npz in fp16, which holds them exactly (the golden drivers round their inputs through fp16 for that).
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
WHOLE_LIMIT = 8192
SAMPLES = 2048
INPUTS = ("input_images", "fs_ref_images")
LAYERS_L, LAYERS_B = (6, 12, 18, 24), (3, 6, 9, 12)
# AdaCLIP's official dynamic text prompts have the embedding width, so it needs text width == embed dim
CONFIGS = {
    "aprilgan": "ViT-golden-L-14",
    "anomalyclip": "ViT-golden-L-14",
    "adaclip": "ViT-golden-L-14-ada",
    "clipad": "ViT-golden-B-16",
    "winclip": "ViT-golden-B-16",
}
# AnomalyCLIP's prompt learner saves projections its forward never uses (1.8 MB here): left out.
UNUSED = ("compound_prompt_projections.",)
FINGERPRINT_KEYS = (
    "visual.conv1.weight",
    "token_embedding.weight",
    "text_projection",
    "ln_final.weight",
    "visual.ln_post.bias",
)

# golden name -> (oracle npz, checkpoint (relative to the oracles folder, key or "flat"; (None, None) for a
# training-free method), arrays kept)
GOLDENS = {
    "aprilgan": (
        "aprilgan",
        ("checkpoints/aprilgan/epoch_3.pth", "trainable_linearlayer"),
        [
            "input_images",
            "class_names",
            "visual_pos_embed",
            "text_features",
            "image_features",
            "token_logits",
            "anomaly_maps",
            "image_scores",
            "fs_ref_images",
            "fs_class_names",
            "fs_token_min_dist",
            "fs_anomaly_maps",
            "fs_image_scores",
            "fs_text_probs",
        ]
        + [f"{stage}_L{layer}_img0" for layer in LAYERS_L for stage in ("patch_tokens_raw", "linear_out")]
        + [f"fs_memory_unit_L{layer}" for layer in LAYERS_L],
    ),
    "clipad": (
        "clipad",
        ("checkpoints/clipad/epoch_5.pth", "linear_layers"),
        ["input_images", "class_names", "text_features", "sdp_surgery_map_abnormal"]
        + [f"{stage}_L{layer}" for layer in LAYERS_B for stage in ("surgery_features", "ori_tokens")]
        + [f"sdpp_linear_out_L{layer}" for layer in LAYERS_B]
        + [
            f"{tag}_{stage}"
            for tag in ("sdp", "sdpp")
            for stage in (
                "anomaly_maps_presmooth",
                "anomaly_maps",
                "pr_sp0",
                "pr_sp1",
                "image_scores_groupnorm",
            )
        ],
    ),
    "anomalyclip": (
        "anomalyclip",
        ("checkpoints/anomalyclip/epoch_15.pth", "prompt_learner"),
        [
            "input_images",
            "class_names",
            "visual_pos_embed_after_test",
            "text_features_raw",
            "text_features",
            "image_features_raw",
            "patch_features_L24",
            "token_probs_L24",
            "similarity_map_abnormal",
            "anomaly_maps_presmooth",
            "anomaly_maps",
            "image_scores",
        ]
        + [f"extra_token_probs_L{layer}" for layer in LAYERS_L],
    ),
    "adaclip": (
        "adaclip",
        ("checkpoints/adaclip/adaclip_oracle.pth", "flat"),
        [
            "input_images",
            "class_names",
            "visual_pos_embed",
            "dynamic_visual_prompts",
            "dynamic_text_prompts",
            "image_features_pooled",
            "proj_cls_tokens",
            "text_features",
            "token_logits",
            "kmeans_labels",
            "hsf_feature",
            "anomaly_maps_presmooth",
            "anomaly_maps",
            "image_scores",
        ]
        + [
            f"{stage}_L{layer}_img0"
            for layer in LAYERS_L
            for stage in ("patch_tokens_raw", "proj_patch_tokens")
        ],
    ),
    # anomalib's WinClipModel (no official WinCLIP exists): zero-shot per image's class, few-shot k=2
    "winclip": (
        "winclip",
        (None, None),
        [
            "input_images",
            "fs_ref_images",
            "class_names",
            "fs_class_names",
            "visual_pos_embed",
            "text_embeddings_unit",
            "image_embeddings",
            "patch_embeddings",
            "image_scores",
            "zs_grid_image",
            "zs_grid",
            "anomaly_maps",
            "fs_ref_patch_embeddings",
            "fs_few_shot_grid",
            "fs_anomaly_maps",
            "fs_image_scores",
        ]
        + [
            f"{stage}_{scale}"
            for scale in (2, 3)
            for stage in ("window_embeddings", "zs_grid", "fs_ref_window_embeddings")
        ],
    ),
}


def cut(name: str, value: np.ndarray, out: dict[str, np.ndarray], sample_key: str | None = None) -> None:
    """Store ``value`` whole, or as a seeded sample of its flat values (positions drawn from ``sample_key``,
    default the name: a parameter's gradient and value after the step share their positions)."""
    if value.dtype.kind != "f" or value.size <= WHOLE_LIMIT:
        out[name] = value
    else:
        rng = np.random.default_rng(zlib.crc32((sample_key or name).encode("utf-8")))
        index = np.sort(rng.choice(value.size, SAMPLES, replace=False)).astype(np.int32)
        out[f"{name}.index"], out[f"{name}.value"] = index, value.reshape(-1)[index].astype(np.float32)
        out[f"{name}.shape"] = np.array(value.shape, dtype=np.int64)


def store_input(name: str, value: np.ndarray) -> str:
    """Put an input array into inputs.npz (shared by the goldens of one image size) in fp16, which holds the
    golden drivers' inputs exactly (they round them through fp16 for this); return its name there."""
    half = value.astype(np.float16)
    if not np.array_equal(half.astype(value.dtype), value):
        raise SystemExit(f"{name} is not exact in fp16: make it with the golden drivers (docs/goldens.md)")
    path = HERE / "inputs.npz"
    stored = dict(np.load(path)) if path.is_file() else {}
    if name in stored and not np.array_equal(stored[name], half):
        raise SystemExit(f"{name} differs from the one in inputs.npz: the goldens must share their inputs")
    stored[name] = half
    np.savez_compressed(path, **stored)
    return name


def make(oracles: Path, golden: str) -> Path:
    source, (checkpoint, layout), keys = GOLDENS[golden]
    with np.load(oracles / f"{source}.npz") as blob:
        arrays = {k: blob[k] for k in blob.files}
    meta = json.loads(str(arrays["meta_json"]))
    for layer in LAYERS_L if "fs_memory_L6" in arrays else ():
        # zsad's memory bank keeps unit rows; the official memory raw tokens (its cosine normalises them)
        memory = arrays[f"fs_memory_L{layer}"].astype(np.float64)
        arrays[f"fs_memory_unit_L{layer}"] = (memory / np.linalg.norm(memory, axis=1, keepdims=True)).astype(
            np.float32
        )
    if "text_embeddings" in arrays:
        # anomalib keeps the un-normalised mean of the sentence embeddings; its cosine normalises it, zsad
        # stores the unit vector: compare directions
        text = arrays["text_embeddings"].astype(np.float64)
        unit = text / np.linalg.norm(text, axis=-1, keepdims=True)
        arrays["text_embeddings_unit"] = unit.astype(np.float32)
    out: dict[str, np.ndarray] = {}
    inputs = {}
    for key in keys:
        if key in INPUTS:
            inputs[key] = store_input(f"{key}_{arrays[key].shape[-1]}", arrays[key])
        else:
            cut(key, arrays[key], out)
    inputs["input_masks"] = store_input(
        f"input_masks_{arrays['input_masks'].shape[-1]}", arrays["input_masks"]
    )
    state = {}
    if checkpoint is not None:
        state = torch.load(oracles / checkpoint, map_location="cpu", weights_only=True)
        state = state if layout == "flat" else state[layout]
    for key, tensor in state.items():
        if not key.startswith(UNUSED):
            out[f"ckpt/{key}"] = tensor.numpy()
    weights = torch.load(
        oracles / "weights" / f"{CONFIGS[golden]}_seed0.pt", map_location="cpu", weights_only=True
    )
    meta = {
        "oracle": meta,
        "config": CONFIGS[golden],
        "inputs": inputs,
        "fingerprint": {key: float(weights[key].double().sum()) for key in FINGERPRINT_KEYS},
        "checkpoint_layout": layout,
        "sampling": f"whole up to {WHOLE_LIMIT} values, else {SAMPLES} at default_rng(crc32(name)) positions",
    }
    out["meta_json"] = np.array(json.dumps(meta, default=str))
    path = HERE / f"{golden}.npz"
    np.savez_compressed(path, **out)
    return path


# training goldens: (method, checkpoint key or "flat", oracle images in the batch, loss arrays kept)
TRAIN = {
    "aprilgan_train": ("aprilgan", "trainable_linearlayer", [0, 1, 2], ["focal", "dice", "loss"]),
    "clipad_train": ("clipad-sdp-plus", "linear_layers", [0, 1, 2], ["focal", "dice", "loss"]),
    "anomalyclip_train": (
        "anomalyclip",
        "prompt_learner",
        [0, 1, 2],
        ["focal", "dice", "image_loss", "local_loss", "loss"],
    ),
    "adaclip_train": ("adaclip", "flat", [1], ["focal", "dice", "loss"]),
}


GOLDEN_OF = {
    "aprilgan": "aprilgan",
    "clipad-sdp-plus": "clipad",
    "anomalyclip": "anomalyclip",
    "adaclip": "adaclip",
}


def zsad_named(method: str, config: str, weights: Path, checkpoint: Path) -> dict[str, np.ndarray]:
    """An official-format file of learned tensors (initial, gradients or after the step) under zsad's names:
    read by ``from_official``'s own loader, which only renames and reshapes."""
    from zsad.methods.official import from_official

    size = 240 if "B-16" in config else 224
    detector = from_official(method, checkpoint=checkpoint, weights=weights, backbone=config, image_size=size)
    return {k: v.numpy() for k, v in detector.learned_state().items()}


def make_train(oracles: Path, golden: str) -> Path:
    import open_clip

    open_clip.add_model_config(HERE / "configs")
    method, layout, batch, losses = TRAIN[golden]
    config = CONFIGS[golden.removesuffix("_train")]
    weights = oracles / "weights" / f"{config}_seed0.pt"
    with np.load(oracles / f"{golden}.npz") as blob:
        arrays = {k: blob[k] for k in blob.files}
    folder = oracles / "checkpoints" / golden
    out: dict[str, np.ndarray] = {key: arrays[key] for key in losses}
    state = torch.load(folder / "init.pth", map_location="cpu", weights_only=True)
    state = {k: v.numpy() for k, v in (state if layout == "flat" else state[layout]).items()}
    with np.load(HERE / f"{GOLDEN_OF[method]}.npz") as test_golden:
        shared = {k[len("ckpt/") :]: test_golden[k] for k in test_golden.files if k.startswith("ckpt/")}
    # AdaCLIP's test and training drivers seed the same initialisation: store it once
    same_init = shared.keys() == {k for k in state if not k.startswith(UNUSED)} and all(
        np.array_equal(v, state[k]) for k, v in shared.items()
    )
    for key, value in state.items():
        if not same_init and not key.startswith(UNUSED):
            out[f"ckpt/{key}"] = value
    for stage in ("grads", "step1"):
        for key, value in zsad_named(method, config, weights, folder / f"{stage}.pth").items():
            cut(f"{stage}/{key}", value, out, sample_key=key)
            out[f"{stage}_norm/{key}"] = np.array(np.linalg.norm(value.astype(np.float64)), dtype=np.float64)
    inputs = {"input_images": f"input_images_{240 if 'B-16' in config else 224}"}
    inputs["input_masks"] = inputs["input_images"].replace("images", "masks")
    meta = {
        "oracle": json.loads(str(arrays["meta_json"])),
        "config": config,
        "checkpoint_layout": layout,
        "checkpoint_from": GOLDEN_OF[method] if same_init else None,
        "method": method,
        "batch": batch,
        "inputs": inputs,
        "labels": arrays["input_labels"].tolist(),
        "class_names": arrays["class_names"].tolist(),
    }
    out["meta_json"] = np.array(json.dumps(meta, default=str))
    path = HERE / f"{golden}.npz"
    np.savez_compressed(path, **out)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--oracles", type=Path, required=True, help="the golden drivers' $OUT folder")
    parser.add_argument("--only", nargs="*", default=sorted(GOLDENS) + sorted(TRAIN))
    args = parser.parse_args()
    for golden in args.only:
        path = make_train(args.oracles, golden) if golden in TRAIN else make(args.oracles, golden)
        print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
