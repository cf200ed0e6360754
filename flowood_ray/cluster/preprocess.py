"""Manifest -> face-crop shards on Ray Data.

Only paths travel through the object store: each actor decodes its videos from shared
storage, streams crops into its own shard file and returns one small status row per video.
Memory therefore stays bounded by one frame plus one flush of crops per actor, whatever the
archive or video length.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import cv2
import pyarrow as pa
import ray

from flowood_ray.cluster.runtime import cluster_cpus, init_ray, record_run
from flowood_ray.media.facecrop import VideoCropper
from flowood_ray.media.faces import CropConfig
from flowood_ray.media.sampling import SamplingConfig
from flowood_ray.media.shards import done_video_ids, prepare_output, read_videos, write_shard

log = logging.getLogger(__name__)


class CropShardWriter:
    """Ray Data actor: one MediaPipe graph per actor, one committed shard per batch of videos."""

    def __init__(self, out: str, sampling: dict, crop: dict) -> None:
        # OpenCV ignores OMP_NUM_THREADS; one thread per actor keeps actors from fighting over cores.
        cv2.setNumThreads(1)
        self.out = Path(out)
        self.cropper = VideoCropper(SamplingConfig(**sampling), CropConfig(**crop), decode_threads=1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = write_shard(self.out, batch.to_pylist(), self.cropper)
        node = ray.get_runtime_context().get_node_id()
        return pa.Table.from_pylist(
            [{"video_id": r["video_id"], "status": r["status"], "faces": r["faces"], "node_id": node} for r in rows]
        )

    def __del__(self) -> None:
        self.cropper.close()


def preprocess_config(sampling: SamplingConfig, crop: CropConfig) -> dict[str, object]:
    return {"sampling": sampling.model_dump(), "crop": crop.model_dump()}


def run_preprocess(
    manifest: pa.Table,
    out: Path,
    sampling: SamplingConfig,
    crop: CropConfig,
    workers: int | None = None,
    videos_per_shard: int = 8,
    address: str | None = None,
) -> pa.Table:
    """Crop every manifest video not already done in `out`; returns all video rows of `out`."""
    out = Path(out).resolve()
    prepare_output(out, preprocess_config(sampling, crop))
    done = done_video_ids(out)
    todo = [row for row in manifest.to_pylist() if row["video_id"] not in done]
    log.info("%d videos in manifest, %d already done, %d to crop", manifest.num_rows, len(done), len(todo))
    if todo:
        init_ray(address)
        workers = workers or cluster_cpus()
        blocks = max(1, min(len(todo) // videos_per_shard, 4 * workers * 8))
        ds = ray.data.from_items(todo, override_num_blocks=blocks).map_batches(
            CropShardWriter,
            fn_constructor_kwargs={"out": str(out), "sampling": sampling.model_dump(), "crop": crop.model_dump()},
            batch_size=videos_per_shard,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
        )
        counts: dict[str, int] = {}
        nodes: set[str] = set()
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for status in batch.column("status").to_pylist():
                counts[status] = counts.get(status, 0) + 1
            nodes.update(batch.column("node_id").to_pylist())
        log.info("cropped %d videos on %d nodes: %s", sum(counts.values()), len(nodes), _format_counts(counts))
        record_run(out, {"job": "preprocess", "counts": counts, "nodes": sorted(nodes)})
    return read_videos(out)


def _format_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"
