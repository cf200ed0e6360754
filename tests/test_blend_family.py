"""The blend family is real-only by construction: its training data, read through the same API the
trainer uses, holds real crops and nothing else, each with its face mesh."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from flowood_ray.cluster.train import crop_datasets
from flowood_ray.media.facecrop import ModelInput, crops_to_array, model_input
from flowood_ray.media.shards import crop_dataset, crop_size, read_videos
from flowood_ray.models.catalog import family

pytestmark = pytest.mark.e2e


def test_training_data_holds_every_real_crop_with_a_mesh_and_no_fake(synth_crops: Path) -> None:
    """Catches a data path that lets fakes in (labelled or not), one that drops reals, and meshes that
    do not travel with their crops."""
    fam = family("blend")
    videos = read_videos(synth_crops)
    assert set(videos.column("label").to_pylist()) == {0, 1}  # the crops hold fakes to leave out
    size = crop_size(synth_crops)
    table = crop_dataset(synth_crops).to_table(columns=["video_id", "crop", "mesh"])
    label_of = dict(zip(videos.column("video_id").to_pylist(), videos.column("label").to_pylist()))
    split_of = dict(zip(videos.column("video_id").to_pylist(), videos.column("split").to_pylist()))
    images = model_input(crops_to_array(table, size), 32, ModelInput())
    ids = table.column("video_id").to_pylist()
    meshed = pc.is_valid(table.column("mesh")).to_numpy(zero_copy_only=False)
    fakes = {images[i].tobytes() for i, v in enumerate(ids) if label_of[v] == 1}
    expected = {s: sorted(images[i].tobytes() for i, v in enumerate(ids)
                          if label_of[v] == 0 and split_of[v] == s and meshed[i]) for s in ("train", "val")}
    assert meshed.mean() > 0.9

    datasets = crop_datasets(synth_crops, 32, ModelInput(), supervised=fam.supervised, needs_mesh=fam.needs_mesh)
    for split, dataset in datasets.items():
        rows = [b for b in dataset.iter_batches(batch_format="numpy", batch_size=None)]
        seen = np.concatenate([b["image"] for b in rows])
        assert {img.tobytes() for img in seen}.isdisjoint(fakes)
        assert sorted(img.tobytes() for img in seen) == expected[split]
        assert all((b["label"] == 0).all() for b in rows)
        mesh = np.concatenate([b["mesh"] for b in rows])
        assert mesh.shape == (len(seen), 468, 2) and np.isfinite(mesh).all()
        assert (mesh > -8).all() and (mesh < 40).all()  # model-input (32 px) pixels, chin or brow may overhang
