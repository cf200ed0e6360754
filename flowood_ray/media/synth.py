"""Synthetic FaceForensics++-style deepfake benchmark, rendered offline.

Real deepfake datasets cannot be downloaded here, so this module draws talking heads with
OpenCV/numpy (realistic enough for MediaPipe to find and mesh the face in nearly every frame),
then manipulates them with the algorithms behind the four FF++ families:

  FaceSwap        donor mesh warped triangle by triangle onto the target, Poisson-blended
  Face2Face       driver expression transferred onto the target mesh, target texture re-warped
                  (mouth and eyes retrieved from the target's own frames, as Face2Face does)
  NeuralTextures  mouth only, re-rendered from a low-rank texture model of the target's mouth
  Deepfakes       donor face at the target's pose squeezed through 64x64, colour-matched badly,
                  feather-blended

Reals and fakes go through the same x264 encoder at every quality and are written in the FF++
layout (`original_sequences`, `manipulated_sequences`, `splits/*.json`) so the FF++ loader in
`datasets.py` reads the result unchanged. Every video's randomness derives from (seed, video id),
so the output does not depend on the number of worker processes.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import mediapipe as mp
import numpy as np
import pydantic
from mediapipe.python.solutions import face_mesh_connections as mesh_sets

logger = logging.getLogger(__name__)

METHODS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures")
# FF++ quality folder -> x264 CRF; raw/c0 are lossless like the dataset's own "raw" originals.
QUALITY_CRF = {"raw": 0, "c0": 0, "c23": 23, "c40": 40}
WORK_DIR = ".synth_work"

# Salts keep the random streams of identities, scenes and splits independent of each other.
_SALT_SPLIT, _SALT_IDENTITY, _SALT_SCENE, _SALT_FAKE = 11, 13, 17, 19


def _indices(connections: frozenset[tuple[int, int]]) -> np.ndarray:
    return np.array(sorted({i for edge in connections for i in edge}), dtype=np.int64)


LIPS = _indices(mesh_sets.FACEMESH_LIPS)
RIGHT_EYE = _indices(mesh_sets.FACEMESH_RIGHT_EYE)  # subject's right: the eye on the image's left
LEFT_EYE = _indices(mesh_sets.FACEMESH_LEFT_EYE)
EYES = np.concatenate([RIGHT_EYE, LEFT_EYE])
BROWS = np.concatenate([_indices(mesh_sets.FACEMESH_RIGHT_EYEBROW), _indices(mesh_sets.FACEMESH_LEFT_EYEBROW)])
OVAL = _indices(mesh_sets.FACEMESH_FACE_OVAL)
# Expression hardly moves these (eye corners, nose, forehead, upper face outline), so they carry the head pose.
STABLE = np.array([33, 133, 362, 263, 168, 6, 197, 195, 5, 4, 1, 10, 151, 9, 338, 297, 332, 284, 251, 389,
                   356, 454, 234, 127, 162, 21, 54, 103, 67, 109])
NOSE_TIP = 1
MOUTH_CORNERS = (61, 291)


class SynthConfig(pydantic.BaseModel):
    """What to render; saved into synth_meta.json so a benchmark can be reproduced."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    identities: int = pydantic.Field(8, ge=1)
    videos_per_identity: int = pydantic.Field(2, ge=1)
    seed: int = pydantic.Field(0, ge=0)
    frames: int = pydantic.Field(48, ge=8, le=10_000)
    fps: int = pydantic.Field(25, ge=1, le=120)
    size: int = pydantic.Field(256, ge=128, le=1024)
    qualities: tuple[str, ...] = ("c23", "c40")
    workers: int = pydantic.Field(2, ge=1)

    @pydantic.field_validator("identities")
    @classmethod
    def _enough_identities(cls, value: int) -> int:
        if value < 6:
            raise ValueError(f"identities must be >= 6, got {value}: splits are by identity and train, val and "
                             "test each need 2 identities so that every fake pairs two different people")
        return value

    @pydantic.field_validator("size")
    @classmethod
    def _even_size(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"size must be even (yuv420p halves the chroma planes), got {value}")
        return value

    @pydantic.field_validator("qualities")
    @classmethod
    def _known_qualities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value) or not set(value) <= QUALITY_CRF.keys():
            raise ValueError(f"qualities must be distinct names from {sorted(QUALITY_CRF)}, got {value!r}")
        return value


# ----------------------------------------------------------------------------------------------
# Benchmark plan: identities -> splits -> videos -> [target, source] pairs
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Video:
    vid: str
    identity: int
    split: str


@dataclass(frozen=True)
class FakeJob:
    method: str
    target: str
    source: str
    split: str

    @property
    def name(self) -> str:
        return f"{self.target}_{self.source}"


@dataclass(frozen=True)
class Plan:
    videos: tuple[Video, ...]
    pairs: dict[str, list[tuple[str, str]]]

    def fakes(self) -> list[FakeJob]:
        """Both directions of every split pair, for every method, as the FF++ loader expects."""
        return [FakeJob(method, target, source, split)
                for split, pairs in self.pairs.items() for a, b in pairs
                for target, source in ((a, b), (b, a)) for method in METHODS]


def _pair_videos(videos: Sequence[Video]) -> list[tuple[str, str]]:
    """Pair videos of different identities, each video in exactly one pair (or in the one triple).

    Videos are grouped by identity and video k is paired with video k + n/2: no identity holds more
    than half of a split, so the two halves never meet an identity of their own. An odd count
    takes its first three videos from three different identities as a rotation a-b, b-c, c-a.
    """
    pending = list(videos)
    pairs: list[tuple[str, str]] = []
    if len(pending) % 2:
        triple: list[Video] = []
        for identity in dict.fromkeys(v.identity for v in pending):
            if len(triple) < 3:
                triple.append(next(v for v in reversed(pending) if v.identity == identity))
        if len(triple) < 3:
            raise ValueError("an odd number of videos in a split needs 3 identities in it")
        pending = [v for v in pending if v not in triple]
        a, b, c = (v.vid for v in triple)
        pairs += [(a, b), (b, c), (c, a)]
    half = len(pending) // 2
    pairs += [(pending[k].vid, pending[k + half].vid) for k in range(half)]
    return sorted(pairs)


def plan_benchmark(config: SynthConfig) -> Plan:
    """Split identities about 60/20/20 (at least 2 each in val and test), then pair within splits."""
    n = config.identities
    order = np.random.default_rng([config.seed, _SALT_SPLIT]).permutation(n)
    n_val = n_test = max(2, round(0.2 * n))
    split_of = {int(i): ("val" if k < n_val else "test" if k < n_val + n_test else "train")
                for k, i in enumerate(order)}
    videos = tuple(Video(f"{i * config.videos_per_identity + j:03d}", i, split_of[i])
                   for i in range(n) for j in range(config.videos_per_identity))
    pairs = {split: _pair_videos([v for v in videos if v.split == split]) for split in ("train", "val", "test")}
    identity = {v.vid: v.identity for v in videos}
    if any(identity[a] == identity[b] for split_pairs in pairs.values() for a, b in split_pairs):
        raise RuntimeError("pairing produced a same-identity pair")  # _pair_videos rules this out
    return Plan(videos, pairs)


# ----------------------------------------------------------------------------------------------
# Procedural talking heads
# ----------------------------------------------------------------------------------------------

_SKIN_TONES = np.array([[255, 224, 196], [236, 194, 160], [214, 164, 124], [180, 128, 92],
                        [140, 92, 62], [100, 64, 44], [74, 48, 34]], np.float32)
_HAIR_COLOURS = np.array([[22, 18, 16], [52, 36, 26], [96, 66, 42], [180, 148, 100], [116, 54, 30],
                          [150, 146, 142]], np.float32)
_IRIS_COLOURS = np.array([[92, 58, 32], [52, 32, 20], [70, 110, 156], [76, 116, 80], [118, 98, 52],
                          [106, 116, 126]], np.float32)


@dataclass(frozen=True)
class Identity:
    """A person: proportions in units of the head's half width a / half height b, colours in RGB."""

    half_width: float      # a, as a fraction of the frame size
    aspect: float          # b / a
    jaw: float             # how much the lower half narrows into a chin
    skin: np.ndarray
    hair: np.ndarray
    hair_style: int        # 0 short, 1 long, 2 receding, 3 side part
    eye_sep: float
    eye_w: float
    eye_h: float
    eye_y: float
    eye_tilt: float
    iris: np.ndarray
    brow_thick: float
    brow_arch: float
    brow_gap: float
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip_up: float
    lip_lo: float
    lip: np.ndarray
    beard: float
    texture_seed: int


def sample_identity(seed: int, identity: int) -> Identity:
    rng = np.random.default_rng([seed, _SALT_IDENTITY, identity])
    tone = rng.uniform(0, len(_SKIN_TONES) - 1)
    lo = int(tone)
    skin = _SKIN_TONES[lo] + (tone - lo) * (_SKIN_TONES[min(lo + 1, len(_SKIN_TONES) - 1)] - _SKIN_TONES[lo])
    skin = np.clip(skin * rng.uniform(0.95, 1.05, 3), 0, 255).astype(np.float32)
    lip = np.clip(skin * np.array([0.82, 0.56, 0.58]) + rng.uniform(0, 30) * np.array([1.0, 0.1, 0.2]), 0, 255)
    return Identity(
        half_width=rng.uniform(0.15, 0.175), aspect=rng.uniform(1.22, 1.38), jaw=rng.uniform(0.08, 0.35),
        skin=skin, hair=np.clip(_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * rng.uniform(0.85, 1.15, 3), 0, 255),
        hair_style=int(rng.integers(4)), eye_sep=rng.uniform(0.36, 0.44), eye_w=rng.uniform(0.18, 0.23),
        eye_h=rng.uniform(0.38, 0.5), eye_y=rng.uniform(-0.16, -0.08), eye_tilt=rng.uniform(-0.12, 0.12),
        iris=_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] * rng.uniform(0.85, 1.15, 3),
        brow_thick=rng.uniform(0.035, 0.065), brow_arch=rng.uniform(0.02, 0.07), brow_gap=rng.uniform(0.11, 0.17),
        nose_len=rng.uniform(0.3, 0.38), nose_w=rng.uniform(0.18, 0.26), mouth_y=rng.uniform(0.44, 0.52),
        mouth_w=rng.uniform(0.3, 0.4), lip_up=rng.uniform(0.03, 0.05), lip_lo=rng.uniform(0.04, 0.065),
        lip=lip.astype(np.float32), beard=float(rng.uniform(0.2, 0.45) if rng.random() < 0.3 else 0.0),
        texture_seed=int(rng.integers(2**31)))


@dataclass(frozen=True)
class Scene:
    """One recording of a person: room, clothes, light, camera, and how the head moves and talks."""

    wall: np.ndarray          # (2, 3) gradient end colours
    props: np.ndarray         # (k, 7): x0, y0, x1, y1 as frame fractions, RGB
    depth_blur: float
    shirt: np.ndarray
    light: np.ndarray         # unit vector towards the light, y down
    ambient: float
    tint: np.ndarray          # white balance gain per channel
    face_level: float         # the face luma auto-exposure aims for
    centre: np.ndarray        # head centre as frame fractions
    scale: float
    motion: np.ndarray        # (6 channels, 2 partials, amplitude/frequency/phase)
    syllable_rate: float
    syllables: np.ndarray     # mouth opening of each syllable; 0 are pauses
    smile: float
    blinks: np.ndarray        # blink start times in seconds
    noise: float
    lens_blur: float


def sample_scene(seed: int, vid: str, seconds: float) -> Scene:
    rng = np.random.default_rng([seed, _SALT_SCENE, int(vid)])
    grey = rng.uniform(60, 210)
    wall = np.clip(grey + rng.normal(0, 18, (2, 3)) + rng.uniform(-30, 30, (2, 1)), 10, 245)
    props = np.concatenate([np.sort(rng.uniform(0, 1, (k := int(rng.integers(2, 5)), 2, 2)), axis=1).reshape(k, 4),
                            np.clip(rng.uniform(30, 230, (k, 1)) + rng.normal(0, 25, (k, 3)), 0, 255)], axis=1)
    light = np.array([rng.uniform(-0.7, 0.7), rng.uniform(-0.7, -0.1), 1.0])
    # Channels: yaw, pitch (feature shift as a fraction of the head), roll (deg), scale, tx, ty (frame fractions).
    amplitude = np.array([[0.3, 0.1], [0.12, 0.06], [5.0, 2.0], [0.03, 0.01], [0.025, 0.008], [0.015, 0.006]])
    motion = np.stack([amplitude * rng.uniform(0.3, 1.0, (6, 2)), rng.uniform(0.1, 0.5, (6, 2)) * [1, 2.3],
                       rng.uniform(0, 2 * np.pi, (6, 2))], axis=-1)
    rate = rng.uniform(3.0, 5.0)
    syllables = rng.uniform(0.25, 1.0, int(seconds * rate) + 2) * (rng.random(int(seconds * rate) + 2) > 0.15)
    blinks = np.cumsum(rng.uniform(0.8, 4.0, int(seconds / 0.8) + 1)) - rng.uniform(0, 1.5)
    return Scene(wall=wall.astype(np.float32), props=props.astype(np.float32), depth_blur=rng.uniform(1.5, 5.0),
                 shirt=np.clip(rng.uniform(20, 220) + rng.normal(0, 35, 3), 0, 255).astype(np.float32),
                 light=light / np.linalg.norm(light), ambient=rng.uniform(0.35, 0.6),
                 tint=np.array([1 + (w := rng.uniform(-0.07, 0.07)), 1.0, 1 - w]), face_level=rng.uniform(100, 150),
                 centre=np.array([0.5 + rng.uniform(-0.05, 0.05), 0.46 + rng.uniform(-0.03, 0.03)]),
                 scale=rng.uniform(0.92, 1.08), motion=motion, syllable_rate=rate, syllables=syllables,
                 smile=rng.uniform(-0.3, 0.6), blinks=blinks, noise=rng.uniform(1.0, 3.5),
                 lens_blur=rng.uniform(0.3, 0.9))


@dataclass(frozen=True)
class Pose:
    """Head pose and expression at one instant."""

    yaw: float
    pitch: float
    roll: float
    scale: float
    tx: float
    ty: float
    blink: float     # 0 open, 1 closed
    mouth: float     # 0 closed, 1 wide open
    gaze: float
    brow: float


def pose_at(scene: Scene, t: float) -> Pose:
    m = scene.motion
    channels = (m[..., 0] * np.sin(2 * np.pi * m[..., 1] * t + m[..., 2])).sum(axis=1)
    phase = t * scene.syllable_rate
    k = int(phase)
    # Each syllable opens and closes the mouth once; its height is the syllable's loudness.
    mouth = float(scene.syllables[min(k, len(scene.syllables) - 1)] * np.sin(np.pi * (phase - k)) ** 2)
    since = t - scene.blinks
    since = since[(since >= 0) & (since < 0.25)]
    blink = float(np.sin(np.pi * since[0] / 0.25) ** 1.5) if len(since) else 0.0
    return Pose(yaw=float(channels[0]), pitch=float(channels[1]), roll=float(channels[2]),
                scale=float(1 + channels[3]), tx=float(channels[4]), ty=float(channels[5]), blink=blink,
                mouth=mouth, gaze=float(np.sin(0.7 * t + scene.motion[0, 0, 2])) * 0.5, brow=mouth * 0.4)


def _add_blob(field: np.ndarray, cx: float, cy: float, sx: float, sy: float, amount: float) -> None:
    """Add an axis-aligned Gaussian to field in place, only within 3 sigma (a frame has dozens)."""
    h, w = field.shape
    x0, x1 = max(int(cx - 3 * sx), 0), min(int(cx + 3 * sx) + 2, w)
    y0, y1 = max(int(cy - 3 * sy), 0), min(int(cy + 3 * sy) + 2, h)
    if x1 > x0 and y1 > y0:
        gx = np.exp(-0.5 * ((np.arange(x0, x1, dtype=np.float32) - cx) / sx) ** 2)
        gy = np.exp(-0.5 * ((np.arange(y0, y1, dtype=np.float32) - cy) / sy) ** 2)
        field[y0:y1, x0:x1] += amount * np.outer(gy, gx)


def _ellipse(xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    """Antialiased ellipse coverage: a signed distance in pixels, approximately, clipped to [0, 1]."""
    return np.clip((1 - np.sqrt(((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2)) * min(ax, ay) + 0.5, 0, 1)


def _paint(canvas: np.ndarray, polys: Sequence[np.ndarray], colour: np.ndarray | float, alpha: float = 1.0,
           soften: float = 0.0) -> None:
    """Blend antialiased polygons (float pixel coordinates) into canvas in place.

    colour is an RGB triple or an image the size of the canvas (to copy a layer through a mask);
    only the polygons' bounding box is touched, which keeps a frame's dozens of strokes cheap.
    """
    pts = np.concatenate(polys)
    pad = int(3 * soften) + 2
    h, w = canvas.shape[:2]
    x0, y0 = np.maximum(np.floor(pts.min(axis=0)).astype(int) - pad, 0)
    x1, y1 = np.minimum(np.ceil(pts.max(axis=0)).astype(int) + pad, [w, h])
    if x1 <= x0 or y1 <= y0:
        return
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(mask, [np.round((p - (x0, y0)) * 16).astype(np.int32) for p in polys], 255, cv2.LINE_AA, 4)
    cover = mask.astype(np.float32) * (alpha / 255)
    if soften:
        cover = cv2.GaussianBlur(cover, (0, 0), soften)
    roi = canvas[y0:y1, x0:x1]
    paint = colour[y0:y1, x0:x1] if isinstance(colour, np.ndarray) and colour.ndim == 3 else colour
    roi += (paint - roi) * cover[..., None]


def _circle(cx: float, cy: float, r: float, n: int = 28) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)


@dataclass(frozen=True)
class _Layers:
    """What does not change within a video, drawn once: room, body, and the head without its features."""

    background: np.ndarray
    body: np.ndarray          # premultiplied RGB
    body_alpha: np.ndarray
    head: np.ndarray          # face space: the head centred on the canvas, upright
    head_alpha: np.ndarray


def _build_layers(person: Identity, scene: Scene, size: int) -> _Layers:
    s = float(size)
    a, b = person.half_width * s, person.half_width * person.aspect * s
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    light = scene.light.astype(np.float32)
    tex_rng = np.random.default_rng(person.texture_seed)

    background = np.empty((size, size, 3), np.float32)
    ramp = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    background[:] = scene.wall[0] * (1 - ramp) + scene.wall[1] * ramp
    for x0, y0, x1, y1, *rgb in scene.props:
        rect = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32) * s
        _paint(background, [rect], np.array(rgb, np.float32), alpha=0.85)
    background = cv2.GaussianBlur(background, (0, 0), scene.depth_blur * s / 256)
    background *= 1 - 0.2 * (((xs - s / 2) ** 2 + (ys - s / 2) ** 2) / (s / 2) ** 2)[..., None] ** 1.5

    # The body follows the head's translation only; it is drawn at the head's resting place.
    cx, cy = scene.centre * s
    body = np.zeros((size, size, 3), np.float32)
    body_alpha = np.zeros((size, size), np.float32)
    shoulders = _ellipse(xs, ys, cx, cy + 2.15 * b, 2.5 * a, 1.0 * b)
    shade = np.clip(0.75 + 0.25 * light[0] * (xs - cx) / (2.5 * a) - 0.15 * (ys - cy - 1.6 * b) / b, 0.4, 1.1)
    body += shoulders[..., None] * scene.shirt * shade[..., None]
    body_alpha = np.maximum(body_alpha, shoulders)
    # The neck widens towards the shoulders.
    neck_w = 0.48 * a + 0.25 * a * np.clip((ys - cy - 0.9 * b) / (0.8 * b), 0, 1) ** 2
    neck = np.clip(neck_w - np.abs(xs - cx) + 0.5, 0, 1) * (ys > cy) * (ys < cy + 1.8 * b)
    chin_shadow = np.clip((ys - cy - 0.75 * b) / (0.5 * b), 0, 1) * 0.45 + 0.45
    neck_rgb = person.skin * (chin_shadow * (scene.ambient + (1 - scene.ambient) * 0.8))[..., None]
    body = body * (1 - neck[..., None]) + neck_rgb * neck[..., None]
    body_alpha = np.maximum(body_alpha, neck)

    # Face space: head centre at the canvas centre; the frame transform moves and rotates it.
    c = s / 2
    head = np.zeros((size, size, 3), np.float32)
    head_alpha = np.zeros((size, size), np.float32)
    hair_tex = cv2.GaussianBlur(tex_rng.standard_normal((size, size)).astype(np.float32), (0, 0), 0.6 * s / 256,
                                sigmaY=6 * s / 256)
    hair_tex = 1 + 0.125 * hair_tex / (hair_tex.std() + 1e-6)  # strands: streaks along the fall of the hair
    hair_light = np.clip(0.45 + 0.55 * (light[0] * (xs - c) / (1.2 * a) - light[1] * (c - 0.5 * b - ys) / b), 0.3, 1.0)
    hair_rgb = person.hair * (hair_light * hair_tex)[..., None]
    if person.hair_style == 1:  # long: falls behind the neck onto the shoulders
        back = np.maximum(_ellipse(xs, ys, c, c - 0.02 * b, 1.22 * a, 1.12 * b),
                          np.clip(1.2 * a - np.abs(xs - c), 0, 1) * (ys > c) * (ys < c + 1.5 * b))
    elif person.hair_style == 2:  # receding: mostly at the sides
        back = _ellipse(xs, ys, c, c - 0.1 * b, 1.04 * a, 0.95 * b) * (np.abs(xs - c) > 0.7 * a) * (ys < c + 0.1 * b)
    elif person.hair_style == 3:  # fuller, with a side part
        back = _ellipse(xs, ys, c + 0.05 * a, c - 0.16 * b, 1.12 * a, 1.06 * b) * (ys < c + 0.05 * b)
    else:  # short
        back = _ellipse(xs, ys, c, c - 0.12 * b, 1.08 * a, 1.0 * b) * (ys < c + 0.05 * b)
    head += hair_rgb * back[..., None]
    head_alpha = np.maximum(head_alpha, back)

    for side in (-1, 1):
        ear = _ellipse(xs, ys, c + side * 0.97 * a, c + 0.03 * b, 0.15 * a, 0.23 * b)
        inner = _ellipse(xs, ys, c + side * 0.99 * a, c + 0.04 * b, 0.07 * a, 0.14 * b)
        ear_rgb = person.skin * (scene.ambient + (1 - scene.ambient) * 0.55) * (1 - 0.25 * inner)[..., None]
        head = head * (1 - ear[..., None]) + ear_rgb * ear[..., None]
        head_alpha = np.maximum(head_alpha, ear)

    u, v = (xs - c) / a, (ys - c) / b
    u = u / (1 - person.jaw * np.clip(v, 0, 1) ** 2)  # narrows the lower half into a jaw and chin
    r2 = u**2 + v**2
    skin_cover = np.clip((1 - np.sqrt(r2)) * b + 0.5, 0, 1)
    nz = np.sqrt(np.clip(1 - r2, 0, 1))
    diffuse = np.clip((u * light[0] + v * light[1] + nz * light[2]) / np.sqrt(r2 + nz**2 + 1e-6), 0, 1)
    shading = scene.ambient + (1 - scene.ambient) * diffuse + 0.12 * diffuse**12  # soft sheen
    mottle = cv2.GaussianBlur(tex_rng.standard_normal((size, size)).astype(np.float32), (0, 0), 6 * s / 256)
    pores = tex_rng.standard_normal((size, size)).astype(np.float32)
    texture = 1 + 0.03 * mottle / (mottle.std() + 1e-6) + 0.012 * pores
    skin_rgb = person.skin * (shading * texture)[..., None]
    flush = np.zeros((size, size), np.float32)
    for side in (-1, 1):  # cheeks flush slightly
        _add_blob(flush, c + side * 0.52 * a, c + 0.22 * b, 0.17 * a, 0.11 * b, 0.07)
    skin_rgb += flush[..., None] * (np.array([210, 90, 90], np.float32) - skin_rgb)
    if person.beard:
        stubble = np.clip((v - person.mouth_y + 0.12) / 0.1, 0, 1) * np.clip((1 - np.sqrt(r2)) * 8, 0, 1)
        stubble *= person.beard * (0.7 + 0.3 * np.clip(pores, -1, 1))
        skin_rgb += stubble[..., None] * (person.hair * 0.8 - skin_rgb)
    head = head * (1 - skin_cover[..., None]) + skin_rgb * skin_cover[..., None]
    head_alpha = np.maximum(head_alpha, skin_cover)

    hairline = {0: 0.55, 1: 0.62, 2: 0.86, 3: 0.5}[person.hair_style]
    part = 0.1 * u if person.hair_style == 3 else 0.0
    # The hairline stays above the brows, so the fringe can be part of the static head.
    fringe = skin_cover * np.clip((c - (hairline - 0.28 * u**2 + part) * b - ys) * 0.7 + 0.5, 0, 1)
    head = head * (1 - fringe[..., None]) + hair_rgb * fringe[..., None]
    return _Layers(background, body, body_alpha, head, head_alpha)


def _draw_features(canvas: np.ndarray, person: Identity, scene: Scene, pose: Pose, size: int) -> None:
    """Eyes, brows, nose and mouth in face space; features shift with yaw/pitch as if on a sphere."""
    s = float(size)
    a, b = person.half_width * s, person.half_width * person.aspect * s
    c = s / 2
    lx = float(scene.light[0])
    lit = person.skin * (scene.ambient + (1 - scene.ambient) * 0.8)

    def shift(depth: float) -> tuple[float, float]:
        return c + pose.yaw * a * depth, c + pose.pitch * b * depth * 0.6

    fx, fy = shift(0.35)
    eye_y = fy + person.eye_y * b
    darken = np.zeros((size, size), np.float32)
    highlight = np.zeros((size, size), np.float32)
    nx, _ = shift(0.55)
    tip_y = eye_y + person.nose_len * b
    mx, my = shift(0.45)
    my += person.mouth_y * b
    for side in (-1, 1):
        _add_blob(darken, fx + side * person.eye_sep * a, eye_y - 0.02 * b, 0.26 * a, 0.11 * b, 0.16)  # sockets
        _add_blob(darken, nx + side * person.nose_w * 0.45 * a, tip_y - 0.01 * b, 0.06 * a, 0.045 * b, 0.16)
    away = -np.sign(lx or 1.0)  # the nose shades the cheek side away from the light
    _add_blob(darken, (fx + nx) / 2 + away * person.nose_w * 0.55 * a, (eye_y + tip_y) / 2, 0.06 * a, 0.2 * b, 0.13)
    _add_blob(darken, nx, tip_y + 0.06 * b, 0.15 * a, 0.03 * b, 0.28)
    _add_blob(darken, mx, my + (person.lip_lo + 0.07 + pose.mouth * 0.08) * b, 0.16 * a, 0.03 * b, 0.15)
    _add_blob(highlight, (fx + nx) / 2 + lx * 0.03 * a, (eye_y + tip_y) / 2, 0.04 * a, 0.2 * b, 0.06)
    _add_blob(highlight, nx + lx * 0.03 * a, tip_y - 0.04 * b, 0.05 * a, 0.04 * b, 0.07)
    canvas *= (1 - darken)[..., None]
    canvas += highlight[..., None] * (255 - canvas)

    for side in (-1, 1):
        ex = fx + side * person.eye_sep * a
        ew = person.eye_w * a * (1 - 0.3 * pose.yaw * side)
        eh = person.eye_h * ew
        t = np.linspace(-1, 1, 25)
        tilt = -side * person.eye_tilt * eh * t
        opening = 1 - 1.55 * pose.blink
        upper = np.stack([ex + ew * t, eye_y + tilt - eh * opening * (1 - t**2) ** 0.7], axis=1)
        lower = np.stack([ex + ew * t, eye_y + tilt + 0.55 * eh * (1 - t**2) ** 0.9], axis=1)
        almond = np.concatenate([upper, lower[::-1]])
        eye = canvas.copy()
        _paint(eye, [almond], np.array([228, 222, 214], np.float32) * (0.75 + 0.25 * scene.ambient))
        ix, iy, ir = ex + pose.gaze * 0.28 * ew, eye_y + 0.05 * eh, 0.46 * ew
        _paint(eye, [_circle(ix, iy, ir)], person.iris * 0.55)
        _paint(eye, [_circle(ix, iy, ir * 0.86)], person.iris)
        _paint(eye, [_circle(ix, iy, ir * 0.42)], np.array([12, 10, 10], np.float32))
        _paint(eye, [_circle(ix + 0.3 * ir, iy - 0.35 * ir, ir * 0.16)], np.array([250, 250, 250], np.float32))
        lid_shadow = np.concatenate([upper, upper[::-1] + [0, 0.35 * eh]])
        _paint(eye, [lid_shadow], np.array([40, 30, 30], np.float32), alpha=0.35, soften=0.8 * s / 256)
        if opening > -0.5:
            _paint(canvas, [almond], eye)
        lash_depth = np.stack([0 * t, 0.16 * eh * (1 - t**2) + 0.6], axis=1)
        lash = np.concatenate([upper - [0, 0.02 * eh], (upper + lash_depth)[::-1]])
        _paint(canvas, [lash], np.array([25, 18, 16], np.float32), alpha=0.9)
        crease = upper - np.stack([0 * t, 0.45 * eh * (1 - t**2) ** 0.5 + 0.4 * eh * pose.blink], 1)
        _paint(canvas, [np.concatenate([crease, crease[::-1] + [0, 1.0]])], lit * 0.55, alpha=0.45)
        _paint(canvas, [np.concatenate([lower, lower[::-1] + [0, 0.8]])], lit * 0.6, alpha=0.3)

        bx, by = ex, eye_y - (person.brow_gap + 0.02 * pose.brow) * b
        t = np.linspace(0, 1, 20)
        xs_brow = bx + side * (-0.95 + 2.2 * t) * ew
        arch = person.brow_arch * b * np.sin(np.pi * np.clip(t * 1.1, 0, 1))
        top = np.stack([xs_brow, by - arch - person.brow_thick * b * (1 - 0.6 * t)], axis=1)
        bottom = np.stack([xs_brow, by - arch + 0.3 * person.brow_thick * b * (1 - t)], axis=1)
        _paint(canvas, [np.concatenate([top, bottom[::-1]])], person.hair * 0.7, alpha=0.92, soften=0.6 * s / 256)

    for side in (-1, 1):
        _paint(canvas, [_circle(nx + side * person.nose_w * 0.3 * a, tip_y + 0.02 * b, 0.045 * a, 16) * [1, 0.55]
                        + [0, 0.45 * (tip_y + 0.02 * b)]], lit * 0.28, alpha=0.85, soften=0.5 * s / 256)

    t = np.linspace(-1, 1, 31)
    mw = person.mouth_w * a * (1 - 0.1 * pose.mouth + 0.05 * scene.smile)
    gap = pose.mouth * 0.13 * b
    corner = -scene.smile * 0.03 * b * t**2
    xs_m = mx + mw * t
    inner_up = np.stack([xs_m, my + corner - gap * 0.4 * (1 - t**2) ** 0.8], axis=1)
    inner_lo = np.stack([xs_m, my + corner + gap * 0.6 * (1 - t**2) ** 0.8], axis=1)
    bow = 1 - 0.35 * np.exp(-((t / 0.16) ** 2))
    outer_up = inner_up - np.stack([0 * t, person.lip_up * b * (1 - t**2) ** 0.5 * bow], axis=1)
    outer_lo = inner_lo + np.stack([0 * t, person.lip_lo * b * (1 - t**2) ** 0.6], axis=1)
    if gap > 0.5:
        cavity = np.concatenate([inner_up, inner_lo[::-1]])
        mouth = canvas.copy()
        _paint(mouth, [cavity], np.array([70, 24, 28], np.float32) * (0.5 + 0.5 * scene.ambient))
        teeth = np.concatenate([inner_up[5:-5], inner_up[5:-5][::-1] + [0, min(gap * 0.45, 0.05 * b)]])
        _paint(mouth, [teeth], np.array([232, 226, 212], np.float32) * (0.6 + 0.4 * scene.ambient))
        _paint(canvas, [cavity], mouth)
    _paint(canvas, [np.concatenate([outer_up, inner_up[::-1]])], person.lip * 0.85 * (0.6 + 0.4 * scene.ambient))
    _paint(canvas, [np.concatenate([inner_lo, outer_lo[::-1]])], person.lip * (0.65 + 0.4 * scene.ambient))
    _paint(canvas, [np.concatenate([inner_up, inner_up[::-1] + [0, 0.9]])], person.lip * 0.35, alpha=0.8)
    gloss = np.zeros((size, size), np.float32)
    _add_blob(gloss, mx, my + gap * 0.6 + person.lip_lo * 0.45 * b, 0.3 * mw, 0.012 * b, 0.18)
    canvas += gloss[..., None] * (255 - canvas)


def render_frame(person: Identity, scene: Scene, layers: _Layers, pose: Pose, size: int,
                 rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 frame; rng supplies the camera noise."""
    s = float(size)
    face = layers.head.copy()
    _draw_features(face, person, scene, pose, size)
    alpha = layers.head_alpha

    cx, cy = scene.centre * s
    body_shift = np.float32([[1, 0, pose.tx * s * 0.6], [0, 1, pose.ty * s * 0.3]])
    to_frame = cv2.getRotationMatrix2D((s / 2, s / 2), pose.roll, scene.scale * pose.scale)
    to_frame[:, 2] += (cx - s / 2 + pose.tx * s, cy - s / 2 + pose.ty * s)
    frame = layers.background.copy()
    layers_to_place = ((layers.body, layers.body_alpha, body_shift), (face * alpha[..., None], alpha, to_frame))
    for rgb, cover, matrix in layers_to_place:
        rgb_w = cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR)
        cover_w = cv2.warpAffine(cover, matrix, (size, size), flags=cv2.INTER_LINEAR)
        frame = frame * (1 - cover_w[..., None]) + rgb_w  # premultiplied: no dark halo at the edges
    # Auto-exposure meters on the face, as phone and webcam cameras do; bright rooms may clip.
    face_luma = float(person.skin @ [0.299, 0.587, 0.114]) * (scene.ambient + (1 - scene.ambient) * 0.75)
    gain = np.clip(scene.face_level / face_luma, 0.8, 2.2) * scene.tint.astype(np.float32)
    frame = cv2.GaussianBlur(frame * gain, (0, 0), scene.lens_blur * s / 256)
    # Sensor noise: fine luminance grain plus coarser, weaker chroma noise (demosaicing spreads it).
    grain = rng.standard_normal((size, size, 1), dtype=np.float32)
    chroma = cv2.resize(rng.standard_normal((size // 2, size // 2, 3), dtype=np.float32), (size, size),
                        interpolation=cv2.INTER_LINEAR)
    frame += scene.noise * (grain + 0.5 * chroma)
    return np.clip(frame + 0.5, 0, 255).astype(np.uint8)


def render_real(config: SynthConfig, video: Video) -> np.ndarray:
    """All frames (N, H, W, 3) uint8 RGB of one real video; a pure function of (config, video)."""
    person = sample_identity(config.seed, video.identity)
    scene = sample_scene(config.seed, video.vid, config.frames / config.fps)
    layers = _build_layers(person, scene, config.size)
    rng = np.random.default_rng([config.seed, _SALT_SCENE, int(video.vid), 1])
    return np.stack([render_frame(person, scene, layers, pose_at(scene, i / config.fps), config.size, rng)
                     for i in range(config.frames)])


# ----------------------------------------------------------------------------------------------
# Landmarks and geometry
# ----------------------------------------------------------------------------------------------

def face_landmarks(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MediaPipe face-mesh landmarks (N, 468, 2) in pixels and a (N,) found flag.

    Frames where the mesh fails borrow the nearest found frame's landmarks, so the manipulations
    always have a geometry to work with; a video without any face is a rendering bug and raises.
    """
    n, h, w = frames.shape[:3]
    points = np.zeros((n, 468, 2), np.float32)
    found = np.zeros(n, bool)
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=False) as mesh:
        for i, frame in enumerate(frames):
            result = mesh.process(frame)
            if result.multi_face_landmarks:
                points[i] = [(p.x * w, p.y * h) for p in result.multi_face_landmarks[0].landmark]
                found[i] = True
    if not found.any():
        raise RuntimeError("MediaPipe found no face in any frame of a rendered video")
    hits = np.flatnonzero(found)
    for i in np.flatnonzero(~found):
        points[i] = points[hits[np.argmin(np.abs(hits - i))]]
    return points, found


def triangulate(points: np.ndarray) -> np.ndarray:
    """Delaunay triangles (T, 3) as landmark indices, from cv2.Subdiv2D."""
    x0, y0 = np.floor(points.min(axis=0)) - 1
    x1, y1 = np.ceil(points.max(axis=0)) + 1
    subdiv = cv2.Subdiv2D((int(x0), int(y0), int(x1 - x0) + 1, int(y1 - y0) + 1))
    subdiv.insert([(float(x), float(y)) for x, y in points])
    corners = subdiv.getTriangleList().reshape(-1, 3, 2)
    # Subdiv2D merges coincident points and adds virtual outer vertices; map back by nearest landmark.
    dist = np.linalg.norm(corners[:, :, None, :] - points[None, None], axis=-1)
    index = dist.argmin(axis=-1)
    ok = (dist.min(axis=-1) < 0.5).all(axis=1) & (index[:, 0] != index[:, 1]) & (index[:, 1] != index[:, 2]) \
        & (index[:, 0] != index[:, 2])
    return index[ok]


def piecewise_affine(src: np.ndarray, src_pts: np.ndarray, dst_pts: np.ndarray, triangles: np.ndarray,
                     shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Warp src so every triangle of src_pts lands on the same triangle of dst_pts.

    Equivalent to one cv2.warpAffine per triangle, done as a single remap: each destination pixel is
    labelled with its triangle and mapped back through that triangle's affine. Returns the warped
    image (float32) and its coverage mask (float32 0/1) of the given (height, width).
    """
    h, w = shape
    dst = dst_pts[triangles].astype(np.float64)
    src_tri = src_pts[triangles].astype(np.float64)
    # Closed-form 2x2 inverses: batched np.linalg.solve is slow for thousands of tiny systems.
    edges = np.stack([dst[:, 1] - dst[:, 0], dst[:, 2] - dst[:, 0]], axis=2)  # (T, 2, 2), columns are edges
    det = edges[:, 0, 0] * edges[:, 1, 1] - edges[:, 0, 1] * edges[:, 1, 0]
    keep = np.abs(det) > 1e-3
    edges, det, dst, src_tri = edges[keep], det[keep], dst[keep], src_tri[keep]
    inverse = np.stack([np.stack([edges[:, 1, 1], -edges[:, 0, 1]], 1),
                        np.stack([-edges[:, 1, 0], edges[:, 0, 0]], 1)], 1) / det[:, None, None]
    linear = np.stack([src_tri[:, 1] - src_tri[:, 0], src_tri[:, 2] - src_tri[:, 0]], axis=2) @ inverse
    offset = src_tri[:, 0] - np.einsum("tij,tj->ti", linear, dst[:, 0])
    x0, y0 = np.clip(np.floor(dst.reshape(-1, 2).min(axis=0)).astype(int), 0, [w, h])
    x1, y1 = np.clip(np.ceil(dst.reshape(-1, 2).max(axis=0)).astype(int) + 1, 0, [w, h])
    warped = np.zeros((h, w, src.shape[2]), np.float32)
    mask = np.zeros((h, w), np.float32)
    if x1 <= x0 or y1 <= y0:
        return warped, mask
    label = np.full((y1 - y0, x1 - x0), -1, np.int32)
    for k, tri in enumerate(np.round((dst - (x0, y0)) * 16).astype(np.int32)):
        cv2.fillConvexPoly(label, tri, k, cv2.LINE_8, 4)
    ys, xs = np.nonzero(label >= 0)
    tri = label[ys, xs]
    lin, off = linear[tri], offset[tri]
    gx, gy = (xs + x0).astype(np.float64), (ys + y0).astype(np.float64)
    map_x = np.full(label.shape, -1, np.float32)
    map_y = np.full(label.shape, -1, np.float32)
    map_x[ys, xs] = lin[:, 0, 0] * gx + lin[:, 0, 1] * gy + off[:, 0]
    map_y[ys, xs] = lin[:, 1, 0] * gx + lin[:, 1, 1] * gy + off[:, 1]
    warped[y0:y1, x0:x1] = cv2.remap(src.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_REFLECT)
    mask[y0:y1, x0:x1] = label >= 0
    return warped, mask


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation (2, 3) mapping src points to dst (Umeyama)."""
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - ms, dst - md
    u, sig, vt = np.linalg.svd(b.T @ a / len(src))
    flip = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rot = u @ flip @ vt
    scale = np.trace(np.diag(sig) @ flip) / a.var(axis=0).sum()
    return np.concatenate([scale * rot, (md - scale * rot @ ms)[:, None]], axis=1)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _hull_mask(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(points).astype(np.int32)), 1)
    return mask


def _expression(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pose-normalised landmarks (N, 468, 2) in frame 0's coordinates, and each frame's map back."""
    to_first = [similarity(p[STABLE], points[0][STABLE]) for p in points]
    normalised = np.stack([_apply(m, p) for m, p in zip(to_first, points)])
    back = np.stack([cv2.invertAffineTransform(m) for m in to_first])
    return normalised, back


def transfer_expression(target: np.ndarray, driver: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """Target landmarks with the driver's expression on the `moved` landmarks, frame by frame.

    Each video's first frame is its neutral reference: the driver's displacement from its neutral
    (with head pose removed) is rescaled/rotated into the target's neutral frame and replaces the
    target's own displacement, then mapped back to the target's head pose in that frame.
    """
    moved = np.setdiff1d(moved, STABLE)  # the pose anchors (eye corners among them) stay the target's
    target_n, target_back = _expression(target)
    driver_n, _ = _expression(driver)
    linear = similarity(driver[0][STABLE], target[0][STABLE])[:, :2]
    result_n = target_n.copy()
    result_n[:, moved] = target[0][moved] + (driver_n[:, moved] - driver[0][moved]) @ linear.T
    return np.stack([_apply(m, p) for m, p in zip(target_back, result_n)]).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Manipulations: (target frames, target landmarks, source frames, source landmarks, rng) -> fake frames.
# rng varies each fake's settings (blend, rank, colour match) the way real fakes vary in quality.
# ----------------------------------------------------------------------------------------------

def _face_size(points: np.ndarray) -> float:
    return float(np.linalg.norm(points[234] - points[454]))


def face_swap(target: np.ndarray, target_pts: np.ndarray, donor: np.ndarray, donor_pts: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
    """Donor face warped onto the target mesh, convex-hull mask, Poisson blending (seamlessClone)."""
    triangles = triangulate(target_pts[0])
    shrink = np.ones((k := 2 * int(rng.integers(1, 4)) + 1, k), np.uint8)
    h, w = target.shape[1:3]
    out = np.empty_like(target)
    for i in range(len(target)):
        warped, covered = piecewise_affine(donor[i], donor_pts[i], target_pts[i], triangles, (h, w))
        mask = _hull_mask(target_pts[i], (h, w)) * (cv2.erode(covered, shrink) > 0)
        mask[:2], mask[-2:], mask[:, :2], mask[:, -2:] = 0, 0, 0, 0  # seamlessClone needs a border
        x, y, bw, bh = cv2.boundingRect(mask)
        out[i] = cv2.seamlessClone(np.clip(warped + 0.5, 0, 255).astype(np.uint8), target[i], mask * 255,
                                   (x + bw // 2, y + bh // 2), cv2.NORMAL_CLONE)
    return out


def face2face(target: np.ndarray, target_pts: np.ndarray, driver: np.ndarray, driver_pts: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
    """Driver's mouth/eye/brow motion on the target; the target's own pixels, re-warped.

    Like Face2Face, the target frame whose mouth and eyes look most like the wanted expression is
    retrieved and warped to the new landmarks, so an opening mouth shows the target's own teeth.
    """
    moved = np.concatenate([LIPS, EYES, BROWS])
    wanted = transfer_expression(target_pts, driver_pts, moved)
    target_n, _ = _expression(target_pts)
    wanted_n, _ = _expression(wanted)
    triangles = triangulate(target_pts[0])
    softness = rng.uniform(0.02, 0.04)
    h, w = target.shape[1:3]
    out = np.empty_like(target)
    for i in range(len(target)):
        k = int(np.argmin(((target_n[:, moved] - wanted_n[i, moved]) ** 2).sum(axis=(1, 2))))
        warped, covered = piecewise_affine(target[k], target_pts[k], wanted[i], triangles, (h, w))
        feather = max(1.0, softness * _face_size(target_pts[i]))
        mask = cv2.GaussianBlur(_hull_mask(target_pts[i][OVAL], (h, w)).astype(np.float32), (0, 0), feather) * covered
        out[i] = _blend(target[i], warped, mask, _mask_box(mask))
    return out


def neural_textures(target: np.ndarray, target_pts: np.ndarray, driver: np.ndarray, driver_pts: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """Mouth re-rendered from a texture model learnt on the target's own mouth, driven by the driver.

    The target's mouth region is unwrapped into a fixed texture space in every frame; a low-rank
    PCA of those textures plus a ridge regression from lip shape to PCA coefficients play the
    neural renderer. The driver's lip motion picks the coefficients; the rendered texture is
    warped onto the new mouth and blended into a feathered mouth mask.
    """
    wanted = transfer_expression(target_pts, driver_pts, LIPS)
    target_n, _ = _expression(target_pts)
    wanted_n, _ = _expression(wanted)
    neutral = target_pts[0]
    centre = neutral[LIPS].mean(axis=0)
    reach = 0.8 * np.linalg.norm(neutral[MOUTH_CORNERS[0]] - neutral[MOUTH_CORNERS[1]])
    region = np.flatnonzero(np.linalg.norm(neutral - centre, axis=1) < reach)
    all_tris = triangulate(neutral)
    triangles = all_tris[np.isin(all_tris, region).all(axis=1)]
    uv = neutral - neutral[region].min(axis=0) + 2
    uv_shape = tuple(int(v) for v in np.ceil(uv[region].max(axis=0) + 3)[::-1])
    textures = np.stack([piecewise_affine(f, p, uv, triangles, uv_shape)[0] for f, p in zip(target, target_pts)])
    flat = textures.reshape(len(textures), -1)
    mean = flat.mean(axis=0)
    u, sig, vt = np.linalg.svd(flat - mean, full_matrices=False)
    rank = min(int(rng.integers(4, 9)), len(flat) - 1)
    scores = u[:, :rank] * sig[:rank]
    shape = (target_n[:, LIPS] - neutral[LIPS]).reshape(len(flat), -1)
    gram = shape.T @ shape
    ridge = np.linalg.solve(gram + (1e-2 * np.trace(gram) / len(gram) + 1e-6) * np.eye(len(gram)), shape.T @ scores)
    h, w = target.shape[1:3]
    out = np.empty_like(target)
    for i in range(len(target)):
        coeff = (wanted_n[i, LIPS] - neutral[LIPS]).reshape(1, -1) @ ridge
        texture = (mean + coeff @ vt[:rank]).reshape(textures.shape[1:])
        rendered, covered = piecewise_affine(texture, uv, wanted[i], triangles, (h, w))
        feather = max(1.0, 0.02 * _face_size(target_pts[i]))
        mask = cv2.GaussianBlur(cv2.erode(covered, np.ones((3, 3), np.uint8)), (0, 0), feather) * covered
        out[i] = _blend(target[i], rendered, mask, _mask_box(mask))
    return out


# Where the eye centres, nose tip and mouth centre sit in the 64x64 "autoencoder" crop.
_DF_TEMPLATE = np.array([[21, 25], [43, 25], [32, 37], [32, 47]], np.float64)
_DF_SIZE = 64


def _df_keypoints(points: np.ndarray) -> np.ndarray:
    return np.stack([points[RIGHT_EYE].mean(axis=0), points[LEFT_EYE].mean(axis=0), points[NOSE_TIP],
                     points[LIPS].mean(axis=0)])


def deepfakes(target: np.ndarray, target_pts: np.ndarray, donor: np.ndarray, donor_pts: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
    """Donor identity at the target's pose and expression, as a 64x64 autoencoder would output it.

    The donor face is warped to the target mesh (what the decoder's output geometry is), resampled
    through an aligned 64x64 crop (the autoencoder's resolution and blur), colour-transferred to the
    target only partly (the usual mismatch) and alpha-blended through a Gaussian-feathered mask.
    """
    triangles = triangulate(target_pts[0])
    strength = rng.uniform(0.45, 0.85)
    inner = np.concatenate([BROWS, OVAL[np.isin(OVAL, STABLE, invert=True)], LIPS, EYES])
    h, w = target.shape[1:3]
    out = np.empty_like(target)
    for i in range(len(target)):
        warped, covered = piecewise_affine(donor[i], donor_pts[i], target_pts[i], triangles, (h, w))
        align = similarity(_df_keypoints(target_pts[i]), _DF_TEMPLATE)
        zoom = np.sqrt(abs(np.linalg.det(align[:, :2])))
        if zoom < 1:  # low-pass before decimating, as a resize to 64x64 would
            warped = cv2.GaussianBlur(warped, (0, 0), 0.5 / zoom)
        crop = cv2.warpAffine(warped, align, (_DF_SIZE, _DF_SIZE), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)
        mask = _hull_mask(target_pts[i][inner], (h, w)).astype(np.float32) * covered
        size = _face_size(target_pts[i])
        mask = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=max(1, int(0.02 * size)))
        mask = cv2.GaussianBlur(mask, (0, 0), max(1.0, 0.05 * size))
        box = _mask_box(mask)
        back = cv2.invertAffineTransform(align)
        back[:, 2] -= (box[1].start, box[0].start)  # decode straight into the mask's box
        face = cv2.warpAffine(crop, back, (box[1].stop - box[1].start, box[0].stop - box[0].start),
                              flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
        face = _colour_transfer(np.clip(face, 0, 255), target[i][box], mask[box] > 0.5, strength)
        out[i] = _blend(target[i], face, mask, box)
    return out


def _mask_box(mask: np.ndarray) -> tuple[slice, slice]:
    """Bounding box of a soft mask: blending only there keeps the per-frame cost to the face."""
    x, y, w, h = cv2.boundingRect((mask > 1e-3).astype(np.uint8))
    return slice(y, y + h), slice(x, x + w)


def _blend(frame: np.ndarray, layer: np.ndarray, mask: np.ndarray, box: tuple[slice, slice]) -> np.ndarray:
    """frame with layer alpha-blended through mask inside box; layer is box-sized or frame-sized."""
    out = frame.copy()
    alpha = mask[box][..., None]
    patch = layer if layer.shape[:2] == alpha.shape[:2] else layer[box]
    out[box] = np.clip(frame[box] * (1 - alpha) + patch * alpha + 0.5, 0, 255).astype(np.uint8)
    return out


def _colour_transfer(src: np.ndarray, reference: np.ndarray, region: np.ndarray, strength: float) -> np.ndarray:
    """Reinhard mean/std matching in Lab, applied only `strength` of the way."""
    if not region.any():
        return src
    lab_src = cv2.cvtColor(src.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    lab_ref = cv2.cvtColor(reference.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    mu_s, sd_s = lab_src[region].mean(axis=0), lab_src[region].std(axis=0) + 1e-3
    mu_r, sd_r = lab_ref[region].mean(axis=0), lab_ref[region].std(axis=0) + 1e-3
    matched = (lab_src - mu_s) * (sd_r / sd_s) + mu_r
    lab = lab_src + strength * (matched - lab_src)
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB) * 255


MANIPULATIONS = {"Deepfakes": deepfakes, "Face2Face": face2face, "FaceSwap": face_swap,
                 "NeuralTextures": neural_textures}


# ----------------------------------------------------------------------------------------------
# Encoding and the worker tasks
# ----------------------------------------------------------------------------------------------

def encode_video(frames: np.ndarray, path: Path, crf: int, fps: int) -> int:
    """H.264 in MP4 at a CRF, single-threaded so the bytes are reproducible; returns the file size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # Macroblock-tree rate control made the bitstream differ between runs of the same frames with
        # the x264 builds in PyAV's wheels (16.x and 18.x, single-threaded; asm=0 also cures it), so
        # the benchmark would not be reproducible; CRF without mbtree is.
        stream.options = {"crf": str(crf), "preset": "medium", "x264-params": "mbtree=0"}
        stream.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    os.replace(tmp, path)
    return path.stat().st_size


def _real_path(out: Path, quality: str, vid: str) -> Path:
    return out / "original_sequences" / "youtube" / quality / "videos" / f"{vid}.mp4"


def _fake_path(out: Path, method: str, quality: str, name: str) -> Path:
    return out / "manipulated_sequences" / method / quality / "videos" / f"{name}.mp4"


def _cache(out: Path, vid: str) -> tuple[Path, Path]:
    return out / WORK_DIR / f"{vid}.frames.npy", out / WORK_DIR / f"{vid}.landmarks.npy"


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _real_task(out: Path, config: SynthConfig, video: Video) -> dict[str, float]:
    start = time.perf_counter()
    cv2.setNumThreads(1)
    frames = render_real(config, video)
    points, found = face_landmarks(frames)
    frames_path, points_path = _cache(out, video.vid)
    _save(frames_path, frames)
    _save(points_path, points)
    size = sum(encode_video(frames, _real_path(out, q, video.vid), QUALITY_CRF[q], config.fps)
               for q in config.qualities)
    return {"seconds": time.perf_counter() - start, "mesh_rate": float(found.mean()), "bytes": size}


def _fake_task(out: Path, config: SynthConfig, job: FakeJob) -> dict[str, float]:
    start = time.perf_counter()
    cv2.setNumThreads(1)
    (target_frames, target_points), (source_frames, source_points) = (
        tuple(np.load(p) for p in _cache(out, vid)) for vid in (job.target, job.source))
    rng = np.random.default_rng([config.seed, _SALT_FAKE, METHODS.index(job.method), int(job.target),
                                 int(job.source)])
    fake = MANIPULATIONS[job.method](target_frames, target_points, source_frames, source_points, rng)
    size = sum(encode_video(fake, _fake_path(out, job.method, q, job.name), QUALITY_CRF[q], config.fps)
               for q in config.qualities)
    return {"seconds": time.perf_counter() - start, "bytes": size}


def _run_all(pool: ProcessPoolExecutor, tasks: dict[str, Future[dict[str, float]]], what: str) -> dict[str, dict]:
    """Wait for every task, logging each finished video; the first failure cancels the rest."""
    results: dict[str, dict] = {}
    by_future = {future: name for name, future in tasks.items()}
    pending = set(by_future)
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            name = by_future[future]
            try:
                results[name] = future.result()
            except BaseException:
                for other in pending:
                    other.cancel()
                raise
            logger.info("%s %s done in %.1fs (%d/%d)", what, name, results[name]["seconds"], len(results), len(tasks))
    return results


def generate_benchmark(out: Path, config: SynthConfig) -> dict:
    """Render the benchmark into `out` in the FaceForensics++ layout; returns counts and timings."""
    out = Path(out)
    start = time.perf_counter()
    plan = plan_benchmark(config)
    fakes = plan.fakes()
    (out / WORK_DIR).mkdir(parents=True, exist_ok=True)
    logger.info("synthetic benchmark: %d real and %d fake videos x %d qualities into %s with %d workers",
                len(plan.videos), len(fakes), len(config.qualities), out, config.workers)
    context = multiprocessing.get_context("spawn")  # MediaPipe hangs in forked workers
    try:
        with ProcessPoolExecutor(max_workers=config.workers, mp_context=context) as pool:
            reals = _run_all(pool, {v.vid: pool.submit(_real_task, out, config, v) for v in plan.videos}, "real")
            real_seconds = time.perf_counter() - start
            made = _run_all(pool, {f"{job.method}/{job.name}": pool.submit(_fake_task, out, config, job)
                                   for job in fakes}, "fake")
    finally:
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)

    splits_dir = out / "splits"
    splits_dir.mkdir(parents=True, exist_ok=True)
    for split, pairs in plan.pairs.items():
        (splits_dir / f"{split}.json").write_text(json.dumps([list(p) for p in pairs]) + "\n")
    meta = {
        "generator": __name__,
        "config": config.model_dump(mode="json"),
        "videos": {v.vid: {"identity": v.identity, "split": v.split, "mesh_rate": reals[v.vid]["mesh_rate"]}
                   for v in plan.videos},
        "fakes": [{"method": j.method, "name": j.name, "target": j.target, "source": j.source, "split": j.split}
                  for j in fakes],
    }
    (out / "synth_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    seconds = time.perf_counter() - start
    summary = {
        "reals": len(plan.videos),
        "fakes": len(fakes),
        "files": (len(plan.videos) + len(fakes)) * len(config.qualities),
        "identities": config.identities,
        "split_videos": {s: sum(v.split == s for v in plan.videos) for s in plan.pairs},
        "bytes": int(sum(r["bytes"] for r in reals.values()) + sum(r["bytes"] for r in made.values())),
        "mesh_rate": float(np.mean([r["mesh_rate"] for r in reals.values()])),
        "seconds_reals": round(real_seconds, 2),
        "seconds": round(seconds, 2),
    }
    logger.info("synthetic benchmark done: %s", summary)
    return summary
