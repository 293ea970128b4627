"""Stage-by-stage parity of ``zsad.methods.from_official`` with the official code's saved outputs.

The official repositories cannot run in CI, so ``../shared/oracles/`` runs them once on CPU with deterministic
random CLIP weights and saves inputs, intermediates, outputs and checkpoints (``$OUT/<method>.npz``,
``$OUT/checkpoints/...``, ``$OUT/weights/...``). This script loads the *same* weights file, checkpoint and
input tensors into zsad and prints max |diff| per stage. It needs only the saved files, never the official
code.

    python benchmarks/oracle_parity.py --oracles /path/to/oracle/out [--methods aprilgan clipad]

Exit status 1 when a final map or score differs by 1e-4 or more.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from zsad.methods import from_official

TOLERANCE = 1e-4
FINAL = (
    "anomaly_maps",
    "image_scores",
    "fs_anomaly_maps",
    "fs_image_scores",
    "sdp_anomaly_maps",
    "sdpp_anomaly_maps",
    "sdp_image_scores_groupnorm",
    "sdpp_image_scores_groupnorm",
)


class Stages(dict):
    """Records max |diff| per stage and prints each as soon as it is measured (long runs on a CPU)."""

    def __setitem__(self, stage: str, value: float) -> None:
        super().__setitem__(stage, value)
        bad = stage in FINAL and value >= TOLERANCE
        print(f"  {stage:32s} {value:.3e}{'  <-- over 1e-4' if bad else ''}", flush=True)


def diff(ours, theirs) -> float:
    a = ours.detach().float().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    return float(np.abs(a.astype(np.float64) - np.asarray(theirs, dtype=np.float64)).max())


def aprilgan(root: Path, z) -> dict[str, float]:
    detector = from_official(
        "aprilgan",
        checkpoint=root / "checkpoints/aprilgan/epoch_3.pth",
        weights=root / "weights/ViT-L-14-336_seed0.pt",
    )
    out = Stages()
    images = torch.from_numpy(z["input_images"])
    names = [str(c) for c in z["class_names"]]
    out["visual_pos_embed"] = diff(detector.backbone.model.visual.positional_embedding, z["visual_pos_embed"])
    out["text_features"] = diff(torch.stack([detector.text_features(c) for c in names]), z["text_features"])
    with torch.no_grad():
        feats = detector.extract_features(images)
        out["image_features"] = diff(feats["pooled"], z["image_features"])
        for layer in detector.layers:
            out[f"patch_tokens_raw_L{layer}_img0"] = diff(
                feats[f"tokens_{layer}"][0], z[f"patch_tokens_raw_L{layer}_img0"]
            )
        heads = detector.learned([feats[f"tokens_{layer}"][:, 1:] for layer in detector.layers])
        for layer, h in zip(detector.layers, heads, strict=True):
            out[f"linear_out_L{layer}_img0"] = diff(h[0], z[f"linear_out_L{layer}_img0"])
        text = detector._text_batch(names)
        logits = torch.stack(detector.layer_logits(feats, text), dim=1)  # (B, L, N, 2)
        grid = detector.backbone.grid_size
        logits = logits.transpose(2, 3).reshape(*logits.shape[:2], 2, *grid)
        out["token_logits"] = diff(logits, z["token_logits"])
        scores, maps = detector.predict_features(feats, names)
        out["anomaly_maps"] = diff(maps, z["anomaly_maps"])
        out["image_scores"] = diff(scores, z["image_scores"])
        # few-shot: 2 references, every test image scored as "bottle"
        fs_names = [str(c) for c in z["fs_class_names"]]
        detector.fit_few_shot(torch.from_numpy(z["fs_ref_images"]), ["bottle"] * len(z["fs_ref_images"]))
        for layer in detector.layers:
            memory = detector.memory.bank.memory("bottle", layer)
            ref = torch.nn.functional.normalize(torch.from_numpy(z[f"fs_memory_L{layer}"]), dim=-1)
            out[f"fs_memory_L{layer}"] = diff(memory, ref)
        tokens = {layer: feats[f"tokens_{layer}"][:, 1:] for layer in detector.layers}
        dist = detector.memory.bank.distances(fs_names, tokens)
        out["fs_token_min_dist"] = diff(
            torch.stack([dist[x].reshape(-1, *grid) for x in detector.layers], 1), z["fs_token_min_dist"]
        )
        scores, maps = detector.predict_features(feats, fs_names)
        out["fs_anomaly_maps"] = diff(maps, z["fs_anomaly_maps"])
        out["fs_text_probs"] = diff(detector.last_score_parts["text"], z["fs_text_probs"])
        import pandas as pd

        frame = pd.DataFrame(
            {
                "cls_name": fs_names,
                "score": scores.numpy(),
                **{k: v.numpy() for k, v in detector.last_score_parts.items()},
            }
        )
        out["fs_image_scores"] = diff(
            detector.finalize_scores(frame)["score"].to_numpy(), z["fs_image_scores"]
        )
    return out


def clipad(root: Path, z) -> dict[str, float]:
    """SDP and SDP+ share one run of the official code (test.py, test_ft.py); the surgery path is the same."""
    from zsad.methods.clipad_sdp import ClipADSDP, transductive_scores

    detector = from_official(
        "clipad-sdp-plus",
        checkpoint=root / "checkpoints/clipad/epoch_5.pth",
        weights=root / "weights/ViT-B-16-plus-240_seed0.pt",
    )
    out = Stages()
    images = torch.from_numpy(z["input_images"])
    names = [str(c) for c in z["class_names"]]
    text = torch.stack([detector.text_features(c) for c in names])
    out["text_features (fp16 dbscan)"] = diff(text, z["text_features"])
    with torch.no_grad():
        feats = detector.extract_features(images)
        for layer in detector.layers:
            surgery = torch.cat([feats[f"cls_{layer}"][:, None], feats[f"patches_{layer}"]], dim=1)
            out[f"surgery_features_L{layer}"] = diff(surgery, z[f"surgery_features_L{layer}"])
            out[f"ori_tokens_L{layer} (aliased)"] = diff(feats[f"tokens_{layer}"], z[f"ori_tokens_L{layer}"])
        heads = detector.learned([feats[f"tokens_{layer}"][:, 1:] for layer in detector.layers])
        for layer, h in zip(detector.layers, heads, strict=True):
            out[f"sdpp_linear_out_L{layer}"] = diff(h, z[f"sdpp_linear_out_L{layer}"])
        out["sdp_surgery_map_abnormal"] = diff(
            detector.surgery_map(feats, text), z["sdp_surgery_map_abnormal"]
        )
        sdp = ClipADSDP(detector.backbone, **{k: v for k, v in detector.options.items() if k != "method"})
        sdp._text_cache = detector._text_cache
        for tag, model in (("sdp", sdp), ("sdpp", detector)):
            out[f"{tag}_anomaly_maps_presmooth"] = diff(
                model.unsmoothed_map(feats, text), z[f"{tag}_anomaly_maps_presmooth"]
            )
            parts = model.score_parts_from_features(feats, names)
            out[f"{tag}_anomaly_maps"] = diff(parts["map"], z[f"{tag}_anomaly_maps"])
            out[f"{tag}_pr_sp0"] = diff(parts["global"], z[f"{tag}_pr_sp0"])
            out[f"{tag}_pr_sp1"] = diff(parts["max"], z[f"{tag}_pr_sp1"])
            # the official per-class min-max, applied to the 3 oracle images as one group (README of oracles)
            group = transductive_scores(parts["global"].numpy(), parts["max"].numpy(), ["all"] * len(names))
            out[f"{tag}_image_scores_groupnorm"] = diff(group, z[f"{tag}_image_scores_groupnorm"])
    return out


def anomalyclip(root: Path, z) -> dict[str, float]:
    """test.sh settings (layer 24, DPAM v-v from block 6, sigma 4), plus the extra 6/12/18/24 pass."""
    from zsad.methods.anomalyclip import AnomalyCLIP, state_probs, upsample_probs

    checkpoint = root / "checkpoints/anomalyclip/epoch_15.pth"
    detector = from_official(
        "anomalyclip", checkpoint=checkpoint, weights=root / "weights/ViT-L-14-336_seed0.pt"
    )
    official = torch.load(checkpoint, map_location="cpu", weights_only=True)["prompt_learner"]
    out = Stages()
    images = torch.from_numpy(z["input_images"])
    names = [str(c) for c in z["class_names"]]
    visual = detector.backbone.model.visual
    out["visual_pos_embed (bilinear)"] = diff(visual.positional_embedding, z["visual_pos_embed_after_test"])
    with torch.no_grad():
        ids = detector.template_ids()
        official_ids = torch.cat([official["tokenized_prompts_pos"][0], official["tokenized_prompts_neg"][0]])
        out["template_token_ids"] = diff(ids, official_ids)
        words = detector.backbone.model.token_embedding(ids)
        out["template_prefix_suffix"] = max(
            diff(words[0, :1], official["token_prefix_pos"][0, 0]),
            diff(words[0, 13:], official["token_suffix_pos"][0, 0]),
            diff(words[1, :1], official["token_prefix_neg"][0, 0]),
            diff(words[1, 13:], official["token_suffix_neg"][0, 0]),
        )
        raw = detector.backbone.encode_text(
            ids,
            deep_prompts=detector.learned.deep_prompts(fp16=True),
            token_embeddings=detector.prompt_embeddings(ids),
        )
        out["text_features_raw (fp16 deep)"] = diff(raw, z["text_features_raw"])
        text = detector.text_batch(names)
        out["text_features"] = diff(text[0].T, z["text_features"])
        feats = detector.extract_features(images)
        out["image_features_raw (no ln_post)"] = diff(feats["cls_proj"], z["image_features_raw"])
        out["patch_features_L24 (dpam vv)"] = diff(feats["path_24"], z["patch_features_L24"])
        probs = state_probs(feats["path_24"], text)
        out["token_probs_L24"] = diff(probs, z["token_probs_L24"])
        up = upsample_probs(probs[:, 1:], detector.backbone.grid_size, detector.image_size)
        out["similarity_map_abnormal"] = diff(up[:, 1], z["similarity_map_abnormal"])
        presmooth = detector.unsmoothed_map(feats, text)
        out["anomaly_maps_presmooth"] = diff(presmooth, z["anomaly_maps_presmooth"])
        scores, maps = detector.predict_features(feats, names)
        out["anomaly_maps"] = diff(maps, z["anomaly_maps"])
        out["image_scores"] = diff(scores, z["image_scores"])
        options = {k: v for k, v in detector.options.items() if k != "layers"}
        multi = AnomalyCLIP(detector.backbone, layers=(6, 12, 18, 24), **options)
        multi.learned.load_state_dict(detector.learned.state_dict())
        extra = multi.extract_features(images)
        for layer in multi.layers:
            out[f"extra_patch_features_L{layer}_img0"] = diff(
                extra[f"path_{layer}"][0], z[f"extra_patch_features_L{layer}_img0"]
            )
            out[f"extra_token_probs_L{layer}"] = diff(
                state_probs(extra[f"path_{layer}"], text), z[f"extra_token_probs_L{layer}"]
            )
    return out


def adaclip(root: Path, z) -> dict[str, float]:
    """test.py defaults (hybrid prompts, depth 4, length 5, HSF K=20 on one k-means stream seeded 111,
    sigma 4); the official evaluation's batches of 1 replayed as one batch of 3 (the stream runs in order)."""
    from zsad.methods.heads import token_logits
    from zsad.methods.hsf import released_hsf

    detector = from_official(
        "adaclip",
        checkpoint=root / "checkpoints/adaclip/adaclip_oracle.pth",
        weights=root / "weights/ViT-L-14-336_seed0.pt",
    )
    out = Stages()
    images = torch.from_numpy(z["input_images"])
    names = [str(c) for c in z["class_names"]]
    out["visual_pos_embed (bicubic, no aa)"] = diff(
        detector.backbone.model.visual.positional_embedding, z["visual_pos_embed"]
    )
    with torch.no_grad():
        feats = detector.extract_features(images)
        visual_dyn, text_dyn = detector.dynamic_prompts(feats["pooled0"])
        out["dynamic_visual_prompts"] = diff(visual_dyn, z["dynamic_visual_prompts"])
        out["dynamic_text_prompts"] = diff(text_dyn, z["dynamic_text_prompts"])
        prompted = detector.backbone.encode_image(
            images[:1], layers=detector.layers, visual_prompts=detector.visual_prompts(visual_dyn[:1])
        )
        for layer in detector.layers:
            out[f"patch_tokens_raw_L{layer}_img0"] = diff(
                prompted.tokens[layer][0], z[f"patch_tokens_raw_L{layer}_img0"]
            )
        tokens, g, text = detector.forward_features(feats, names)
        out["image_features_pooled"] = diff(
            detector.backbone.encode_image(images, visual_prompts=detector.visual_prompts(visual_dyn)).pooled,
            z["image_features_pooled"],
        )
        for layer, t in zip(detector.layers, tokens, strict=True):
            out[f"proj_patch_tokens_L{layer}_img0"] = diff(t[0], z[f"proj_patch_tokens_L{layer}_img0"])
        out["proj_cls_tokens"] = diff(g, z["proj_cls_tokens"])
        out["text_features (prompted, per image)"] = diff(text, z["text_features"])
        logits = [token_logits(t, text) for t in tokens]
        out["token_logits"] = diff(torch.stack(logits, dim=1), z["token_logits"])
        detector.reset_kmeans_rng()  # the official stream starts at setup_seed(111)
        hsf, labels = released_hsf(tokens, logits, detector._rng_for(), detector.options["hsf_clusters"])
        mismatches = sum(int((a != b).sum()) for a, b in zip(labels, z["kmeans_labels"], strict=True))
        out["kmeans_labels (mismatches)"] = float(mismatches)
        out["hsf_feature"] = diff(hsf, z["hsf_feature"])
        out["anomaly_maps_presmooth"] = diff(detector.unsmoothed_map(logits), z["anomaly_maps_presmooth"])
        detector.reset_kmeans_rng()
        scores, maps = detector.predict_features(feats, names)
        out["anomaly_maps"] = diff(maps, z["anomaly_maps"])
        out["image_scores"] = diff(scores, z["image_scores"])
    return out


METHODS = {"aprilgan": aprilgan, "clipad": clipad, "anomalyclip": anomalyclip, "adaclip": adaclip}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--oracles", required=True, type=Path, help="the oracles' $OUT folder")
    parser.add_argument("--methods", nargs="*", default=sorted(METHODS), choices=sorted(METHODS))
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results, failed = {}, False
    for name in args.methods:
        npz = args.oracles / f"{'clipad' if name.startswith('clipad') else name}.npz"
        if not npz.is_file():
            print(f"{name}: {npz} missing, skipped")
            continue
        started = time.perf_counter()
        print(f"\n{name}: max |diff| per stage", flush=True)
        table = METHODS[name](args.oracles, np.load(npz))
        results[name] = table
        failed |= any(stage in FINAL and value >= TOLERANCE for stage, value in table.items())
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
