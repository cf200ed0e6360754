"""Self-Blended Images (Shiohara & Yamasaki, CVPR 2022): pseudo-fakes made from one real face.

A crop is blended with an altered copy of itself inside a soft, deformed face mask. The result carries
what face manipulations leave where the generated face meets the real frame (a blending boundary, a
colour and a sharpness mismatch, a slight misalignment) without any generator's fingerprint, so a
real-vs-blended classifier learns those traces instead of one manipulation's look. Every alteration is
drawn from a range that reaches (almost) zero, so no single cue is present in every blend. A quarter
of the masks (by default) cover only the lower face, so that seams inside the face, where a reenacted
mouth meets the real face around it, are in the training set too.

Geometry is measured in face heights (chin to the top of the mesh, MediaPipe points 152 and 10), so the
same config suits crops of any size; all randomness comes from the caller's numpy Generator.
"""

from __future__ import annotations

from typing import Annotated

import cv2
import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from flowood_ray.models.filters import BINOMIAL5, gaussian_kernel, separable_blur

MESH_POINTS = 468
FOREHEAD_TOP, CHIN = 10, 152  # FaceMesh: centre of the upper forehead, tip of the chin


def _ordered(pair: tuple[float, float]) -> tuple[float, float]:
    if pair[0] > pair[1]:
        raise ValueError(f"range {pair} has its low end above its high end")
    return pair


NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Share = Annotated[float, Field(gt=0, le=1)]
Probability = Annotated[float, Field(ge=0, le=1)]
Range = Annotated[tuple[float, float], AfterValidator(_ordered)]
NonNegativeRange = Annotated[tuple[NonNegative, NonNegative], AfterValidator(_ordered)]
PositiveRange = Annotated[tuple[Positive, Positive], AfterValidator(_ordered)]
ShareRange = Annotated[tuple[Share, Share], AfterValidator(_ordered)]


class SelfBlendConfig(BaseModel):
    """Each range is (low, high), drawn uniformly and independently per crop."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Mask: the landmark hull, its forehead raised, then deformed so its outline is never the mesh's own.
    forehead_lift: NonNegativeRange = Field((0.1, 0.5), description="hull points above the face centre are pushed "
        "away from it by this share of their distance, in proportion to their height: the top of the mesh rises by "
        "0.05-0.25 face heights, to somewhere between the mesh's edge and the hairline, like SBI's 81-point forehead")
    lower_face_probability: Probability = Field(0.25, description="the mask covers only the face below a cut "
        "across it (the hull of the mesh points under the cut) instead of the whole lifted hull: the mouth-and-jaw "
        "region that reenactments (NeuralTextures, Face2Face) re-render, whose seam crosses the cheeks and the nose "
        "instead of following the face outline; SBI's own whole-face hulls leave that seam unseen")
    lower_face_cut: Range = Field((-0.12, 0.1), description="height of that cut above the face centre (midway "
        "between the chin and the mesh top, just under the nose bridge), in face heights: from between the nose "
        "tip and the upper lip (-0.12: mouth and chin) to just under the eyes (0.1: nose, cheeks, mouth, chin)")
    elastic_amplitude: NonNegativeRange = Field((0.0, 0.04), description="peak displacement of the smooth random "
        "field that wobbles the mask outline, in face heights (about 0-2.5 px on a 60 px face)")
    elastic_grid: int = Field(5, ge=2, description="control points per side of that field: a few bumps per outline")
    mask_rotation_deg: Range = Field((-5.0, 5.0), description="rotation of the mask about the face centre: "
        "a swap's mask follows its own, slightly wrong, estimate of the head pose")
    mask_scale: PositiveRange = Field((0.95, 1.05), description="scale of the mask about the face centre, for the "
        "same reason: the seam moves by up to 5 % of the face's extent")
    mask_shift: Range = Field((-0.03, 0.03), description="shift of the mask along each axis, in face heights "
        "(up to 2 px on a 60 px face): a seam off the landmark outline")
    mask_morph_radius: Range = Field((-0.06, 0.06), description="erosion (negative) or dilation radius, in face "
        "heights: a blend edge inside the cheeks as well as one out at the jaw and hair")
    mask_blur_sigma: NonNegativeRange = Field((0.015, 0.1), description="Gaussian blur of the mask edge, in face "
        "heights: from a near-hard seam to a wide feather, as swaps blend with either")
    mask_epsilon: float = Field(1 / 255, gt=0, lt=0.5, description="mask values below it become 0 and above "
        "1 - it become 1, so outside and inside are exact; at 1/255 the cut moves no pixel by a full grey level")
    blend_ratios: tuple[Share, ...] = Field((0.25, 0.5, 0.75, 1.0, 1.0, 1.0),
        min_length=1, description="the mask's peak, drawn from these (SBI's list): half the blends are opaque")
    # Source-target augmentation: one copy is recoloured and resampled, so the inside and the outside differ.
    alter_target_probability: Probability = Field(0.5, description="the altered copy is the target (the "
        "frame around the face) rather than the source: either side of the seam may be the odd one, as in SBI")
    rgb_shift: Range = Field((-20.0, 20.0), description="grey levels added to each RGB channel (SBI): the "
        "white-balance and skin-tone mismatch between a donor face and the target frame")
    hue_shift_deg: Range = Field((-10.0, 10.0), description="hue rotation, in degrees: a skin-tone shift that "
        "keeps the face a face (beyond about 15 degrees skin turns green or purple)")
    saturation_scale: PositiveRange = Field((0.8, 1.2), description="HSV saturation factor: the paler or ruddier "
        "face that a generator's colour drift leaves; value is left to brightness and contrast")
    brightness: Range = Field((-25.0, 25.0), description="grey levels added to all channels (SBI's +-10 %)")
    contrast: PositiveRange = Field((0.9, 1.1), description="factor on the distance from the image mean (SBI's +-10 %)")
    # Frequency alteration: always one of the two, as in SBI, each reaching down to a faint change.
    sharpen_probability: Probability = Field(0.5, description="sharpen; otherwise downscale and upscale back")
    sharpen_amount: NonNegativeRange = Field((0.2, 1.0), description="unsharp-mask gain over a binomial blur: the "
        "over-crisp texture of a GAN decoder or an enhancement pass, from faint to strong")
    downscale_factor: ShareRange = Field((0.4, 0.9), description="side of the intermediate "
        "image as a share of the crop's: the blur of a face rendered at a lower resolution and pasted in")
    # Misalignment of the source against the target.
    source_shift: Range = Field((-0.03, 0.03), description="shift of the source along each axis, in crop sides "
        "(up to 4 px at 128 px): a face pasted slightly off the one it replaces, which doubles edges at the seam")
    source_scale: PositiveRange = Field((0.95, 1.05), description="scale of the source about the face centre: "
        "a face rendered a few per cent too large or small")


def _check_batch(images: np.ndarray, name: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"{name} must be a uint8 array (N, H, W, 3), got "
                         f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")


def _draw(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _face_frame(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Face centre, unit vector towards the forehead, and face height, from the chin and the mesh top."""
    top, chin = points[FOREHEAD_TOP].astype(np.float64), points[CHIN].astype(np.float64)
    height = float(np.linalg.norm(top - chin))
    if height < 1:
        raise ValueError("landmarks put the forehead and the chin less than a pixel apart")
    return (top + chin) / 2, (top - chin) / height, height


def _hull_mask(points: np.ndarray, shape: tuple[int, int], lift: float) -> np.ndarray:
    """uint8 0/255 convex hull of the landmarks with its upper half stretched away from the face centre."""
    centre, up, height = _face_frame(points)
    hull = cv2.convexHull(points.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    # 0 at the centre line, 1 at the mesh top: the push fades out towards the cheeks, so the jaw stays put.
    rise = np.clip((hull - centre) @ up / (height / 2), 0, None)
    hull = centre + (hull - centre) * (1 + lift * rise[:, None])
    return _fill_hull(hull, shape)


def _lower_face_mask(points: np.ndarray, shape: tuple[int, int], cut: float) -> np.ndarray:
    """uint8 0/255 convex hull of the landmarks lower than `cut` face heights above the face centre
    (a negative cut lies below the centre)."""
    centre, up, height = _face_frame(points)
    below = points[(points.astype(np.float64) - centre) @ up < cut * height]
    if len(below) < 3:
        raise ValueError(f"fewer than 3 landmarks lie below the cut at {cut} face heights")
    return _fill_hull(below.astype(np.float64), shape)


def _fill_hull(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    subpixel = 4  # fillConvexPoly's fixed-point bits: the outline moves smoothly with the landmarks
    vertices = np.round(cv2.convexHull(points.astype(np.float32)).reshape(-1, 2) * 2**subpixel).astype(np.int32)
    mask = np.zeros(shape, np.uint8)
    cv2.fillConvexPoly(mask, vertices, 255, lineType=cv2.LINE_AA, shift=subpixel)
    return mask


def _deform(mask: np.ndarray, centre: np.ndarray, height: float, rng: np.random.Generator,
            config: SelfBlendConfig) -> np.ndarray:
    """The mask resampled through a small random similarity and a smooth random displacement field."""
    h, w = mask.shape
    angle = np.deg2rad(_draw(rng, config.mask_rotation_deg))
    scale = _draw(rng, config.mask_scale)
    shift = np.array([_draw(rng, config.mask_shift), _draw(rng, config.mask_shift)]) * height
    amplitude = _draw(rng, config.elastic_amplitude) * height
    field = rng.uniform(-amplitude, amplitude, (2, config.elastic_grid, config.elastic_grid)).astype(np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    # remap reads the source at each output pixel: invert the similarity (output = centre + sR(p - centre) + shift).
    dx, dy = xs - centre[0] - shift[0], ys - centre[1] - shift[1]
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    map_x = centre[0] + cos * dx + sin * dy + cv2.resize(field[0], (w, h), interpolation=cv2.INTER_CUBIC)
    map_y = centre[1] - sin * dx + cos * dy + cv2.resize(field[1], (w, h), interpolation=cv2.INTER_CUBIC)
    return cv2.remap(mask, map_x.astype(np.float32), map_y.astype(np.float32), cv2.INTER_LINEAR, borderValue=0)


def _blend_mask(points: np.ndarray, shape: tuple[int, int], rng: np.random.Generator,
                config: SelfBlendConfig) -> np.ndarray:
    """float32 (H, W) mask in [0, ratio]: exactly 0 outside the feathered face (or lower face), exactly
    `ratio` in its core."""
    centre, _, height = _face_frame(points)
    if rng.random() < config.lower_face_probability:
        region = _lower_face_mask(points, shape, _draw(rng, config.lower_face_cut))
    else:
        region = _hull_mask(points, shape, _draw(rng, config.forehead_lift))
    mask = _deform(region, centre, height, rng, config)
    mask = (mask >= 128).astype(np.uint8)
    radius = round(_draw(rng, config.mask_morph_radius) * height)
    if radius:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * abs(radius) + 1, 2 * abs(radius) + 1))
        mask = (cv2.dilate if radius > 0 else cv2.erode)(mask, kernel)
    soft = torch.from_numpy(mask.astype(np.float32))[None, None]
    sigma = _draw(rng, config.mask_blur_sigma) * height
    if sigma > 0:
        soft = separable_blur(soft, gaussian_kernel(sigma), "replicate")
    soft = soft[0, 0].numpy()
    peak = soft.max()
    if peak <= 0:
        raise ValueError("the face mask is empty: the landmarks enclose no pixel of the crop")
    soft = soft / peak
    soft[soft < config.mask_epsilon] = 0
    soft[soft > 1 - config.mask_epsilon] = 1
    return soft * np.float32(rng.choice(config.blend_ratios))


def _alter(image: np.ndarray, rng: np.random.Generator, config: SelfBlendConfig) -> np.ndarray:
    """uint8 (H, W, 3) recoloured (RGB, HSV, brightness, contrast) and resampled or sharpened."""
    x = image.astype(np.float32) + np.array([_draw(rng, config.rgb_shift) for _ in range(3)], np.float32)
    hsv = cv2.cvtColor(np.clip(x, 0, 255) / 255, cv2.COLOR_RGB2HSV)  # float input: hue in degrees, S and V in [0, 1]
    hsv[..., 0] = np.mod(hsv[..., 0] + _draw(rng, config.hue_shift_deg), 360)
    hsv[..., 1] = np.clip(hsv[..., 1] * _draw(rng, config.saturation_scale), 0, 1)
    x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255
    x = (x - x.mean()) * _draw(rng, config.contrast) + x.mean() + _draw(rng, config.brightness)
    if rng.random() < config.sharpen_probability:
        amount = _draw(rng, config.sharpen_amount)
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
        x = (t + amount * (t - separable_blur(t, BINOMIAL5, "replicate")))[0].numpy().transpose(1, 2, 0)
    else:
        h, w = image.shape[:2]
        factor = _draw(rng, config.downscale_factor)
        small = cv2.resize(x, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA)
        x = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _misalign(image: np.ndarray, centre: np.ndarray, rng: np.random.Generator, config: SelfBlendConfig) -> np.ndarray:
    """The source shifted and scaled about the face centre: content at p moves to centre + s(p - centre) + t."""
    h, w = image.shape[:2]
    scale = _draw(rng, config.source_scale)
    tx, ty = _draw(rng, config.source_shift) * w, _draw(rng, config.source_shift) * h
    matrix = np.array([[scale, 0, (1 - scale) * centre[0] + tx], [0, scale, (1 - scale) * centre[1] + ty]])
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def self_blend(crops: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator,
               config: SelfBlendConfig) -> tuple[np.ndarray, np.ndarray]:
    """Real face crops uint8 (N, H, W, 3) and their FaceMesh landmarks (N, 468, 2), (x, y) in crop pixels ->
    self-blended crops uint8 (N, H, W, 3) and their blend masks float32 (N, H, W) in [0, 1].

    out = source * mask + target * (1 - mask), rounded; where the mask is 0 the output is the target exactly.
    """
    _check_batch(crops, "crops")
    n, h, w, _ = crops.shape
    if not isinstance(landmarks, np.ndarray) or landmarks.shape != (n, MESH_POINTS, 2) \
            or not np.issubdtype(landmarks.dtype, np.floating):
        raise ValueError(f"landmarks must be a float array ({n}, {MESH_POINTS}, 2) of FaceMesh points, got "
                         f"{getattr(landmarks, 'dtype', type(landmarks))} {getattr(landmarks, 'shape', '')}")
    if not np.isfinite(landmarks).all():
        raise ValueError("landmarks contain NaN or infinite coordinates")
    blends = np.empty_like(crops)
    masks = np.empty((n, h, w), np.float32)
    for i in range(n):
        crop = np.ascontiguousarray(crops[i])
        masks[i] = _blend_mask(landmarks[i], (h, w), rng, config)
        altered = _alter(crop, rng, config)
        source, target = (crop, altered) if rng.random() < config.alter_target_probability else (altered, crop)
        source = _misalign(source, _face_frame(landmarks[i])[0], rng, config)
        m = masks[i][..., None]
        blends[i] = np.round(source * m + target * (1 - m)).astype(np.uint8)
    return blends, masks


def jpeg_augment(images: np.ndarray, rng: np.random.Generator, quality: tuple[int, int] = (40, 100),
                 p: float = 0.5) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB -> the same, each image JPEG-compressed with probability p at a quality drawn
    from [low, high]: shown to reals and blends alike, so compression is no cue to the label, while blend
    seams must survive the 8x8 blocking and chroma subsampling that compressed deepfakes carry."""
    _check_batch(images, "images")
    low, high = quality
    if not 1 <= low <= high <= 100:
        raise ValueError(f"JPEG quality range {quality} must satisfy 1 <= low <= high <= 100")
    if not 0 <= p <= 1:
        raise ValueError(f"probability {p} must be in [0, 1]")
    out = images.copy()
    for i in range(len(images)):
        if rng.random() >= p:
            continue
        bgr = cv2.cvtColor(np.ascontiguousarray(images[i]), cv2.COLOR_RGB2BGR)
        _, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(low, high + 1))])
        out[i] = cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return out
