"""Procedural talking heads for the synthetic benchmark, drawn with OpenCV and numpy.

Real deepfake datasets cannot be downloaded here, so the benchmark draws people realistic enough for
MediaPipe to find and mesh the face in nearly every frame: an identity (proportions, colours), a
scene (room, light, camera, how the head moves and talks) and a pose per instant. A video is a pure
function of (seed, video).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from flowood_ray.media.synth_plan import SynthConfig, Video

# Salts keep the random streams of identities and scenes independent of each other and of the splits.
_SALT_IDENTITY, _SALT_SCENE = 13, 17

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
