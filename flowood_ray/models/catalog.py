"""Model families: which modules make up a family and how each training phase computes its loss.

A family's modules are rebuilt from their JSON configs (registry bundles, checkpoints), and every
loss calls modules through `forward`, so that DistributedDataParallel sees the call and
synchronises gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor, nn

from flowood_ray.models.blend_detector import BlendDetector, BlendDetectorConfig, blended_batch, matched_pair_error
from flowood_ray.models.cflow import CFlowConfig, CFlowDecoders, random_fibres
from flowood_ray.models.classifier import (
    AbnormalityConfig, AbnormalityModule, FakeClassifier, FakeClassifierConfig, auxiliary, balanced_mean,
)
from flowood_ray.models.clip_embedder import ClipAutoencoder, ClipAutoencoderConfig
from flowood_ray.models.differnet import DifferNetConfig, DifferNetFlow, pooled_features, random_transforms
from flowood_ray.models.efficientnet import EfficientNetLite, EfficientNetLiteConfig, freeze, stride_channels
from flowood_ray.models.self_blend import SelfBlendConfig, self_blend
from flowood_ray.models.glow import Glow, GlowConfig, preprocess
from flowood_ray.models.patch_density import PatchDensity, PatchDensityConfig
from flowood_ray.models.patch_svdd import PatchBank, PatchSVDDConfig
from flowood_ray.models.realnvp import RealNVP, RealNVPConfig
from flowood_ray.models.svdd import DeepSVDD, DeepSVDDConfig
from flowood_ray.models.vqvae import VQVAE, PixelSNAIL, PixelSNAILConfig, VQVAEConfig

# loss(modules, batch, generator) -> (loss, metrics to log). A batch holds "image": uint8 images
# (N, H, W, 3) or clips (N, T, H, W, 3), "label": (N,) 0 for real, 1 for fake, and for families that
# need it "mesh": (N, 468, 2) face-mesh landmarks in the images' pixel coordinates.
Batch = Mapping[str, Tensor]
LossFn = Callable[[Mapping[str, nn.Module], Batch, torch.Generator | None], tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Phase:
    name: str
    trains: str  # the component whose parameters this phase optimises
    loss: LossFn
    metric: str  # the validation metric the phase reports (lower is better)


@dataclass(frozen=True)
class Family:
    components: dict[str, tuple[type[BaseModel], type[nn.Module]]]
    phases: tuple[Phase, ...]
    image_size: Callable[[Mapping[str, BaseModel]], int]
    # Frames per training sample for families that model clips; None for per-image families.
    clip_frames: Callable[[Mapping[str, BaseModel]], int] | None = None
    # Trained on fakes as well as reals (labelled); every other family sees real footage only.
    supervised: bool = False
    # Batches carry each crop's face-mesh landmarks (crops without a mesh are left out).
    needs_mesh: bool = False
    # Components that are frozen ImageNet encoders: rebuilt from their packaged weights, never trained
    # and never copied into a registered bundle (which records the weights' name and hash instead).
    frozen: tuple[str, ...] = ()
    # Adam's learning rate when the user gives none: fine-tuned ImageNet weights and the flows on their
    # features want their papers' smaller rates; 1e-3 overshot on them.
    lr: float = 1e-3


def _glow_loss(modules: Mapping[str, nn.Module], batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    images = batch["image"]
    glow = modules["glow"]
    config: GlowConfig = getattr(glow, "module", glow).config
    x = preprocess(images, config.n_bits, "uniform", generator)
    _, log_prob = glow(x)
    dims = x[0].numel()
    bpd = (-log_prob + dims * math.log(2**config.n_bits)) / (dims * math.log(2.0))
    loss = bpd.mean()
    return loss, {"bpd": float(loss.detach())}


def mutate_pixels(images: Tensor, rate: float, generator: torch.Generator | None) -> Tensor:
    """Replace each sub-pixel by a uniform random value with probability `rate` (Ren et al. 2019):
    the background model trained on such inputs learns population statistics, not face semantics."""
    noise = torch.randint(0, 256, images.shape, generator=generator, dtype=torch.uint8, device="cpu").to(images.device)
    flip = torch.rand(images.shape, generator=generator, device="cpu").to(images.device) < rate
    return torch.where(flip, noise, images)


BACKGROUND_MUTATION_RATE = 0.2


def _background_loss(modules: Mapping[str, nn.Module], batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    mutated = mutate_pixels(batch["image"], BACKGROUND_MUTATION_RATE, generator)
    loss, metrics = _glow_loss({"glow": modules["background"]}, {"image": mutated}, generator)
    return loss, {"background_bpd": metrics["bpd"]}


def _vqvae_loss(modules: Mapping[str, nn.Module], batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    images = batch["image"]
    vqvae = modules["vqvae"]
    config: VQVAEConfig = getattr(vqvae, "module", vqvae).config
    x = preprocess(images, 8, "center")
    recon, vq_loss, _ = vqvae(x)
    recon_loss = F.mse_loss(recon, x) if config.recon_loss == "mse" else F.l1_loss(recon, x)
    loss = recon_loss + vq_loss
    return loss, {"recon": float(recon_loss.detach()), "vq": float(vq_loss.detach()), "loss": float(loss.detach())}


def _prior_loss(modules: Mapping[str, nn.Module], batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    images = batch["image"]
    vqvae = getattr(modules["vqvae"], "module", modules["vqvae"])
    with torch.no_grad():
        codes = vqvae.encode(preprocess(images, 8, "center"))
    logits = modules["prior"](codes)
    # Mean NLL per code position in nats: the prior's own bits-back-free likelihood of the latents.
    loss = F.cross_entropy(logits, codes)
    return loss, {"code_nll": float(loss.detach())}


def _clip_autoencoder_loss(modules: Mapping[str, nn.Module], batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    clips = batch["image"]
    x = getattr(modules["encoder"], "module", modules["encoder"]).prepare(clips)
    loss = F.mse_loss(modules["encoder"](x), x)
    return loss, {"recon": float(loss.detach())}


def _clip_flow_loss(modules: Mapping[str, nn.Module], batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    clips = batch["image"]
    autoencoder: ClipAutoencoder = getattr(modules["encoder"], "module", modules["encoder"])
    with torch.no_grad():
        embedding = autoencoder.encoder(autoencoder.prepare(clips))
    _, log_prob = modules["flow"](embedding)
    # Nats per embedding dimension, the unit of the clip_nll score.
    loss = (-log_prob / embedding.shape[1]).mean()
    return loss, {"nll": float(loss.detach())}


def _patch_loss(modules: Mapping[str, nn.Module], batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    images = batch["image"]
    density: PatchDensity = getattr(modules["patch"], "module", modules["patch"])
    # Nats per patch dimension over every patch of every crop, the unit of the patch_nll score.
    loss = (-modules["patch"](images) / density.dim).mean()
    return loss, {"nll": float(loss.detach())}


def _self_blends(batch: Batch, count: int, config: SelfBlendConfig, generator: torch.Generator | None) -> Tensor:
    """Self-blends of the first `count` real crops of a batch, on the batch's device."""
    images, real = batch["image"], batch["label"] == 0
    reals, meshes = images[real][:count], batch["mesh"][real][:count]
    blends, _ = self_blend(reals.cpu().numpy(), meshes.cpu().numpy(), _numpy_rng(generator), config)
    return torch.from_numpy(blends).to(images.device)


def _classifier_loss(modules: Mapping[str, nn.Module], batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    classifier: FakeClassifier = getattr(modules["classifier"], "module", modules["classifier"])
    images, labels = batch["image"], batch["label"].long()
    count = round(classifier.config.blended_fakes * int((labels == 0).sum()))
    if count:
        images = torch.cat([images, _self_blends(batch, count, classifier.config.blend, generator)])
        labels = torch.cat([labels, torch.ones(count, dtype=torch.long, device=labels.device)])
    x = preprocess(images, 8, "center")
    output = modules["classifier"](x)
    ce = balanced_mean(F.cross_entropy(output.logits, labels, reduction="none"), labels)
    recon = F.l1_loss(output.recon, x)
    loss = ce + classifier.config.recon_weight * recon
    return loss, {"ce": float(ce.detach()), "recon": float(recon.detach()), "loss": float(loss.detach())}


def _abnormality_loss(modules: Mapping[str, nn.Module], batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    classifier: FakeClassifier = getattr(modules["classifier"], "module", modules["classifier"])
    grid = getattr(modules["abnormality"], "module", modules["abnormality"]).config.residual_grid
    images, labels = batch["image"], batch["label"]
    # Outliers start from real faces: a new manipulation of real footage is what the module must flag.
    outliers = _self_blends(batch, int((labels == 0).sum()), classifier.config.blend, generator)
    inputs = torch.cat([images, outliers])
    target = torch.cat([torch.zeros(len(images)), torch.ones(len(outliers))]).to(images.device)
    with torch.no_grad():
        x = preprocess(inputs, 8, "center")
        aux = auxiliary(classifier(x), x, grid)
    bce = balanced_mean(F.binary_cross_entropy_with_logits(modules["abnormality"](aux), target, reduction="none"), target)
    return bce, {"bce": float(bce.detach())}


def _numpy_rng(generator: torch.Generator | None) -> np.random.Generator:
    """A NumPy generator drawn from the torch one, so augmentations in NumPy/OpenCV follow the run's seed."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))


def _blend_loss(modules: Mapping[str, nn.Module], batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    detector: BlendDetector = getattr(modules["detector"], "module", modules["detector"])
    images = batch["image"]
    both, labels = blended_batch(images.cpu().numpy(), batch["mesh"].cpu().numpy(), detector.config,
                                 _numpy_rng(generator))
    logits = modules["detector"](torch.from_numpy(both).to(images.device))
    bce = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(labels).to(images.device))
    real, blend = logits.detach().chunk(2)  # blended_batch puts the reals first, each blend at its real's place
    return bce, {"bce": float(bce.detach()), "pair_error": matched_pair_error(real, blend)}


def _cflow_loss(modules: Mapping[str, nn.Module], batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    decoders: CFlowDecoders = getattr(modules["cflow"], "module", modules["cflow"])
    with torch.no_grad():
        features = modules["encoder"].features(batch["image"])
    fibres, conditions = random_fibres(features, decoders, decoders.config.fibers_per_image, generator)
    log_likelihoods = modules["cflow"](fibres, conditions)
    # Nats per feature dimension, averaged over scales: each scale weighs the same whatever its width.
    nll = torch.stack([-v.mean() for v in log_likelihoods.values()]).mean()
    return nll, {"nll": float(nll.detach())}


def _differnet_loss(modules: Mapping[str, nn.Module], batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    flow: DifferNetFlow = getattr(modules["differnet"], "module", modules["differnet"])
    with torch.no_grad():
        pooled = pooled_features(modules["encoder"], random_transforms(batch["image"], flow.config, generator))
    # Nats per feature dimension, the unit of the differnet_nll score.
    nll = -modules["differnet"](pooled).mean()
    return nll, {"nll": float(nll.detach())}


def _svdd_loss(modules: Mapping[str, nn.Module], batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    svdd: DeepSVDD = getattr(modules["svdd"], "module", modules["svdd"])
    with torch.no_grad():
        pooled = pooled_features(modules["encoder"], batch["image"])
    distance = modules["svdd"](pooled).mean()
    return distance + svdd.weight_penalty(), {"distance": float(distance.detach())}


def _patchsvdd_loss(modules: Mapping[str, nn.Module], batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    bank: PatchBank = getattr(modules["patchsvdd"], "module", modules["patchsvdd"])
    with torch.no_grad():
        features = modules["encoder"].features(batch["image"])
    if bank.training:
        # Filling the bank is the whole of training; validation measures how close real fibres come to it.
        filled = min(int(getattr(bank, f"seen_{s}")) for s in bank.config.strides) / bank.config.bank_size
        return modules["patchsvdd"](features), {"bank_filled": min(filled, 1.0)}
    with torch.no_grad():
        distance = torch.stack([d.mean() for d in bank.distance_maps(features).values()]).mean()
    return distance, {"distance": float(distance)}


FAMILIES: dict[str, Family] = {
    "glow": Family(
        components={"glow": (GlowConfig, Glow), "background": (GlowConfig, Glow)},
        phases=(
            Phase("glow", "glow", _glow_loss, "bpd"),
            Phase("background", "background", _background_loss, "background_bpd"),
        ),
        image_size=lambda c: c["glow"].image_size,  # type: ignore[attr-defined]
    ),
    "vqvae": Family(
        components={"vqvae": (VQVAEConfig, VQVAE), "prior": (PixelSNAILConfig, PixelSNAIL)},
        phases=(Phase("vqvae", "vqvae", _vqvae_loss, "loss"), Phase("prior", "prior", _prior_loss, "code_nll")),
        image_size=lambda c: c["vqvae"].image_size,  # type: ignore[attr-defined]
    ),
    # Seed 000's video-level route: a 3-D conv encoder learnt on real clips, a RealNVP on its embeddings.
    "clip": Family(
        components={"encoder": (ClipAutoencoderConfig, ClipAutoencoder), "flow": (RealNVPConfig, RealNVP)},
        phases=(Phase("encoder", "encoder", _clip_autoencoder_loss, "recon"), Phase("flow", "flow", _clip_flow_loss, "nll")),
        image_size=lambda c: c["encoder"].image_size,  # type: ignore[attr-defined]
        clip_frames=lambda c: c["encoder"].clip_frames,  # type: ignore[attr-defined]
    ),
    # Local high-frequency texture, which whole-face densities drown in identity.
    "patch": Family(
        components={"patch": (PatchDensityConfig, PatchDensity)},
        phases=(Phase("patch", "patch", _patch_loss, "nll"),),
        image_size=lambda c: c["patch"].image_size,  # type: ignore[attr-defined]
    ),
    # Seed 004: supervised on the train split's fakes, with an abnormality module for unseen methods.
    "classifier": Family(
        components={"classifier": (FakeClassifierConfig, FakeClassifier), "abnormality": (AbnormalityConfig, AbnormalityModule)},
        phases=(Phase("classifier", "classifier", _classifier_loss, "ce"),
                Phase("abnormality", "abnormality", _abnormality_loss, "bce")),
        image_size=lambda c: c["classifier"].image_size,  # type: ignore[attr-defined]
        supervised=True,
        needs_mesh=True,
        lr=0.0003,
    ),
    # Real crops against self-blends of themselves (Shiohara & Yamasaki): no fake is ever seen.
    "blend": Family(
        components={"detector": (BlendDetectorConfig, BlendDetector)},
        phases=(Phase("detector", "detector", _blend_loss, "bce"),),
        image_size=lambda c: c["detector"].image_size,  # type: ignore[attr-defined]
        needs_mesh=True,
        lr=0.0003,
    ),
    # Seed 003: conditional flows with positional encoding on a frozen ImageNet feature pyramid.
    "cflow": Family(
        components={"encoder": (EfficientNetLiteConfig, EfficientNetLite), "cflow": (CFlowConfig, CFlowDecoders)},
        phases=(Phase("cflow", "cflow", _cflow_loss, "nll"),),
        image_size=lambda c: c["cflow"].image_size,  # type: ignore[attr-defined]
        frozen=("encoder",),
        lr=0.0002,
    ),
    # Seed 003's DifferNet: a flow on one pooled multi-scale ImageNet feature vector per crop.
    "differnet": Family(
        components={"encoder": (EfficientNetLiteConfig, EfficientNetLite), "differnet": (DifferNetConfig, DifferNetFlow)},
        phases=(Phase("differnet", "differnet", _differnet_loss, "nll"),),
        image_size=lambda c: c["differnet"].image_size,  # type: ignore[attr-defined]
        frozen=("encoder",),
        lr=0.0002,
    ),
    # Seed 003's Deep SVDD baseline on the same pooled features.
    "svdd": Family(
        components={"encoder": (EfficientNetLiteConfig, EfficientNetLite), "svdd": (DeepSVDDConfig, DeepSVDD)},
        phases=(Phase("svdd", "svdd", _svdd_loss, "distance"),),
        image_size=lambda c: c["svdd"].image_size,  # type: ignore[attr-defined]
        frozen=("encoder",),
        lr=0.0001,
    ),
    # Seed 003's Patch SVDD score: distance of each feature fibre to its nearest real training fibre.
    "patchsvdd": Family(
        components={"encoder": (EfficientNetLiteConfig, EfficientNetLite), "patchsvdd": (PatchSVDDConfig, PatchBank)},
        phases=(Phase("patchsvdd", "patchsvdd", _patchsvdd_loss, "distance"),),
        image_size=lambda c: c["patchsvdd"].image_size,  # type: ignore[attr-defined]
        frozen=("encoder",),
    ),
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def parse_configs(name: str, configs: Mapping[str, Mapping[str, Any]]) -> dict[str, BaseModel]:
    """Validate per-component configs (missing components get their defaults). Shapes one component
    takes from another are filled in here, so a user never has to keep them consistent by hand: the
    prior's vocabulary and map size are the VQ-VAE's, the clip flow's dimension is the encoder's width,
    the abnormality module's feature width is the classifier's."""
    fam = family(name)
    unknown = set(configs) - set(fam.components)
    if unknown:
        raise ValueError(f"family {name!r} has no components {sorted(unknown)}; it has {sorted(fam.components)}")
    parsed: dict[str, BaseModel] = {}
    # A frozen encoder is whatever its consumer needs: configured through the consumer, built last.
    for comp, (cls, _) in sorted(fam.components.items(), key=lambda item: item[0] in fam.frozen):
        values = dict(configs.get(comp, {}))
        if comp in fam.frozen:
            # The family's own component, named like the family, says which variant and maps it reads.
            consumer = parsed[name]
            values.update(variant=consumer.variant, strides=consumer.strides, pretrained=True)  # type: ignore[attr-defined]
        if name == "vqvae" and comp == "prior":
            vq: VQVAEConfig = parsed["vqvae"]  # type: ignore[assignment]
            values.update(num_codes=vq.codebook_size, height=vq.code_size, width=vq.code_size)
        if name == "classifier" and comp == "abnormality":
            values["feature_dim"] = stride_channels(parsed["classifier"].variant)[32]  # type: ignore[attr-defined]
        if name == "clip" and comp == "flow":
            values["dim"] = parsed["encoder"].encoder.embed_dim  # type: ignore[attr-defined]
        parsed[comp] = cls(**values)
    if name == "glow" and "background" not in configs:
        # The likelihood ratio compares two densities of the same inputs: same architecture by default.
        parsed["background"] = parsed["glow"]
    return parsed


def build_modules(name: str, configs: Mapping[str, Mapping[str, Any]]) -> dict[str, nn.Module]:
    fam = family(name)
    parsed = parse_configs(name, configs)
    modules = {comp: fam.components[comp][1](parsed[comp]) for comp in fam.components}
    for comp in fam.frozen:
        freeze(modules[comp])  # type: ignore[arg-type]
    return modules
