"""The four FaceForensics++ manipulation families, on any frames with MediaPipe face-mesh landmarks.

Every manipulation takes the target's frames (N, H, W, 3) uint8 RGB and landmarks (N, 468, 2), a
source (donor or driver) video's frames and landmarks of the same length, and a generator that varies
each fake's settings (blend, rank, colour match) the way real fakes vary in quality. It returns the
fake frames and the per-frame manipulation mask (N, H, W) uint8: the blending weight of the
manipulated layer, 0 where the target's pixels are untouched and 255 where they are replaced.

  FaceSwap        donor mesh warped triangle by triangle onto the target, Poisson-blended
  Face2Face       driver expression transferred onto the target mesh, target texture re-warped
                  (mouth and eyes retrieved from the target's own frames, as Face2Face does)
  NeuralTextures  mouth only, re-rendered from a low-rank texture model of the target's mouth
  Deepfakes       donor face at the target's pose squeezed through 64x64, colour-matched badly,
                  feather-blended

Both the synthetic benchmark and `flowood forge` (real footage) call these.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from flowood_ray.media.align import umeyama_similarity
from flowood_ray.media.landmarks import BROWS, EYES, LEFT_EYE, LIPS, MOUTH_CORNERS, NOSE_TIP, OVAL, RIGHT_EYE, STABLE, face_size
from flowood_ray.media.mesh_geometry import hull_mask, piecewise_affine, pose_normalised, transfer_expression, triangulate

METHODS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures")
Fake = tuple[np.ndarray, np.ndarray]  # (frames (N, H, W, 3) uint8, masks (N, H, W) uint8)
Manipulation = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.random.Generator], Fake]


def face_swap(target: np.ndarray, target_pts: np.ndarray, donor: np.ndarray, donor_pts: np.ndarray,
              rng: np.random.Generator) -> Fake:
    """Donor face warped onto the target mesh, convex-hull mask, Poisson blending (seamlessClone)."""
    triangles = triangulate(target_pts[0])
    shrink = np.ones((k := 2 * int(rng.integers(1, 4)) + 1, k), np.uint8)
    h, w = target.shape[1:3]
    out, masks = np.empty_like(target), np.zeros(target.shape[:3], np.uint8)
    for i in range(len(target)):
        warped, covered = piecewise_affine(donor[i], donor_pts[i], target_pts[i], triangles, (h, w))
        mask = hull_mask(target_pts[i], (h, w)) * (cv2.erode(covered, shrink) > 0).astype(np.uint8)
        mask[:2], mask[-2:], mask[:, :2], mask[:, -2:] = 0, 0, 0, 0  # seamlessClone needs a border
        if not mask.any():  # the face left the frame: nothing to clone into
            out[i] = target[i]
            continue
        x, y, bw, bh = cv2.boundingRect(mask)
        out[i] = cv2.seamlessClone(np.clip(warped + 0.5, 0, 255).astype(np.uint8), target[i], mask * 255,
                                   (x + bw // 2, y + bh // 2), cv2.NORMAL_CLONE)
        # Poisson blending rewrites every pixel inside the mask, so the whole mask is manipulated.
        masks[i] = mask * 255
    return out, masks


def face2face(target: np.ndarray, target_pts: np.ndarray, driver: np.ndarray, driver_pts: np.ndarray,
              rng: np.random.Generator) -> Fake:
    """Driver's mouth/eye/brow motion on the target; the target's own pixels, re-warped.

    Like Face2Face, the target frame whose mouth and eyes look most like the wanted expression is
    retrieved and warped to the new landmarks, so an opening mouth shows the target's own teeth.
    """
    moved = np.concatenate([LIPS, EYES, BROWS])
    wanted = transfer_expression(target_pts, driver_pts, moved)
    target_n, _ = pose_normalised(target_pts)
    wanted_n, _ = pose_normalised(wanted)
    triangles = triangulate(target_pts[0])
    softness = rng.uniform(0.02, 0.04)
    h, w = target.shape[1:3]
    out, masks = np.empty_like(target), np.zeros(target.shape[:3], np.uint8)
    for i in range(len(target)):
        k = int(np.argmin(((target_n[:, moved] - wanted_n[i, moved]) ** 2).sum(axis=(1, 2))))
        warped, covered = piecewise_affine(target[k], target_pts[k], wanted[i], triangles, (h, w))
        feather = max(1.0, softness * face_size(target_pts[i]))
        mask = cv2.GaussianBlur(hull_mask(target_pts[i][OVAL], (h, w)).astype(np.float32), (0, 0), feather) * covered
        out[i] = _blend(target[i], warped, mask, _mask_box(mask))
        masks[i] = _alpha_u8(mask)
    return out, masks


def neural_textures(target: np.ndarray, target_pts: np.ndarray, driver: np.ndarray, driver_pts: np.ndarray,
                    rng: np.random.Generator) -> Fake:
    """Mouth re-rendered from a texture model learnt on the target's own mouth, driven by the driver.

    The target's mouth region is unwrapped into a fixed texture space in every frame; a low-rank
    PCA of those textures plus a ridge regression from lip shape to PCA coefficients play the
    neural renderer. The driver's lip motion picks the coefficients; the rendered texture is
    warped onto the new mouth and blended into a feathered mouth mask.
    """
    wanted = transfer_expression(target_pts, driver_pts, LIPS)
    target_n, _ = pose_normalised(target_pts)
    wanted_n, _ = pose_normalised(wanted)
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
    out, masks = np.empty_like(target), np.zeros(target.shape[:3], np.uint8)
    for i in range(len(target)):
        coeff = (wanted_n[i, LIPS] - neutral[LIPS]).reshape(1, -1) @ ridge
        texture = (mean + coeff @ vt[:rank]).reshape(textures.shape[1:])
        rendered, covered = piecewise_affine(texture, uv, wanted[i], triangles, (h, w))
        feather = max(1.0, 0.02 * face_size(target_pts[i]))
        mask = cv2.GaussianBlur(cv2.erode(covered, np.ones((3, 3), np.uint8)), (0, 0), feather) * covered
        out[i] = _blend(target[i], rendered, mask, _mask_box(mask))
        masks[i] = _alpha_u8(mask)
    return out, masks


# Where the eye centres, nose tip and mouth centre sit in the 64x64 "autoencoder" crop.
_DF_TEMPLATE = np.array([[21, 25], [43, 25], [32, 37], [32, 47]], np.float64)
_DF_SIZE = 64


def _df_keypoints(points: np.ndarray) -> np.ndarray:
    return np.stack([points[RIGHT_EYE].mean(axis=0), points[LEFT_EYE].mean(axis=0), points[NOSE_TIP],
                     points[LIPS].mean(axis=0)])


def deepfakes(target: np.ndarray, target_pts: np.ndarray, donor: np.ndarray, donor_pts: np.ndarray,
              rng: np.random.Generator) -> Fake:
    """Donor identity at the target's pose and expression, as a 64x64 autoencoder would output it.

    The donor face is warped to the target mesh (what the decoder's output geometry is), resampled
    through an aligned 64x64 crop (the autoencoder's resolution and blur), colour-transferred to the
    target only partly (the usual mismatch) and alpha-blended through a Gaussian-feathered mask.
    """
    triangles = triangulate(target_pts[0])
    strength = rng.uniform(0.45, 0.85)
    inner = np.concatenate([BROWS, OVAL[np.isin(OVAL, STABLE, invert=True)], LIPS, EYES])
    h, w = target.shape[1:3]
    out, masks = np.empty_like(target), np.zeros(target.shape[:3], np.uint8)
    for i in range(len(target)):
        warped, covered = piecewise_affine(donor[i], donor_pts[i], target_pts[i], triangles, (h, w))
        align = umeyama_similarity(_df_keypoints(target_pts[i]), _DF_TEMPLATE)
        zoom = np.sqrt(abs(np.linalg.det(align[:, :2])))
        if zoom < 1:  # low-pass before decimating, as a resize to 64x64 would
            warped = cv2.GaussianBlur(warped, (0, 0), 0.5 / zoom)
        crop = cv2.warpAffine(warped, align, (_DF_SIZE, _DF_SIZE), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)
        mask = hull_mask(target_pts[i][inner], (h, w)).astype(np.float32) * covered
        size = face_size(target_pts[i])
        mask = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=max(1, int(0.02 * size)))
        mask = cv2.GaussianBlur(mask, (0, 0), max(1.0, 0.05 * size))
        if not (mask > 1e-3).any():  # the face left the frame: nothing to decode into
            out[i] = target[i]
            continue
        box = _mask_box(mask)
        back = cv2.invertAffineTransform(align)
        back[:, 2] -= (box[1].start, box[0].start)  # decode straight into the mask's box
        face = cv2.warpAffine(crop, back, (box[1].stop - box[1].start, box[0].stop - box[0].start),
                              flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
        face = _colour_transfer(np.clip(face, 0, 255), target[i][box], mask[box] > 0.5, strength)
        out[i] = _blend(target[i], face, mask, box)
        masks[i] = _alpha_u8(mask)
    return out, masks


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


def _alpha_u8(mask: np.ndarray) -> np.ndarray:
    return np.clip(mask * 255 + 0.5, 0, 255).astype(np.uint8)


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


MANIPULATIONS: dict[str, Manipulation] = {
    "Deepfakes": deepfakes, "Face2Face": face2face, "FaceSwap": face_swap, "NeuralTextures": neural_textures,
}
