"""Training on Ray Train: DDP over the train and val splits of the face-crop shards, real videos only
except for supervised families, which also learn from the fakes.

The driver owns MLflow (SQLite allows one writer): it opens the run, logs parameters, and after
`fit` calibrates on real validation crops and registers the model. Rank 0 logs per-epoch
metrics to the same run. Resuming is Ray Train V2's: rerun with the same run name and storage
path and the latest checkpoint is picked up; the MLflow run with the same name is reused. Each phase
ends on the weights of its best validation epoch, which the checkpoints carry across a resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.train
import torch
from pydantic import BaseModel, Field
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from flowood_ray.cluster.runtime import init_ray
from flowood_ray.media.clips import cut_clips
from flowood_ray.media.facecrop import ModelInput, crops_to_array, meshes_to_array, model_input, model_input_points
from flowood_ray.media.shards import crop_size, labelled_split_ids, read_videos, real_split_ids
from flowood_ray.models.catalog import build_modules, family, parse_configs

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    family: str
    epochs: int = Field(10, ge=1, description="epochs per phase (the VQ-VAE family has two phases)")
    batch_size: int = Field(64, ge=1, description="per worker")
    lr: float | None = Field(None, gt=0, description="Adam's learning rate (default: the family's own)")
    grad_clip: float = Field(50.0, gt=0)
    seed: int = 0
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    max_failures: int = Field(2, ge=0)
    input: ModelInput = ModelInput()
    fake_methods: list[str] | None = Field(
        None, description="supervised families: the manipulation methods whose train-split fakes they learn "
        "from (default: every method in the crops); leave one out to measure an unseen method"
    )


def check_resumable(saved: dict[str, Any], modules: dict[str, Any], family_name: str) -> None:
    """Refuse a checkpoint of another model: a run name's storage that holds one would otherwise be resumed
    from (wrong) or started over in (two runs' checkpoints mixed in one directory)."""
    if set(saved) != set(modules):
        raise ValueError(f"the checkpoint to resume holds modules {sorted(saved)}, a {family_name} model has "
                         f"{sorted(modules)}: the run name is taken by another model's training; choose another "
                         "run name or storage path")


def crop_datasets(
    crops_dir: Path, image_size: int, input_config: ModelInput, clip_frames: int | None = None,
    supervised: bool = False, fake_methods: list[str] | None = None, needs_mesh: bool = False,
) -> dict[str, ray.data.Dataset]:
    """Ray datasets of train and val crops resized to the model's input size, with their labels: one
    image per row, or one clip of `clip_frames` consecutive crops per row for clip-level families.
    Real videos only, unless `supervised` (then the fakes of `fake_methods` too). With `needs_mesh`
    each image row also carries its face-mesh landmarks in model-input pixels, and crops whose mesh
    was not found are left out."""
    videos = read_videos(crops_dir)
    ids = {
        split: labelled_split_ids(videos, split, fake_methods) if supervised
        else dict.fromkeys(real_split_ids(videos, split), 0)
        for split in ("train", "val")
    }
    for split, chosen in ids.items():
        if not chosen or not any(label == 0 for label in chosen.values()):
            raise ValueError(f"{crops_dir} has no real {split} videos with faces; training needs both train and val")
        if supervised and all(label == 0 for label in chosen.values()):
            raise ValueError(f"{crops_dir} has no fake {split} videos with faces; a supervised family needs them")
    files = sorted(str(p) for p in (Path(crops_dir) / "crops").glob("part-*.parquet"))
    kwargs: dict[str, Any] = {"crop_size": crop_size(crops_dir), "image_size": image_size, "config": input_config}
    if needs_mesh and clip_frames is not None:
        raise ValueError("clip families take no face mesh")
    if needs_mesh and "mesh" not in pq.read_schema(files[0]).names:
        raise ValueError(f"{crops_dir} holds no face meshes: preprocess it with --face-mesh for this family")
    if clip_frames is None:
        base = ray.data.read_parquet(files).select_columns(
            ["video_id", "frame_index", "crop"] + (["mesh"] if needs_mesh else []))
        select, batching = _select_images, {}
    else:
        # A shard file holds whole videos, so one file per batch sees every crop of its videos.
        base = ray.data.from_items([{"path": f} for f in files])
        select, batching = _select_clips, {"batch_size": 1}
        kwargs["clip_frames"] = clip_frames
    # Lazy: `fit` reads them (load_split) before the DDP workers take the cluster's CPUs.
    return {
        split: base.map_batches(select, fn_kwargs={"ids": chosen, **kwargs}, batch_format="pyarrow", **batching)
        for split, chosen in ids.items()
    }


def _select_images(
    batch: pa.Table, ids: dict[str, int], crop_size: int, image_size: int, config: ModelInput
) -> dict[str, np.ndarray]:
    rows = batch.filter(pc.is_in(batch.column("video_id"), value_set=pa.array(list(ids))))
    if "mesh" in rows.column_names:
        rows = rows.filter(pc.is_valid(rows.column("mesh")))
    images = crops_to_array(rows, crop_size) if rows.num_rows else np.zeros((0, crop_size, crop_size, 3), np.uint8)
    video_ids = rows.column("video_id").to_pylist()
    labels = np.array([ids[v] for v in video_ids], np.uint8)
    keys = np.array([f"{v}/{f:09d}" for v, f in zip(video_ids, rows.column("frame_index").to_pylist())], dtype=object)
    selected = {"image": model_input(images, image_size, config), "label": labels, "key": keys}
    if "mesh" in rows.column_names:
        selected["mesh"] = model_input_points(meshes_to_array(rows), crop_size, image_size, config)
    return selected


def _select_clips(
    batch: pa.Table, ids: dict[str, int], crop_size: int, image_size: int, config: ModelInput, clip_frames: int
) -> dict[str, np.ndarray]:
    clips = [np.zeros((0, clip_frames, image_size, image_size, 3), np.uint8)]
    labels = [np.zeros(0, np.uint8)]
    keys = [np.zeros(0, dtype=object)]
    for path in batch.column("path").to_pylist():
        table = pq.read_table(path, columns=["video_id", "frame_index", "crop"],
                              filters=pc.field("video_id").isin(list(ids)))
        table = table.sort_by([("video_id", "ascending"), ("frame_index", "ascending")])
        images = model_input(crops_to_array(table, crop_size), image_size, config) if table.num_rows else None
        video_ids = np.asarray(table.column("video_id").to_pylist())
        for vid in np.unique(video_ids):
            cut, starts = cut_clips(images[video_ids == vid], clip_frames)
            clips.append(cut)
            labels.append(np.full(len(cut), ids[vid], np.uint8))
            keys.append(np.array([f"{vid}/{start:09d}" for start in starts], dtype=object))
    return {"image": np.concatenate(clips), "label": np.concatenate(labels), "key": np.concatenate(keys)}


def load_split(dataset: ray.data.Dataset) -> dict[str, np.ndarray]:
    """A whole split as arrays in a fixed order (by video id and frame), whatever order Ray delivers its
    blocks in: the data order must not depend on scheduling, or the same seed trains other weights."""
    parts = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    if not parts:
        raise ValueError("a training split arrived empty")
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(data.pop("key"), kind="stable")
    return {k: v[order] for k, v in data.items()}


def epoch_batches(
    data: dict[str, np.ndarray], rank: int, world: int, seed: int, epoch: int, batch_size: int, device: Any,
    dtypes: dict[str, torch.dtype],
) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's batches of one epoch: a permutation of the split drawn from (seed, epoch), dealt out
    by rank, every worker with the same number of samples (DDP needs the same number of steps)."""
    n = len(data["label"])
    if n < world:
        raise ValueError(f"{n} training samples cannot feed {world} workers")
    order = np.random.default_rng([seed, epoch]).permutation(n)[rank::world][: n // world]
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        yield {k: torch.as_tensor(v[chosen], dtype=dtypes[k]).to(device) for k, v in data.items() if k in dtypes}


def _train_loop(config: dict[str, Any]) -> None:
    """Runs on every DDP worker."""
    import mlflow
    import torch.distributed as dist

    tc = TrainConfig(**config["train"])
    fam = family(tc.family)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(tc.seed)
    device = ray.train.torch.get_device()
    modules = {k: m.to(device) for k, m in build_modules(tc.family, config["models"]).items()}
    # What each module leaves trainable (fine-tuned encoders freeze their early layers and ImageNet head):
    # a phase trains exactly those parameters of its component.
    trainable = {k: {id(p) for p in m.parameters() if p.requires_grad} for k, m in modules.items()}
    done_epochs, optim_states = 0, {}
    # phase name -> {"metric", "epoch", "state"}: the component's weights at its lowest validation metric.
    best: dict[str, dict[str, Any]] = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / "state.pt", map_location=device, weights_only=True)
        check_resumable(state["modules"], modules, tc.family)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        done_epochs, optim_states, best = state["epoch"], state["optimizers"], state.get("best", {})
        log.info("rank %d resumed after epoch %d", rank, done_epochs)
    client = mlflow.MlflowClient(config["tracking_uri"]) if rank == 0 else None
    world = ctx.get_world_size()
    train_data = ray.get(config["data"]["train"])
    val_data = {k: v[rank::world].copy() for k, v in ray.get(config["data"]["val"]).items()}

    epoch = 0
    for phase in fam.phases:
        for name, module in modules.items():
            for param in module.parameters():
                param.requires_grad_(name == phase.trains and id(param) in trainable[name])
        wrapped: dict[str, torch.nn.Module] = dict(modules)
        optimizer: torch.optim.Optimizer | None = None
        for phase_epoch in range(1, tc.epochs + 1):
            epoch += 1
            if epoch <= done_epochs:
                continue
            modules[phase.trains].train()
            train_sums: dict[str, float] = {}
            batches = samples = 0
            epoch_start = time.perf_counter()
            # Every random draw of an epoch follows (seed, rank, epoch): a run resumed at this epoch draws
            # what the uninterrupted run drew (dropout reads torch's global generator).
            torch.manual_seed(_epoch_seed(tc.seed, rank, epoch, 0))
            generator = torch.Generator(device="cpu").manual_seed(_epoch_seed(tc.seed, rank, epoch, 1))
            for batch in epoch_batches(train_data, rank, world, tc.seed, epoch, tc.batch_size, device, _dtypes(fam)):
                images = batch["image"]
                if optimizer is None:
                    # Data-dependent init (ActNorm) happens on this first forward, before DDP wraps the
                    # module, so DDP's broadcast of rank 0's state makes every replica start identical.
                    # Its own generator: a resumed run makes this call in another epoch.
                    with torch.no_grad():
                        phase.loss(modules, batch, torch.Generator(device="cpu").manual_seed(tc.seed))
                    wrapped[phase.trains] = ray.train.torch.prepare_model(modules[phase.trains], move_to_device=False)
                    optimizer = torch.optim.Adam([p for p in modules[phase.trains].parameters() if p.requires_grad],
                                                 lr=tc.lr or fam.lr)
                    if phase.name in optim_states:
                        optimizer.load_state_dict(optim_states[phase.name])
                loss, metrics = phase.loss(wrapped, batch, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(modules[phase.trains].parameters(), tc.grad_clip)
                optimizer.step()
                for k, v in metrics.items():
                    train_sums[k] = train_sums.get(k, 0.0) + v
                batches += 1
                samples += len(images)
            throughput = samples * ctx.get_world_size() / (time.perf_counter() - epoch_start)
            val_sums, val_count = _validate(phase, modules, val_data, tc, device)
            if dist.is_available() and dist.is_initialized():
                # NCCL reduces only tensors on the GPU; gloo takes CPU tensors.
                totals = torch.tensor([*val_sums.values(), val_count], dtype=torch.float64, device=device)
                dist.all_reduce(totals)
                val_sums, val_count = dict(zip(val_sums, totals[:-1].tolist())), float(totals[-1])
            val_means = {k: v / max(val_count, 1.0) for k, v in val_sums.items()}
            report = {f"train_{k}": v / max(batches, 1) for k, v in train_sums.items()}
            current = val_means[phase.metric]
            _keep_best(best, phase.name, current, epoch, modules[phase.trains])
            if phase_epoch == tc.epochs:
                # The next phase, and the registered model, start from this phase's best epoch; the
                # validation metric is all-reduced, so every replica restores the same one.
                modules[phase.trains].load_state_dict(best[phase.name]["state"])
            report.update({f"val_{k}": v for k, v in val_means.items()})
            report.update({
                f"best_val_{phase.metric}": best[phase.name]["metric"],
                "best_epoch": best[phase.name]["epoch"], "epoch": epoch, "phase": phase.name,
                "train_samples_per_s": throughput,
            })
            if optimizer is not None:
                optim_states[phase.name] = optimizer.state_dict()
            _report(rank, epoch, modules, optim_states, best, report, client, config["run_id"])


def _dtypes(fam) -> dict[str, torch.dtype]:
    return {"image": torch.uint8, "label": torch.uint8} | ({"mesh": torch.float32} if fam.needs_mesh else {})


def _keep_best(best: dict[str, dict[str, Any]], phase: str, metric: float, epoch: int, module: torch.nn.Module) -> None:
    """Remember `module`'s weights if `metric` is the phase's lowest finite validation metric so far."""
    held = best.get(phase)
    if held is None or (math.isfinite(metric) and not metric >= held["metric"]):
        best[phase] = {"metric": metric, "epoch": epoch,
                       "state": {k: v.detach().clone() for k, v in module.state_dict().items()}}


def _epoch_seed(seed: int, rank: int, epoch: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, rank, epoch, stream]).generate_state(1)[0])


@torch.no_grad()
def _validate(phase, modules, data: dict[str, np.ndarray], tc: TrainConfig, device) -> tuple[dict[str, float], float]:
    """(sum over samples of each validation metric of the phase's loss, count) on this worker's part, with
    fixed noise. Every worker's loss reports the same metric names, so the sums all-reduce in one order."""
    for module in modules.values():
        module.eval()
    generator = torch.Generator(device="cpu").manual_seed(12345)
    dtypes = _dtypes(family(tc.family))
    totals: dict[str, float] = {}
    count = 0.0
    for start in range(0, len(data["label"]), tc.batch_size):
        batch = {k: torch.as_tensor(v[start : start + tc.batch_size], dtype=dtypes[k]).to(device)
                 for k, v in data.items() if k in dtypes}
        _, metrics = phase.loss(modules, batch, generator)
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value * len(batch["image"])
        count += len(batch["image"])
    if not count:
        raise ValueError(f"this worker's share of the validation set is empty ({len(data['label'])} samples)")
    if phase.metric not in totals:
        raise ValueError(f"phase {phase.name!r} reports no {phase.metric!r} metric (it reports {sorted(totals)})")
    return totals, count


def _report(rank, epoch, modules, optim_states, best, metrics, client, run_id) -> None:
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if rank != 0:
        ray.train.report(numeric)
        return
    for key, value in numeric.items():
        if key != "epoch":
            client.log_metric(run_id, key, value, step=epoch)
    log.info("epoch %d %s", epoch, json.dumps(metrics))
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(
            {"epoch": epoch, "modules": {k: m.state_dict() for k, m in modules.items()}, "optimizers": optim_states,
             "best": best},
            Path(tmp) / "state.pt",
        )
        ray.train.report(numeric, checkpoint=Checkpoint.from_directory(tmp))


def system_info() -> dict[str, str]:
    return {
        "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
        "cuda": str(torch.cuda.is_available()), "cpus": str(os.cpu_count()), "host": platform.node(),
    }


def fit(
    crops_dir: Path,
    train: TrainConfig,
    model_configs: dict[str, dict[str, Any]],
    run_name: str,
    storage_path: Path,
    tracking_uri: str,
    run_id: str,
    address: str | None = None,
) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    """Run DDP training; returns the modules of the last checkpoint (on CPU) and the last reported metrics."""
    init_ray(address)
    parsed = parse_configs(train.family, model_configs)
    fam = family(train.family)
    clip_frames = fam.clip_frames(parsed) if fam.clip_frames else None
    datasets = crop_datasets(Path(crops_dir), fam.image_size(parsed), train.input, clip_frames,
                             supervised=fam.supervised, fake_methods=train.fake_methods, needs_mesh=fam.needs_mesh)
    # Ray Data prepares the splits across the cluster; the workers then share one ordered copy of each
    # through the object store (zero-copy on a node) instead of each re-reading the dataset.
    splits = {name: ray.put(load_split(dataset)) for name, dataset in datasets.items()}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "train": train.model_dump(), "models": {k: v.model_dump() for k, v in parsed.items()},
            "tracking_uri": tracking_uri, "run_id": run_id, "data": splits,
        },
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=train.use_gpu),
        run_config=RunConfig(
            name=run_name, storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} produced no checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=True)
    modules = build_modules(train.family, {k: v.model_dump() for k, v in parsed.items()})
    for name, module in modules.items():
        module.load_state_dict(state["modules"][name])
        module.eval()
    return modules, dict(result.metrics or {})
