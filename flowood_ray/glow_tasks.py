"""The I/O around Glow latent arithmetic (`flowood glow ...`): a registered Glow, crop shards in, image
grids, attribute vectors and a self-contained HTML gallery out. The maths is in models/glow_latent.py.

Crops become model inputs exactly as for scoring (`GlowScorer.model_input`: the bundle's face
fraction and resolution) and model space exactly as for scoring (centre dequantisation), so a
reconstruction is compared with the very input the model saw.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow.compute as pc
import torch

from flowood_ray.media.expression import expression_measures, mesh_images, rule_labels
from flowood_ray.media.facecrop import crops_to_array, meshes_to_array
from flowood_ray.media.landmarks import FaceMesher
from flowood_ray.media.shards import crop_dataset, crop_size
from flowood_ray.models import glow_latent as gl
from flowood_ray.models.glow import Glow, postprocess, preprocess
from flowood_ray.registry import configure, load_registered
from flowood_ray.scoring.scorers import GlowScorer

GALLERY_FILE, GALLERY_PAGE = "gallery.json", "index.html"
GRID_CELL = 128  # grids enlarge small faces (nearest neighbour) to at least this many pixels


class GlowSession:
    """A registered Glow with the input pipeline it was trained with; encodes and decodes in batches."""

    def __init__(self, scorer: GlowScorer, batch_size: int = 32) -> None:
        if scorer.input.highpass:
            raise ValueError(f"{scorer.model_id} models high-pass residuals, not faces: its latents decode to "
                             "residual images, so face arithmetic on them is meaningless")
        self.scorer, self.batch_size = scorer, batch_size
        self.glow: Glow = scorer.glow
        self.model_id = scorer.model_id

    def model_inputs(self, crops: np.ndarray) -> np.ndarray:
        """uint8 crops -> uint8 (N, s, s, 3) model inputs, as scored."""
        return self.scorer.model_input(crops).cpu().numpy()

    def model_space(self, inputs: np.ndarray) -> torch.Tensor:
        return preprocess(torch.from_numpy(inputs).to(self.scorer.device), self.glow.config.n_bits, "center")

    @torch.no_grad()
    def encode(self, inputs: np.ndarray) -> gl.Latents:
        x = self.model_space(inputs)
        return gl.concat_latents([self.glow.encode(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)])

    @torch.no_grad()
    def decode(self, latents: Sequence[torch.Tensor]) -> torch.Tensor:
        """Latents -> x in model space (not clipped)."""
        n = gl.batch_size(latents)
        return torch.cat([self.glow.inverse([z[i : i + self.batch_size] for z in latents])
                          for i in range(0, n, self.batch_size)])

    def images(self, latents: Sequence[torch.Tensor]) -> np.ndarray:
        """Latents -> uint8 (N, s, s, 3) images."""
        return postprocess(self.decode(latents), self.glow.config.n_bits).cpu().numpy()


def open_session(model_uri: str, tracking_uri: str | None, device: str = "cpu", batch_size: int = 32) -> GlowSession:
    configure(tracking_uri)
    bundle = load_registered(model_uri, device)
    if bundle.family != "glow":
        raise ValueError(f"{model_uri} is a {bundle.family!r} model; latent arithmetic needs a glow model")
    return GlowSession(GlowScorer(bundle, device), batch_size)


@dataclass(frozen=True)
class CropSet:
    """Crops of a crops directory in (video id, frame index) order, with their stored meshes (NaN: none)."""

    video_ids: np.ndarray
    frame_indices: np.ndarray
    images: np.ndarray
    meshes: np.ndarray


def read_crops(crops_dir: Path, video_ids: Sequence[str] | None = None, max_crops: int | None = None) -> CropSet:
    """The crops of `video_ids` (all videos when None), at most `max_crops` of them."""
    if not list((Path(crops_dir) / "crops").glob("part-*.parquet")):
        raise ValueError(f"{crops_dir} holds no crop shards: make it with `flowood preprocess`")
    where = None if video_ids is None else pc.field("video_id").isin(list(video_ids))
    table = crop_dataset(crops_dir).to_table(columns=["video_id", "frame_index", "crop", "mesh"], filter=where)
    table = table.sort_by([("video_id", "ascending"), ("frame_index", "ascending")])
    found = set(table.column("video_id").to_pylist())
    if missing := sorted(set(video_ids or ()) - found):
        raise ValueError(f"no crops of video(s) {missing} in {crops_dir}")
    if not table.num_rows:
        raise ValueError(f"no crops in {crops_dir}")
    if max_crops is not None:
        table = table.slice(0, max_crops)
    return CropSet(
        np.asarray(table.column("video_id").to_pylist()), np.asarray(table.column("frame_index").to_pylist()),
        crops_to_array(table, crop_size(crops_dir)), meshes_to_array(table),
    )


def crop_meshes(crops: CropSet) -> np.ndarray:
    """Stored meshes, with MediaPipe run on the crops that have none."""
    meshes = crops.meshes.copy()
    missing = ~np.isfinite(meshes).all(axis=(1, 2))
    if missing.any():
        with FaceMesher() as mesher:
            meshes[missing] = mesh_images(crops.images[missing], mesher)
    return meshes


def parse_floats(text: str) -> list[float]:
    """'0,0.25,1' -> [0.0, 0.25, 1.0]."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"expected at least one number, got {text!r}")
    return values


def read_identities(path: Path) -> dict[str, list[str]]:
    """CSV with columns identity,video_id -> identity -> its video ids (file order)."""
    identities: dict[str, list[str]] = {}
    with Path(path).open(newline="") as file:
        reader = csv.DictReader(file)
        if not {"identity", "video_id"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: expected columns identity,video_id, got {reader.fieldnames}")
        for row in reader:
            identities.setdefault(row["identity"], []).append(row["video_id"])
    if not identities:
        raise ValueError(f"{path} lists no identities")
    return identities


def labels_from_csv(path: Path, crops: CropSet) -> np.ndarray:
    """(N,) int8 labels of `crops` from a CSV video_id,frame_index,label (0/1); -1 for unlisted crops."""
    index = {(v, int(f)): i for i, (v, f) in enumerate(zip(crops.video_ids, crops.frame_indices))}
    labels = np.full(len(index), -1, np.int8)
    with Path(path).open(newline="") as file:
        reader = csv.DictReader(file)
        if not {"video_id", "frame_index", "label"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: expected columns video_id,frame_index,label, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            key = (row["video_id"], int(row["frame_index"]))
            if key not in index:
                raise ValueError(f"{path}:{line}: no crop {key} in the crops directory")
            if row["label"] not in ("0", "1"):
                raise ValueError(f"{path}:{line}: label must be 0 or 1, got {row['label']!r}")
            labels[index[key]] = int(row["label"])
    return labels


def labels_from_rule(crops: CropSet, rule: str) -> np.ndarray:
    """Top third of the rule's measure positive, bottom third negative (see media/expression.py)."""
    return rule_labels(expression_measures(crop_meshes(crops)), rule)


def image_grid(rows: Sequence[np.ndarray], cell: int = GRID_CELL, gap: int = 2) -> np.ndarray:
    """Rows of uint8 (n_i, h, w, 3) images -> one RGB image, white between cells and after short rows."""
    h, w = rows[0].shape[1:3]
    if any(r.shape[1:] != (h, w, 3) or r.dtype != np.uint8 for r in rows):
        raise ValueError("every grid image must be uint8 of the same (h, w, 3)")
    zoom = max(1, cell // max(h, w))
    ch, cw = h * zoom, w * zoom
    columns = max(len(r) for r in rows)
    grid = np.full((len(rows) * (ch + gap) - gap, columns * (cw + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid[i * (ch + gap) : i * (ch + gap) + ch, j * (cw + gap) : j * (cw + gap) + cw] = \
                image.repeat(zoom, axis=0).repeat(zoom, axis=1)
    return grid


def save_figure(out: Path, name: str, rows: Sequence[np.ndarray], caption: str) -> Path:
    """Write a grid PNG into `out` and add it to the directory's HTML gallery."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    if not cv2.imwrite(str(path), cv2.cvtColor(image_grid(rows), cv2.COLOR_RGB2BGR)):
        raise ValueError(f"could not write {path}")
    gallery = out / GALLERY_FILE
    entries: dict[str, str] = json.loads(gallery.read_text()) if gallery.exists() else {}
    entries[name] = caption
    gallery.write_text(json.dumps(entries, indent=2))
    write_gallery_page(out, entries)
    return path


def write_gallery_page(out: Path, entries: Mapping[str, str]) -> Path:
    """index.html with every grid inlined as a base64 PNG, so the page opens anywhere on its own."""
    figures = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode((out / name).read_bytes()).decode("ascii")}"><figcaption>{html.escape(caption)}'
        f"</figcaption></figure>\n"
        for name, caption in entries.items() if (out / name).exists()
    )
    page = out / GALLERY_PAGE
    page.write_text("<!doctype html><html><head><meta charset='utf-8'><title>Glow latent arithmetic</title>"
                    "<style>body{font-family:sans-serif;margin:2em}figure{margin:0 0 2em}img{image-rendering:"
                    "pixelated;max-width:100%}figcaption{color:#444}</style></head><body>"
                    f"<h1>Glow latent arithmetic</h1>\n{figures}</body></html>\n")
    return page


def reconstruct(session: GlowSession, crops: CropSet, out: Path) -> dict[str, float]:
    """Encode then decode: the flow is a bijection, so the error is float round-off only."""
    inputs = session.model_inputs(crops.images)
    x = session.model_space(inputs)
    x_back = session.decode(session.encode(inputs))
    error = (x_back - x).abs()
    n_bits = session.glow.config.n_bits
    reconstructions = postprocess(x_back, n_bits)
    grey = (reconstructions.int() - postprocess(x, n_bits).int()).abs()
    save_figure(out, "reconstruct.png", [inputs, reconstructions.cpu().numpy()],
                f"{session.model_id}: model inputs (top) and their reconstructions decode(encode(x)) (bottom)")
    return {"crops": len(inputs), "max_abs_error": float(error.max()), "mean_abs_error": float(error.mean()),
            "max_grey_error": float(grey.max()), "mean_grey_error": float(grey.float().mean())}


def mean_faces(session: GlowSession, crops_dir: Path, identities: Mapping[str, Sequence[str]], out: Path) -> np.ndarray:
    """Each identity's mean latent decoded, (identities, s, s, 3); written beside one crop of each."""
    examples, faces = [], []
    for video_ids in identities.values():
        inputs = session.model_inputs(read_crops(crops_dir, video_ids).images)
        examples.append(inputs[0])
        faces.append(session.images(gl.mean_latent(session.encode(inputs)))[0])
    faces_array = np.stack(faces)
    save_figure(out, "mean_faces.png", [np.stack(examples), faces_array],
                "one crop of each identity (top) and the identity's mean latent decoded (bottom): "
                + ", ".join(identities))
    return faces_array


def attribute(session: GlowSession, crops: CropSet, labels: np.ndarray, out: Path, origin: str) -> Path:
    """Save mean(z_pos) - mean(z_neg) as attribute.pt (with its provenance) and the two means decoded."""
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if not len(positives) or not len(negatives):
        raise ValueError(f"need positive and negative crops, got {len(positives)} and {len(negatives)}")
    latents = session.encode(session.model_inputs(crops.images))
    z_pos = [z[torch.from_numpy(positives)] for z in latents]
    z_neg = [z[torch.from_numpy(negatives)] for z in latents]
    vector = gl.attribute_vector(z_pos, z_neg)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "attribute.pt"
    torch.save({"vector": [v.cpu() for v in vector], "model": session.model_id, "origin": origin,
                "positives": len(positives), "negatives": len(negatives),
                "latent_shapes": [list(s) for s in session.glow.latent_shapes]}, path)
    means = session.images(gl.concat_latents([gl.mean_latent(z_neg), gl.mean_latent(z_pos)]))
    save_figure(out, "attribute.png", [means], f"attribute {origin}: mean negative (left) and mean positive (right)")
    return path


def load_vector(path: Path, glow: Glow) -> gl.Latents:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    vector = saved["vector"]
    shapes = [tuple(v.shape[1:]) for v in vector]
    if shapes != glow.latent_shapes:
        raise ValueError(f"{path} holds latents of shapes {shapes}; this Glow has {glow.latent_shapes}")
    return [v.to(glow.top_mean.device) for v in vector]


def edit(session: GlowSession, crops: CropSet, vector_path: Path, alphas: Sequence[float], out: Path) -> dict[float, np.ndarray]:
    """alpha -> decoded z + alpha v of every crop; the grid's first row holds the inputs."""
    vector = load_vector(vector_path, session.glow)
    inputs = session.model_inputs(crops.images)
    latents = session.encode(inputs)
    edited = {alpha: session.images(gl.edit(latents, vector, alpha)) for alpha in alphas}
    save_figure(out, "edits.png", [inputs, *edited.values()],
                f"inputs (top), then z + alpha v for alpha = {', '.join(f'{a:g}' for a in alphas)} ({vector_path.name})")
    return edited


def samples(session: GlowSession, temperatures: Sequence[float], n: int, seed: int, out: Path) -> np.ndarray:
    """(temperatures, n, s, s, 3) samples; one seed, so every row decodes the same latents, rescaled."""
    rows = []
    for temperature in temperatures:
        generator = torch.Generator(device=session.glow.top_mean.device).manual_seed(seed)
        x = session.glow.sample(n, temperature, generator)
        rows.append(postprocess(x, session.glow.config.n_bits).cpu().numpy())
    save_figure(out, "samples.png", rows, f"samples at temperatures {', '.join(f'{t:g}' for t in temperatures)} "
                "(one row each, same noise)")
    return np.stack(rows)
