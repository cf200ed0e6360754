"""Glow latent-space fakes of held-out people for bench/redteam.py (seed 001's expression transfer).

For every test person's real clip (the target), the expression of a clip of another test person (the
source) is transferred onto the target's identity in the latent space of the Glow trained on the train
people, with both of the document's variants at alpha = 1. The detectors then score the transfers; the
target's own Glow reconstructions are the matched reals (same resolution, same Glow artefacts), so the
AUROC against them measures the manipulation rather than the trip through the flow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from sklearn.metrics import roc_auc_score

from flowood_ray.glow_tasks import open_session
from flowood_ray.glow_transfer import identity_statistics, transfer
from flowood_ray.media.shards import read_crop_images, read_videos
from flowood_ray.registry import load_registered
from flowood_ray.scoring.calibration import Calibration
from flowood_ray.scoring.scorers import build_scorer, score_videos

VARIANTS = ("linear", "variance")


def archive_people(archive: Path) -> dict[str, str]:
    """Real video file stem -> person, from a forge output's forge_meta.json or a synthetic benchmark's
    synth_meta.json (whose drawn identities are its people)."""
    if (archive / "forge_meta.json").exists():
        videos = json.loads((archive / "forge_meta.json").read_text())["videos"]
        return {vid: meta["person"] for vid, meta in videos.items()}
    if (archive / "synth_meta.json").exists():
        videos = json.loads((archive / "synth_meta.json").read_text())["videos"]
        return {vid: f"identity-{meta['identity']}" for vid, meta in videos.items()}
    raise FileNotFoundError(f"{archive} has neither forge_meta.json nor synth_meta.json: who is in it is unknown")


def held_out_pairs(crops: Path, archive: Path) -> list[tuple[str, str]]:
    """(target, source) crop video ids: each test real clip with the next test clip of another person."""
    people = archive_people(archive)
    reals = read_videos(crops).filter((pc.field("split") == "test") & (pc.field("label") == 0) & (pc.field("faces") > 0))
    clips = sorted((Path(r["path"]).stem, r["video_id"]) for r in reals.to_pylist())
    pairs = []
    for i, (stem, vid) in enumerate(clips):
        others = [v for s, v in clips[i + 1:] + clips[:i] if people[s] != people[stem]]
        if others:
            pairs.append((vid, others[0]))
    return pairs


def make_transfers(crops: Path, glow_uri: str, tracking_uri: str, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """{"reconstruction" | variant: (images (N, s, s, 3), per-image video ids)} of the test pairs."""
    session = open_session(glow_uri, tracking_uri)
    sets: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {k: ([], []) for k in ("reconstruction", *VARIANTS)}
    for target_id, source_id in pairs:
        target_crops, _ = read_crop_images(crops, [target_id])
        source_crops, _ = read_crop_images(crops, [source_id])
        target = identity_statistics(session.encode(session.model_inputs(target_crops)))
        source = identity_statistics(session.encode(session.model_inputs(source_crops)))
        outputs = {"reconstruction": session.images(target.latents)}
        outputs |= {v: session.images(transfer(v, source, target, 1.0, False, 1e-2)) for v in VARIANTS}
        for kind, images in outputs.items():
            sets[kind][0].append(images)
            sets[kind][1].append(np.full(len(images), f"{kind}:{target_id}"))
    return {k: (np.concatenate(i), np.concatenate(v)) for k, (i, v) in sets.items()}


def score_transfers(transfers: dict[str, Any], name: str, version: str) -> dict[str, float]:
    """Share of transfer videos and frames flagged at the model's calibrated 1% thresholds, and the video
    AUROC of each variant against the matched reconstructions."""
    bundle = load_registered(f"models:/{name}/{version}")
    scorer = build_scorer(bundle)
    primary = scorer.primary
    video_cal = Calibration.model_validate(bundle.calibration["video"][primary])
    frame_cal = Calibration.model_validate(bundle.calibration["frame"][primary])
    per_video = {}
    out: dict[str, float] = {}
    for kind, (images, ids) in transfers.items():
        frames = score_videos(scorer, images, ids, batch_size=64)
        _, videos = scorer.aggregate(ids, frames)
        per_video[kind] = videos[primary]
        out[f"{kind}_video_flagged"] = float((videos[primary] > video_cal.threshold(0.01)).mean())
        out[f"{kind}_frame_flagged"] = float((frames[primary] > frame_cal.threshold(0.01)).mean())
    for variant in VARIANTS:
        labels = np.r_[np.zeros(len(per_video["reconstruction"])), np.ones(len(per_video[variant]))]
        out[f"{variant}_auroc_vs_reconstruction"] = float(
            roc_auc_score(labels, np.r_[per_video["reconstruction"], per_video[variant]]))
    return out
