"""Archive scoring: manifest -> face crops -> registered scorers -> per-frame and per-video rows.

Output directory:
  frames.parquet/part-<id>.parquet   one row per scored face crop, a column per score
  videos.parquet/part-<id>.parquet   one row per input video: status, video scores, each primary score's
                                     conformal p-value, verdict (fake / real / unscored), threshold, model
                                     versions; its presence commits the shard (see media/shards.py)
  score.json                         models (resolved to versions), sampling and cropping
  summary.json                       verdict counts and, per model, the drift check of the archive's scores
                                     against its calibration reals (`scoring/conformal.py`)
  calibrations.json                  per model: name, version, family, primary score and the registered
                                     calibration it scored with, so `flowood evaluate` needs no registry

Frames are sampled as the run asks, except that clip models (which score windows of consecutive
sampled crops) are scored with the sampling of their training crops, stored with them at registration:
another sampling would space a clip's frames differently from every clip the model has seen.

On CPU-only clusters each actor decodes, crops, scores and writes its shard: nothing but paths
and small status rows crosses the object store. When the cluster has GPUs, CPU actors crop and
GPU actors score, with one video's crops (bounded by the frame cap) per row between them.
`local=True` runs the same shard code in this process, without Ray.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, model_validator

from flowood_ray.media.facecrop import CROP_SCHEMA, VIDEO_SCHEMA, VideoCropper, crops_to_array
from flowood_ray.media.faces import CropConfig
from flowood_ray.media.sampling import SamplingConfig
from flowood_ray.media.shards import commit_shard, done_video_ids, prepare_output, temp_paths
from flowood_ray.models.catalog import family
from flowood_ray.registry import ModelBundle, configure, load_registered, resolve_version
from flowood_ray.scoring.calibration import Calibration
from flowood_ray.scoring.conformal import drift_check, min_calibration_size
from flowood_ray.scoring.scorers import Scorer, build_scorer

log = logging.getLogger(__name__)

FRAMES_DIR, VIDEOS_DIR, CONFIG_FILE = "frames.parquet", "videos.parquet", "score.json"
CALIBRATIONS_FILE, SUMMARY_FILE = "calibrations.json", "summary.json"
SCORABLE = ("ok", "decode_error")  # a decoder failure mid-way still leaves valid crops to score
MAX_BLOCKS = 4096


class ResolvedModel(BaseModel):
    uri: str
    name: str
    version: str


class ScoreConfig(BaseModel):
    models: list[ResolvedModel]
    sampling: SamplingConfig = SamplingConfig()
    crop: CropConfig = CropConfig()
    fpr: float = Field(0.01, description="verdict threshold: a false-positive rate calibrated on real data")
    score_batch: int = Field(64, ge=1)
    save_crops: bool = Field(False, description="keep the scored crops and their masks in frames.parquet (for reports)")

    @model_validator(mode="after")
    def _bounded_frames(self) -> "ScoreConfig":
        # Crops of one video are scored together, so their number must be bounded whatever the video.
        if not self.sampling.bounded:
            raise ValueError("scoring needs a bounded number of frames per video: set max_frames")
        if not self.models:
            raise ValueError("at least one model is needed")
        return self


def resolve_models(uris: Sequence[str]) -> list[ResolvedModel]:
    """Aliases are resolved once, on the driver, so every actor scores with the same versions."""
    resolved = []
    for uri in uris:
        name, version = resolve_version(uri)
        resolved.append(ResolvedModel(uri=uri, name=name, version=version))
    return resolved


def crop_config_of(bundles: Sequence[Any]) -> CropConfig:
    """The cropping the models were trained on; models trained on different crops cannot share a run."""
    configs = {json.dumps(b.extra.get("crop", {}), sort_keys=True) for b in bundles}
    if len(configs) > 1:
        raise ValueError("the models were trained on differently made crops; score them in separate runs")
    return CropConfig(**bundles[0].extra.get("crop", {}))


def clip_sampling(bundle: ModelBundle) -> SamplingConfig | None:
    """The sampling of a clip model's training crops; None for frame models, which take any sampling."""
    if family(bundle.family).clip_frames is None:
        return None
    if "sampling" not in bundle.extra:
        log.warning("%s was registered before clip models recorded their training sampling: it cannot be "
                    "checked, and clips sampled otherwise than in training get scores its calibration does not "
                    "describe", bundle.model_id)
        return None
    return SamplingConfig(**bundle.extra["sampling"])


def _frame_spacing(sampling: SamplingConfig) -> tuple[str, int, int]:
    """What decides how far apart a clip's frames are; a stride run's frame cap only drops whole clips."""
    if sampling.mode == "uniform":
        return "uniform", sampling.num_frames, 1
    if sampling.mode == "segments":
        return "segments", sampling.num_frames, sampling.segments
    return "every", sampling.stride if sampling.mode == "stride" else 1, 1


def sampling_of(bundles: Sequence[ModelBundle], requested: SamplingConfig | None) -> SamplingConfig:
    """The frame sampling of a run: `requested` (None: the clip models' training sampling, else the default),
    refused when it spaces frames otherwise than a clip model was trained on."""
    trained = {b.model_id: s for b in bundles if (s := clip_sampling(b)) is not None}
    if len({_frame_spacing(s) for s in trained.values()}) > 1:
        raise ValueError(f"clip models trained on different frame samplings {trained}; score them in separate runs")
    if not trained:
        return requested or SamplingConfig()
    model_id, sampling = next(iter(trained.items()))
    if requested is None:
        if not sampling.bounded:
            raise ValueError(f"{model_id} was trained on {sampling} without a frame cap; scoring needs one: "
                             "ask for the same sampling with max_frames")
        return sampling
    if _frame_spacing(requested) != _frame_spacing(sampling):
        raise ValueError(f"{model_id} is a clip model trained on frames sampled {sampling}; scoring it with "
                         f"{requested} would space its clips' frames differently. Leave the sampling unset to use "
                         "the trained one")
    return requested


class ShardScorer:
    """Crops and scores batches of videos and commits each batch as one shard.

    Used as a Ray Data actor and, unchanged, by the local single-process loop."""

    def __init__(self, out: str, config: dict, tracking_uri: str, device: str = "cpu", crop: bool = True,
                 score: bool = True) -> None:
        import cv2

        cv2.setNumThreads(1)
        self.out = Path(out)
        self.config = ScoreConfig(**config)
        configure(tracking_uri)
        self.cropper = VideoCropper(self.config.sampling, self.config.crop) if crop else None
        self.scorers: list[Scorer] = []
        if score:
            for model in self.config.models:
                bundle = load_registered(f"models:/{model.name}/{model.version}", device=device)
                self.scorers.append(build_scorer(bundle, device))
            probe = np.zeros((1, 8, 8, 3), np.uint8)
            self.score_names = [name for scorer in self.scorers for name in scorer.score(probe)]
            # Each primary score also gets its conformal p-value against that model's real calibration.
            self.score_names += [p_value_name(scorer) for scorer in self.scorers]
            if len(set(self.score_names)) != len(self.score_names):
                raise ValueError(f"two models produce the same score names {self.score_names}; score them apart")

    def crop(self, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """One item per video: its status row and its crops (bounded by the sampling cap)."""
        assert self.cropper is not None
        items = []
        for row in rows:
            tables: list[pa.Table] = []
            status = self.cropper.process(row, tables.append)
            crops = pa.concat_tables(tables) if tables else CROP_SCHEMA.empty_table()
            items.append({"video": status, "crops": crops})
        return items

    def score_and_commit(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        video_rows, frame_tables = [], []
        for item in items:
            video_row, frames = self._score_video(item["video"], item["crops"])
            video_rows.append(video_row)
            if frames is not None:
                frame_tables.append(frames)
        name, tmp_frames, tmp_videos = temp_paths(self.out, [r["video_id"] for r in video_rows], FRAMES_DIR)
        try:
            frames = pa.concat_tables(frame_tables) if frame_tables else self._frame_schema().empty_table()
            pq.write_table(frames, tmp_frames, compression="zstd")
            pq.write_table(pa.Table.from_pylist(video_rows, schema=self._video_schema()), tmp_videos)
            commit_shard(self.out, name, tmp_frames, tmp_videos, FRAMES_DIR, VIDEOS_DIR)
        finally:
            tmp_frames.unlink(missing_ok=True)
            tmp_videos.unlink(missing_ok=True)
        log.debug("scored %d videos in %.2f s", len(items), time.perf_counter() - started)
        return [{"video_id": r["video_id"], "status": r["status"], "verdict": r["verdict"]} for r in video_rows]

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _with_node(pa.Table.from_pylist(self.score_and_commit(self.crop(batch.to_pylist()))))

    def _frame_schema(self) -> pa.Schema:
        fields = [pa.field("video_id", pa.string()), pa.field("frame_index", pa.int32()),
                  pa.field("timestamp_s", pa.float32()), pa.field("keypoints", pa.list_(pa.float32(), 12))]
        fields += [pa.field(name, pa.float64()) for name in self.score_names]
        if self.config.save_crops:
            fields += [pa.field("crop", pa.binary()), pa.field("mask", pa.binary())]
        return pa.schema(fields)

    def _video_schema(self) -> pa.Schema:
        fields = list(VIDEO_SCHEMA) + [pa.field("frames_scored", pa.int32())]
        fields += [pa.field(name, pa.float64()) for name in self.score_names]
        fields += [pa.field("verdict", pa.string()), pa.field("verdict_score", pa.string()),
                   pa.field("threshold", pa.float64()), pa.field("p_value", pa.float64()),
                   pa.field("calibration_n", pa.int32()), pa.field("models", pa.string())]
        return pa.schema(fields)

    def _score_video(self, video: Mapping[str, Any], crops: pa.Table) -> tuple[dict[str, Any], pa.Table | None]:
        primary = self.scorers[0]
        models = json.dumps([{"name": m.name, "version": m.version} for m in self.config.models])
        row = {**video, "frames_scored": 0, "verdict": None, "verdict_score": primary.primary, "threshold": None,
               "models": models}
        if video["status"] not in SCORABLE or crops.num_rows == 0:
            return row, None
        images = crops_to_array(crops, self.config.crop.size)
        frame_scores: dict[str, np.ndarray] = {}
        for scorer in self.scorers:
            batch_scores = scorer.score_video(images, self.config.score_batch)
            frame_scores.update(batch_scores)
            ids = np.full(len(images), video["video_id"])
            _, video_scores = scorer.aggregate(ids, batch_scores)
            row.update({k: float(v[0]) for k, v in video_scores.items()})
            frame_scores[p_value_name(scorer)] = p_values(scorer, "frame", batch_scores[scorer.primary])
            row[p_value_name(scorer)] = float(p_values(scorer, "video", np.array([row[scorer.primary]]))[0])
        calibration = Calibration.model_validate(primary.bundle.calibration["video"][primary.primary])
        threshold = calibration.threshold(self.config.fpr)
        p_value = row[p_value_name(primary)]
        if not np.isfinite(row[primary.primary]):
            verdict = "unscored"  # a NaN or infinite score says nothing about the face; never call it real
        elif np.isfinite(p_value):
            verdict = "fake" if p_value <= self.config.fpr else "real"
        else:  # calibrated before p-values: the threshold alone
            verdict = "fake" if row[primary.primary] > threshold else "real"
        row.update(frames_scored=len(images), threshold=threshold if np.isfinite(threshold) else None,
                   p_value=p_value if np.isfinite(p_value) else None, calibration_n=calibration.n, verdict=verdict)
        columns: dict[str, Any] = {
            "video_id": crops.column("video_id"), "frame_index": crops.column("frame_index"),
            "timestamp_s": crops.column("timestamp_s"), "keypoints": crops.column("keypoints"),
            **{k: pa.array(v, pa.float64()) for k, v in frame_scores.items()},
        }
        if self.config.save_crops:
            # The aligned manipulation mask (fakes with a mask video) is the ground truth of pixel metrics.
            columns.update(crop=crops.column("crop"), mask=crops.column("mask"))
        return row, pa.table(columns, schema=self._frame_schema())


def p_value_name(scorer: Scorer) -> str:
    return f"{scorer.primary}_p"


def p_values(scorer: Scorer, level: str, scores: np.ndarray) -> np.ndarray:
    """Conformal p-values of `scores` against the model's real calibration at `level`; NaN for models
    calibrated before calibrations kept their real scores."""
    calibration = Calibration.model_validate(scorer.bundle.calibration[level][scorer.primary])
    if not calibration.scores:
        return np.full(len(scores), np.nan)
    return calibration.p_values(np.asarray(scores, dtype=np.float64))


def drift_summary(videos: pa.Table, bundles: Sequence[ModelBundle], fpr: float) -> dict[str, Any]:
    """Per model, its primary video scores in this archive against its calibration reals: how far the
    flagged share is from `fpr` and whether the real-looking part of the archive looks like the reals
    the thresholds came from (a different camera, codec or population breaks the stated rate)."""
    checks: dict[str, Any] = {}
    for bundle in bundles:
        primary = build_scorer(bundle).primary
        calibration = Calibration.model_validate(bundle.calibration["video"][primary])
        name = f"{bundle.name}/{bundle.version}"
        scored = videos.filter(pc.field("frames_scored") > 0)
        if not calibration.scores or primary not in scored.column_names or scored.num_rows == 0:
            checks[name] = {"warning": None, "skipped": "no calibration scores or no scored videos"}
            continue
        if calibration.n < min_calibration_size(fpr):
            checks[name] = {"warning": f"{calibration.n} calibration reals cannot resolve fpr={fpr:g} (at least "
                            f"{min_calibration_size(fpr)} needed): nothing is flagged at that rate and drift is "
                            "not checked; recalibrate with `flowood calibrate` on more known-real videos",
                            "skipped": "calibration too small"}
            continue
        check = drift_check(scored.column(primary).to_numpy(zero_copy_only=False).astype(np.float64),
                            np.asarray(calibration.scores), alpha=fpr, what="videos")
        checks[name] = check.model_dump(mode="json")
    return checks


def write_calibrations(out: Path, bundles: Sequence[ModelBundle]) -> Path:
    """The calibrations a run scores with, beside its scores; the versions fix them, so a resumed run
    rewrites the same file."""
    records = [
        {"name": b.name, "version": b.version, "family": b.family, "primary": build_scorer(b).primary,
         "calibration": b.calibration}
        for b in bundles
    ]
    path = Path(out) / CALIBRATIONS_FILE
    path.write_text(json.dumps(records, indent=2, sort_keys=True))
    return path


def read_calibrations(out: Path) -> list[dict[str, Any]]:
    """What `write_calibrations` wrote, in model order."""
    path = Path(out) / CALIBRATIONS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: these scores predate recorded calibrations; score them again")
    return json.loads(path.read_text())


def read_scores(out: Path) -> tuple[pa.Table, pa.Table]:
    """(videos, frames) of a scoring output directory."""
    out = Path(out)
    tables = []
    for sub in (VIDEOS_DIR, FRAMES_DIR):
        files = sorted((out / sub).glob("part-*.parquet"))
        if not files:
            raise FileNotFoundError(f"{out / sub} holds no committed shards")
        tables.append(pq.ParquetDataset(files).read())
    return tables[0], tables[1]


def run_score(
    manifest: pa.Table,
    out: Path,
    model_uris: Sequence[str],
    sampling: SamplingConfig | None = None,
    fpr: float = 0.01,
    local: bool = False,
    workers: int | None = None,
    videos_per_shard: int = 8,
    save_crops: bool = False,
    split_stages: bool | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
) -> pa.Table:
    """Score every manifest video not yet in `out`; returns all video rows of `out`. `sampling` (see
    `sampling_of`) defaults to the clip models' training sampling, else to uniform 32 frames."""
    uri = configure(tracking_uri)
    resolved = resolve_models(model_uris)
    bundles = [load_registered(f"models:/{m.name}/{m.version}") for m in resolved]
    for bundle in bundles:
        if str(fpr) not in bundle.calibration["video"][build_scorer(bundle).primary]["thresholds"]:
            raise ValueError(f"{bundle.model_id} has no threshold calibrated at fpr={fpr}")
    config = ScoreConfig(
        models=resolved, sampling=sampling_of(bundles, sampling), crop=crop_config_of(bundles), fpr=fpr,
        save_crops=save_crops,
    )
    out = Path(out).resolve()
    # Versions, not aliases, define a run: a moved alias must not mix two models in one output.
    prepare_output(out, config.model_dump(mode="json"), CONFIG_FILE, FRAMES_DIR, VIDEOS_DIR)
    write_calibrations(out, bundles)
    done = done_video_ids(out, VIDEOS_DIR)
    todo = [row for row in manifest.to_pylist() if row["video_id"] not in done]
    log.info("%d videos in manifest, %d already scored, %d to score with %s", manifest.num_rows, len(done),
             len(todo), ", ".join(f"{m.name}/{m.version}" for m in resolved))
    if todo and local:
        _score_locally(todo, out, config, uri, videos_per_shard)
    elif todo:
        _score_on_ray(todo, out, config, uri, workers, videos_per_shard, split_stages, address)
    videos, _ = read_scores(out)
    verdicts = videos.column("verdict").to_pylist()
    summary = {"videos": videos.num_rows, "verdicts": {v or "none": verdicts.count(v) for v in set(verdicts)},
               "fpr": fpr, "drift": drift_summary(videos, bundles, fpr)}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True))
    for model, check in summary["drift"].items():
        if check.get("warning"):
            log.warning("%s: %s", model, check["warning"])
    return videos


def _score_locally(todo: list[dict], out: Path, config: ScoreConfig, uri: str, per_shard: int) -> None:
    worker = ShardScorer(str(out), config.model_dump(mode="json"), uri)
    for start in range(0, len(todo), per_shard):
        worker.score_and_commit(worker.crop(todo[start : start + per_shard]))
        log.info("scored %d / %d videos", min(start + per_shard, len(todo)), len(todo))


def _score_on_ray(todo: list[dict], out: Path, config: ScoreConfig, uri: str, workers: int | None, per_shard: int,
                  split_stages: bool | None, address: str | None) -> None:
    import ray

    from flowood_ray.cluster.runtime import cluster_cpus, init_ray, record_run

    init_ray(address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    split = gpus > 0 if split_stages is None else split_stages
    workers = workers or cluster_cpus()
    kwargs = {"out": str(out), "config": config.model_dump(mode="json"), "tracking_uri": uri}
    # One block per shard, so every batch is a full shard: blocks that straddle shard boundaries
    # leave a remainder batch each, which costs an extra actor call and commit (up to 1.4x the
    # shards). Past MAX_BLOCKS, blocks hold many shards and the remainders no longer matter.
    blocks = max(1, min(-(-len(todo) // per_shard), MAX_BLOCKS))
    ds = ray.data.from_items(todo, override_num_blocks=blocks)
    if not split:
        ds = ds.map_batches(ShardScorer, fn_constructor_kwargs=kwargs, batch_size=per_shard, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
    else:
        croppers = max(1, workers - (0 if gpus else 1))
        ds = ds.map_batches(
            CropStage, fn_constructor_kwargs={**kwargs, "score": False}, batch_size=per_shard, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=croppers), num_cpus=1,
        ).map_batches(
            ScoreStage, fn_constructor_kwargs={**kwargs, "device": "cuda" if gpus else "cpu", "crop": False},
            batch_size=per_shard, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=max(1, gpus)),
            num_gpus=1 if gpus else 0, num_cpus=0 if not gpus else 1,
        )
    counts: dict[str, int] = {}
    nodes: set[str] = set()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for status, verdict in zip(batch.column("status").to_pylist(), batch.column("verdict").to_pylist()):
            key = verdict or status
            counts[key] = counts.get(key, 0) + 1
        nodes.update(batch.column("node_id").to_pylist())
    log.info("scored %d videos on %d nodes: %s", sum(counts.values()), len(nodes), counts)
    record_run(out, {"job": "score", "counts": counts, "nodes": sorted(nodes)})


class CropStage(ShardScorer):
    """CPU stage of the split pipeline: one row per video with its status and crops."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = self.crop(batch.to_pylist())
        return pa.table({
            "video": [json.dumps(item["video"]) for item in items],
            "crops": [_table_bytes(item["crops"]) for item in items],
        })


class ScoreStage(ShardScorer):
    """GPU stage of the split pipeline: scores the cropped videos and commits the shard."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = [
            {"video": json.loads(video), "crops": _table_from_bytes(crops)}
            for video, crops in zip(batch.column("video").to_pylist(), batch.column("crops").to_pylist())
        ]
        return _with_node(pa.Table.from_pylist(self.score_and_commit(items)))


def _with_node(table: pa.Table) -> pa.Table:
    import ray

    return table.append_column("node_id", pa.array([ray.get_runtime_context().get_node_id()] * table.num_rows))


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _table_from_bytes(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()
