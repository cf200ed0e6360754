"""Mutation check of the score tests: plant one known mistake at a time in a copy of the package and
check that the fast tests notice.

For each mutation, `flowood_ray/`, `tests/` and `pyproject.toml` (the pytest configuration) are copied
into a fresh temporary directory, the source is patched by exact string replacements whose anchors
must each occur exactly once (so the script fails loudly once the code moves), and

    python -m pytest -q -x -p no:cacheprovider -m 'not e2e' <the mutation's test files>

runs there with the copy first on PYTHONPATH. The package is installed in editable mode pointing at
the checkout, so before every run a subprocess with the same environment imports the mutated module
and the script checks that it came from the copy. The unmutated copy must pass the union of all test
files first. Prints: mutation, killed by (first failing test) or SURVIVED; exits 1 if any survived or
a run went wrong.

Usage: python bench/mutations.py [--only SUBSTRING ...] [--without-new-tests]
(--without-new-tests drops tests/test_scoring_values.py from every run, to see what the older tests
alone catch.)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VALUES = "tests/test_scoring_values.py"
GLOW_TESTS = (VALUES, "tests/test_models_glow.py")
VQ_TESTS = (VALUES, "tests/test_models_vqvae.py")
PATCH_TESTS = (VALUES, "tests/test_models_patch.py")
CLASSIFIER_TESTS = (VALUES, "tests/test_models_classifier.py")
RESTORATION_TESTS = (VALUES, "tests/test_scoring_restoration.py")
TYPICALITY_TESTS = (VALUES, "tests/test_scoring_aggregate.py", "tests/test_models_patch.py")
PARALLEL_RESTORATION_TESTS = ("tests/test_models_vqvae.py", "tests/test_scoring_restoration.py")
CONFORMAL_TESTS = ("tests/test_scoring_conformal.py", "tests/test_scoring_calibration.py")
RUN_TIMEOUT_S = 900


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (anchor, replacement); every anchor must occur exactly once
    tests: tuple[str, ...]

    @property
    def module(self) -> str:
        return self.path.removesuffix(".py").replace("/", ".")


SCORERS, CATALOG = "flowood_ray/scoring/scorers.py", "flowood_ray/models/catalog.py"
CLASSIFIER, RESTORATION = "flowood_ray/models/classifier.py", "flowood_ray/scoring/restoration.py"
TRAIN_JOB, VQVAE_MODEL = "flowood_ray/cluster/train_job.py", "flowood_ray/models/vqvae_restore.py"
CALIBRATION, CONFORMAL = "flowood_ray/scoring/calibration.py", "flowood_ray/scoring/conformal.py"

MUTATIONS: tuple[Mutation, ...] = (
    # The review's six.
    Mutation("glow_lr sign flipped", SCORERS,
             (('"glow_lr": bpd - background', '"glow_lr": background - bpd'),), GLOW_TESTS),
    Mutation("glow_complexity sign flipped", SCORERS,
             (('"glow_complexity": bpd - complexity', '"glow_complexity": complexity - bpd'),), GLOW_TESTS),
    Mutation("vq lambda_s mask inverted", SCORERS,
             (("torch.where(nll > self.lambda_s, nll, 0.0)", "torch.where(nll <= self.lambda_s, nll, 0.0)"),),
             VQ_TESTS),
    Mutation("PNG code length zeroed", SCORERS,
             (("8.0 * len(cv2.imencode(", "0.0 * len(cv2.imencode("),), GLOW_TESTS),
    Mutation("mutate_pixels is a no-op", CATALOG,
             (("return torch.where(flip, noise, images)", "return images"),), GLOW_TESTS),
    Mutation("typicality entropy 0 at calibration", SCORERS,
             (("return {key: float(self.score_video(crops, batch_size)[base].mean())}", "return {key: 0.0}"),),
             TYPICALITY_TESTS),
    # Further mistakes in the same scores.
    Mutation("typicality entropy 0 in the scorer", SCORERS,
             (("bundle.extra.get(self.typicality[2]) if self.typicality else None",
               "0.0 if self.typicality else None"),),
             TYPICALITY_TESTS),
    Mutation("video typicality = mean of frame distances", SCORERS,
             (("if name != typical:", "if True:"),
              ("if self.typicality and typical in scores and self.entropy is not None:", "if False:")),
             TYPICALITY_TESTS),
    Mutation("PNG of the raw crop, not the model input", SCORERS,
             (("png_bits_per_dim(images.cpu().numpy())", "png_bits_per_dim(crops)"),), GLOW_TESTS),
    Mutation("glow scored with noisy dequantisation", SCORERS,
             (('x = preprocess(images, self.glow.config.n_bits, "center")',
               'x = preprocess(images, self.glow.config.n_bits, "uniform")'),), GLOW_TESTS),
    Mutation("bits/dim with 255 bins", "flowood_ray/models/glow.py",
             (("d * math.log(2**self.config.n_bits))", "d * math.log(2**self.config.n_bits - 1))"),), GLOW_TESTS),
    Mutation("pixel noise over 0..254", CATALOG,
             (("torch.randint(0, 256, images.shape", "torch.randint(0, 255, images.shape"),), GLOW_TESTS),
    Mutation("lambda_s at the 90% quantile", SCORERS,
             (("LAMBDA_S_QUANTILE = 0.95", "LAMBDA_S_QUANTILE = 0.90"),), VQ_TESTS),
    Mutation("reference statistics from the validation crops", TRAIN_JOB,
             (("reference_statistics(train_images))", "reference_statistics(val_images))"),), TYPICALITY_TESTS),
    Mutation("patch inner mask inverted", SCORERS,
             (("nll[:, inner].mean(1)", "nll[:, ~inner].mean(1)"),), PATCH_TESTS),
    Mutation("patch inner mask as a cross", "flowood_ray/models/patch_density.py",
             (("inside[:, None] & inside[None, :]", "inside[:, None] | inside[None, :]"),), PATCH_TESTS),
    Mutation("cls_fake sign flipped", SCORERS,
             (("fake = output.logits[:, 1] - output.logits[:, 0]",
               "fake = output.logits[:, 0] - output.logits[:, 1]"),),
             CLASSIFIER_TESTS),
    Mutation("cls_msp not complemented", SCORERS,
             (('"cls_msp": 1 - output.logits', '"cls_msp": output.logits'),), CLASSIFIER_TESTS),
    Mutation("cls_energy sign flipped", SCORERS,
             (('"cls_energy": -torch.logsumexp', '"cls_energy": torch.logsumexp'),), CLASSIFIER_TESTS),
    Mutation("noisy-OR replaced by a max", CLASSIFIER,
             (("return F.softplus(fake_logit) + F.softplus(abnormality_logit)",
               "return torch.maximum(F.softplus(fake_logit), F.softplus(abnormality_logit))"),), CLASSIFIER_TESTS),
    Mutation("ODIN steps along the gradient", CLASSIFIER,
             (("perturbed = x - ODIN_EPSILON * grad.sign()", "perturbed = x + ODIN_EPSILON * grad.sign()"),),
             CLASSIFIER_TESTS),
    Mutation("ODIN without perturbation", CLASSIFIER,
             (("perturbed = x - ODIN_EPSILON * grad.sign()", "perturbed = x"),), CLASSIFIER_TESTS),
    Mutation("ODIN temperature 1", CLASSIFIER,
             (("ODIN_TEMPERATURE = 1000.0", "ODIN_TEMPERATURE = 1.0"),), CLASSIFIER_TESTS),
    Mutation("abnormality input energy sign flipped", CLASSIFIER,
             (("energy = -torch.logsumexp(output.logits, dim=1, keepdim=True)",
               "energy = torch.logsumexp(output.logits, dim=1, keepdim=True)"),), CLASSIFIER_TESTS),
    Mutation("restoration temperature k = 1", RESTORATION,
             (("REFERENCE_K_PER_ELEMENT = 3.0", "REFERENCE_K_PER_ELEMENT = 1.0"),), RESTORATION_TESTS),
    Mutation("restoration residual averaged over channels", RESTORATION,
             (("(restorations - images[:, None]).abs().sum(dim=2)",
               "(restorations - images[:, None]).abs().mean(dim=2)"),),
             RESTORATION_TESTS),
    Mutation("restoration min-pool is a max-pool", RESTORATION,
             (("x = -F.max_pool2d(-replicate(x, min_kernel), min_kernel, stride=1)",
               "x = F.max_pool2d(replicate(x, min_kernel), min_kernel, stride=1)"),), RESTORATION_TESTS),
    Mutation("restoration pools swapped (7x7 min, 3x3 mean)", RESTORATION,
             (("min_kernel: int = 3, mean_kernel: int = 7", "min_kernel: int = 7, mean_kernel: int = 3"),),
             RESTORATION_TESTS),
    Mutation("restoration mean pool zero-padded", RESTORATION,
             (("x = F.avg_pool2d(replicate(x, mean_kernel), mean_kernel, stride=1)",
               "x = F.avg_pool2d(x, mean_kernel, stride=1, padding=mean_kernel // 2)"),), RESTORATION_TESTS),
    Mutation("parallel restoration redraws the codes below lambda_p", VQVAE_MODEL,
             (('take = take & (F.cross_entropy(raw_logits, codes, reduction="none") > threshold)',
               'take = take & (F.cross_entropy(raw_logits, codes, reduction="none") <= threshold)'),),
             PARALLEL_RESTORATION_TESTS),
    Mutation("parallel restoration ignores the temperature", VQVAE_MODEL,
             (("replica_uniforms.reshape(-1), temperature", "replica_uniforms.reshape(-1), 1.0"),),
             PARALLEL_RESTORATION_TESTS),
    Mutation("parallel restorations share one uniform per position", VQVAE_MODEL,
             (("uniforms.view(n, n_samples, h * w)[image, :, position]",
               "uniforms.view(n, n_samples, h * w)[image, :1, position].expand(-1, n_samples)"),),
             PARALLEL_RESTORATION_TESTS),
    Mutation("parallel restoration samples the next position's distribution", VQVAE_MODEL,
             (("chosen = logits[image, position]", "chosen = logits[image, (position + 1) % (h * w)]"),),
             PARALLEL_RESTORATION_TESTS),
    # Conformal calibration with clips as the units (issue 16).
    Mutation("frame calibration counts frames as clips", CALIBRATION,
             (("            weights, n = unit_weights(groups)\n", "            weights, n = np.ones_like(real), real.size\n"),),
             CONFORMAL_TESTS),
    Mutation("conformal p-value counts ties as below", CONFORMAL,
             (("at_least = tail[np.searchsorted(calibration, values, side=\"left\")]",
               "at_least = tail[np.searchsorted(calibration, values, side=\"right\")]"),), CONFORMAL_TESTS),
    Mutation("conformal threshold leaves out the new clip's +1", CONFORMAL,
             (("np.flatnonzero(1.0 + above <= alpha * (n + 1) + 1e-9)", "np.flatnonzero(above <= alpha * (n + 1) + 1e-9)"),),
             CONFORMAL_TESTS),
    Mutation("clip weights 1/m^2", CONFORMAL,
             (("return 1.0 / counts[inverse], int(counts.size)", "return 1.0 / counts[inverse] ** 2, int(counts.size)"),),
             CONFORMAL_TESTS),
)


def copy_tree(destination: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("flowood_ray", "tests"):
        shutil.copytree(REPO / folder, destination / folder, ignore=ignore)
    shutil.copy2(REPO / "pyproject.toml", destination / "pyproject.toml")


def apply(root: Path, mutation: Mutation) -> None:
    path = root / mutation.path
    source = path.read_text()
    for anchor, replacement in mutation.edits:
        count = source.count(anchor)
        if count != 1:
            raise ValueError(
                f"{mutation.name!r}: anchor {anchor!r} occurs {count} times in {mutation.path}, expected once"
            )
        source = source.replace(anchor, replacement)
    path.write_text(source)


def environment(root: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_import(root: Path, module: str) -> None:
    """The editable install points at the checkout: make sure the copy shadows it."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import importlib, sys; print(importlib.import_module(sys.argv[1]).__file__)", module],
        cwd=root, env=environment(root), capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not Path(loaded).resolve().is_relative_to(root.resolve()):
        raise RuntimeError(f"{module} was imported from {loaded}, not from the mutated copy in {root}")


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[str, str]:
    """(outcome, pytest output): outcome is 'passed', 'failed: <first failing test>' or 'error: ...'."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not e2e", *tests]
    done = subprocess.run(
        command, cwd=root, env=environment(root), capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    output = done.stdout + done.stderr
    if done.returncode == 0:
        return "passed", output
    # A test that errors (in a fixture, say) has caught the mutation as much as one that fails.
    failed = re.search(r"^(?:FAILED|ERROR) (\S+::\S+)", output, flags=re.MULTILINE)
    if done.returncode == 1 and failed:
        return f"failed: {failed.group(1)}", output
    return f"error: pytest exit code {done.returncode}", output


def run_one(tests: tuple[str, ...], mutation: Mutation | None) -> tuple[str, str]:
    with tempfile.TemporaryDirectory(prefix="flowood-mutation-") as tmp:
        root = Path(tmp)
        copy_tree(root)
        if mutation is not None:
            apply(root, mutation)
        check_import(root, mutation.module if mutation else "flowood_ray.scoring.scorers")
        return run_tests(root, tests)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=[], help="run the mutations whose name contains one of these")
    parser.add_argument("--without-new-tests", action="store_true", help=f"leave {VALUES} out of every run")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or any(s in m.name for s in args.only)]
    if not chosen:
        parser.error(f"no mutation matches {args.only}")

    def files(tests: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(t for t in tests if not (args.without_new_tests and t == VALUES))

    # Every anchor is checked before anything runs: a moved anchor fails in seconds, not after minutes.
    with tempfile.TemporaryDirectory(prefix="flowood-anchors-") as tmp:
        copy_tree(Path(tmp))
        for mutation in chosen:
            apply(Path(tmp), mutation)
            shutil.copy2(REPO / mutation.path, Path(tmp) / mutation.path)

    union = tuple(dict.fromkeys(t for m in chosen for t in files(m.tests)))
    start = time.perf_counter()
    outcome, output = run_one(union, None)
    print(f"unmutated tree, {len(union)} test files: {outcome} ({time.perf_counter() - start:.0f} s)", flush=True)
    if outcome != "passed":
        print(output[-4000:])
        return 1

    rows: list[tuple[str, str, float]] = []
    for mutation in chosen:
        start = time.perf_counter()
        outcome, output = run_one(files(mutation.tests), mutation)
        rows.append((mutation.name, outcome, time.perf_counter() - start))
        print(f"  {mutation.name}: {outcome}", flush=True)
        if outcome.startswith("error"):
            print(output[-4000:])

    width = max(len(name) for name, _, _ in rows)
    print(f"\n{'mutation':<{width}}  killed by")
    for name, outcome, seconds in rows:
        verdict = {"passed": "SURVIVED"}.get(outcome, outcome.removeprefix("failed: "))
        print(f"{name:<{width}}  {verdict}  ({seconds:.0f} s)")
    survived = sum(outcome == "passed" for _, outcome, _ in rows)
    errors = sum(outcome.startswith("error") for _, outcome, _ in rows)
    print(f"\n{len(rows) - survived - errors} killed, {survived} survived, {errors} errors")
    return 1 if survived or errors else 0


if __name__ == "__main__":
    sys.exit(main())
