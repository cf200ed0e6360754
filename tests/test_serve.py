"""End to end: the Ray Serve scoring app over real HTTP on loopback, backed by a registry holding a tiny
Glow (two versions) and a tiny VQ-VAE; every endpoint, every kind of bad input, auth, multiplexing and
alias moves, and no 5xx anywhere."""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import httpx
import mlflow
import numpy as np
import pytest
import yaml
from pydantic import SecretStr
from ray import serve
from ray.serve import Application

from conftest import face_frames, free_port, write_video
from flowood_ray.cluster.runtime import init_ray
from flowood_ray.cluster.serve import build_app, build_application
from flowood_ray.cluster.serve_settings import ServeSettings
from flowood_ray.media.align import align_face
from flowood_ray.media.faces import CropConfig, FaceDetector
from flowood_ray.media.sampling import SamplingConfig
from flowood_ray.registry import configure, load_registered, promote, register_bundle
from flowood_ray.scoring.scorers import Scorer, build_scorer

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent

GLOW = "models:/flowood-glow@champion"
VQVAE = "models:/flowood-vqvae@champion"
CLIP = "models:/flowood-clip@champion"
CLASSIFIER = "models:/flowood-classifier@champion"
MULTIPLEX = "serve_multiplexed_model_id"
TOKEN = "s3cret-test-token"
BODY_LIMIT = 1_000_000
MAX_SECONDS = 2.0
FRAMES_PER_VIDEO = 5  # frame models; not the 8 frames per video of the clip model's training crops
MAX_HEATMAPS = 2


@dataclass
class Server:
    port: int
    tracking_uri: str
    client: httpx.Client
    statuses: list[tuple[str, int]] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def encode(rgb: np.ndarray, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, _bgr(rgb))
    assert ok
    return data.tobytes()


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims `width` x `height`: a decompression bomb's calling card."""
    data = bytearray(encode(np.zeros((8, 8, 3), np.uint8), ".png"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(np.zeros((8, 8, 3), np.uint8), ".jpg"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def expected_verdict(score: float, threshold: float | None) -> str:
    """Flagged above the threshold; a threshold too few calibration reals resolve (None) flags nothing."""
    return "fake" if threshold is not None and score > threshold else "real"


def noise_frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [cv2.GaussianBlur(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), (31, 31), 10) for _ in range(n)]


@pytest.fixture(scope="module")
def registry(trained_models: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A registry of this module's own, so aliases can move without touching other tests': the session's
    trained glow, vqvae, clip and classifier as version 1 (champions) of flowood-<family>, and flowood-glow
    version 2 (candidate, same weights)."""
    configure(trained_models["tracking_uri"])
    bundles = {name: load_registered(f"models:/flowood-{name}/{trained_models['summaries'][name]['version']}")
               for name in ("glow", "vqvae", "clip", "classifier")}
    uri = f"sqlite:///{tmp_path_factory.mktemp('serve_registry') / 'mlflow.db'}"
    configure(uri)
    client = mlflow.MlflowClient()
    for name, bundle in [*bundles.items(), ("glow", bundles["glow"])]:
        run = client.create_run(mlflow.set_experiment(f"flowood-{name}").experiment_id, run_name=f"serve-{name}")
        version = register_bundle(bundle, run.info.run_id)
        client.set_terminated(run.info.run_id, "FINISHED")
        if version == "1":
            promote(f"flowood-{name}", version)
    assert str(client.get_model_version_by_alias("flowood-glow", "candidate").version) == "2"
    return uri


@pytest.fixture(scope="module")
def server(registry: str) -> Iterator[Server]:
    """Two apps on one Serve instance: `open` at / (no token) and `secured` at /secured (bearer token)."""
    init_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        settings = ServeSettings(
            models=[GLOW, VQVAE, CLIP], tracking_uri=registry, token=None, alias_refresh_s=0.0,
            max_body_bytes=BODY_LIMIT, max_video_seconds=MAX_SECONDS, frames_per_video=FRAMES_PER_VIDEO,
            max_heatmaps=MAX_HEATMAPS,
        )
        # Half a CPU each: both apps fit beside the driver on a 2-CPU machine.
        options = {"ray_actor_options": {"num_cpus": 0.5}}
        serve.run(build_application(settings, **options), name="open", route_prefix="/")
        secured = settings.model_copy(update={"models": [GLOW], "token": SecretStr(TOKEN)})
        serve.run(build_application(secured, **options), name="secured", route_prefix="/secured")
        statuses: list[tuple[str, int]] = []

        def record(response: httpx.Response) -> None:
            statuses.append((f"{response.request.method} {response.request.url}", response.status_code))

        hooks = {"response": [record]}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, event_hooks=hooks) as client:
            yield Server(port, registry, client, statuses)
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    return face_frames(1, width=320, height=240, seed=3)[0]


def bare_scorer(uri: str, tracking_uri: str) -> Scorer:
    configure(tracking_uri)
    return build_scorer(load_registered(uri))


def bare_scores(face_rgb: np.ndarray, scorer: Scorer) -> dict[str, np.ndarray]:
    """Detect, align (as the training crops were made) and score in-process: what the server must reproduce."""
    crop = CropConfig(**scorer.bundle.extra["crop"])
    detector = FaceDetector(crop)
    try:
        faces = sorted(detector.detect(face_rgb), key=lambda f: f.area, reverse=True)
    finally:
        detector.close()
    crops = np.stack([align_face(face_rgb, f.keypoints, crop.size, crop.margin)[0] for f in faces])
    return scorer.score(crops)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == code, body
    assert isinstance(body["detail"], str) and body["detail"]


def test_health_docs_and_models(server: Server) -> None:
    client = server.client
    assert client.get("/healthz").json()["status"] == "ok"
    spec = client.get("/openapi.json").json()
    assert {"/v1/score/image", "/v1/score/video", "/v1/models", "/healthz"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/score/image"]["post"]["requestBody"]["content"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()

    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"flowood-glow", "flowood-vqvae", "flowood-clip"}
    glow, vq, clip = models["flowood-glow"], models["flowood-vqvae"], models["flowood-clip"]
    assert (glow["version"], glow["default"], glow["family"]) == ("1", True, "glow")
    assert "champion" in glow["aliases"] and (vq["version"], vq["family"]) == ("1", "vqvae")
    assert (clip["version"], clip["family"], clip["score"]) == ("1", "clip", "clip_nll")
    for entry, uri in ((glow, GLOW), (vq, VQVAE), (clip, CLIP)):
        scorer = bare_scorer(uri, server.tracking_uri)
        calibration = scorer.bundle.calibration
        assert entry["score"] == scorer.primary == calibration["primary"]
        assert entry["frame_threshold"] == calibration["frame"][scorer.primary]["thresholds"]["0.01"]
        assert entry["video_threshold"] == calibration["video"][scorer.primary]["thresholds"]["0.01"]
        assert entry["thresholds"]["frame"] == {k: v["thresholds"] for k, v in calibration["frame"].items()}
        assert (entry["crop_size"], entry["crop_margin"]) == (32, 0.3)


@pytest.mark.parametrize(
    ("ext", "content_type"), [(".png", "image/png"), (".jpg", "image/jpeg"), (".webp", "image/webp")]
)
def test_image_scores_match_the_bare_model(server: Server, face: np.ndarray, ext: str, content_type: str) -> None:
    data = encode(face, ext)
    response = server.client.post("/v1/score/image", content=data, headers={"content-type": content_type})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"]["name"], body["model"]["version"], body["model"]["family"]) == ("flowood-glow", "1", "glow")
    assert (body["width"], body["height"]) == (320, 240)
    assert body["faces"]
    scorer = bare_scorer(GLOW, server.tracking_uri)
    for i, result in enumerate(body["faces"]):
        x0, y0, x1, y1 = result["box"]
        assert 0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 240
        assert result["score"] == result["scores"][scorer.primary]
        assert result["threshold"] == body["model"]["frame_threshold"]
        assert result["verdict"] == expected_verdict(result["score"], result["threshold"])
    if ext == ".png":  # lossless: the server saw exactly these pixels
        for name, values in bare_scores(face, scorer).items():
            np.testing.assert_allclose([f["scores"][name] for f in body["faces"]], values, rtol=0, atol=1e-4)


def test_multipart_upload_and_concurrent_requests_agree(server: Server, face: np.ndarray) -> None:
    data = encode(face, ".png")
    raw = server.client.post("/v1/score/image", content=data, headers={"content-type": "image/png"}).json()
    multipart = server.client.post("/v1/score/image", files={"file": ("face.png", data, "image/png")})
    assert multipart.status_code == 200, multipart.text
    assert multipart.json()["faces"] == raw["faces"]

    async def burst() -> list[httpx.Response]:
        # Concurrent requests land in shared @serve.batch calls; batch-independent scorers give equal results.
        async with httpx.AsyncClient(base_url=server.base, timeout=120) as client:
            return await asyncio.gather(*[
                client.post("/v1/score/image", content=data, headers={"content-type": "image/png"}) for _ in range(12)
            ])

    for response in asyncio.run(burst()):
        server.statuses.append(("burst", response.status_code))
        assert response.status_code == 200, response.text
        for got, want in zip(response.json()["faces"], raw["faces"]):
            np.testing.assert_allclose(got["score"], want["score"], rtol=0, atol=1e-5)


def test_video_frames_and_clip_verdict(server: Server, tmp_path: Path) -> None:
    clip = write_video(tmp_path / "clip.mp4", face_frames(25, seed=1)).read_bytes()  # 1 s at 25 fps
    response = server.client.post("/v1/score/video", content=clip, headers={"content-type": "video/mp4"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["frame_count"] == 25 and body["duration_s"] <= MAX_SECONDS
    frames = body["frames"]
    assert 0 < len(frames) <= FRAMES_PER_VIDEO and body["video"]["frames_scored"] == len(frames)
    assert [f["frame_index"] for f in frames] == sorted(f["frame_index"] for f in frames)
    video = body["video"]
    assert video["aggregation"] == "mean" and video["frames_scored"] == len(frames)
    # The clip is aggregated as calibration and archive scoring aggregate it.
    scorer = bare_scorer(GLOW, server.tracking_uri)
    frame_scores = {name: np.array([f["scores"][name] for f in frames]) for name in frames[0]["scores"]}
    _, expected = scorer.aggregate(np.zeros(len(frames), dtype=np.int64), frame_scores)
    for name, values in expected.items():
        np.testing.assert_allclose(video["scores"][name], values[0], rtol=1e-9)
    assert video["score"] == video["scores"][scorer.primary]
    assert video["threshold"] == body["model"]["video_threshold"]
    assert video["verdict"] == expected_verdict(video["score"], video["threshold"])
    for frame in frames:
        assert frame["verdict"] == expected_verdict(frame["score"], body["model"]["frame_threshold"])

    multipart = server.client.post("/v1/score/video", files={"file": ("clip.mp4", clip, "video/mp4")})
    assert multipart.status_code == 200, multipart.text
    assert multipart.json()["video"] == video


def test_the_clip_family_scores_videos_and_refuses_images(server: Server, face: np.ndarray, tmp_path: Path) -> None:
    clip = write_video(tmp_path / "clip.mp4", face_frames(25, seed=1)).read_bytes()
    response = server.client.post("/v1/score/video", content=clip, headers={"content-type": "video/mp4", MULTIPLEX: CLIP})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["family"] == "clip" and body["video"]["score"] == body["video"]["scores"]["clip_nll"]
    frames = body["frames"]
    scores = np.array([f["scores"]["clip_nll"] for f in frames])
    assert np.isfinite(scores).all() and len(frames) > 1
    # Registration stored the training crops' sampling (synth_crops: uniform 8) and serving follows it, not
    # frames_per_video: catches clips whose frames are spaced otherwise than in training. Uniform 8 of 25
    # frames by hand: floor((i + 0.5) * 25 / 8).
    assert bare_scorer(CLIP, server.tracking_uri).bundle.extra["sampling"] == SamplingConfig(num_frames=8).model_dump()
    assert [f["frame_index"] for f in frames] == [1, 4, 7, 10, 14, 17, 20, 23]
    image = server.client.post(
        "/v1/score/image", content=encode(face, ".png"), headers={"content-type": "image/png", MULTIPLEX: CLIP}
    )
    assert_error(image, 400, "video_only_model")


def test_the_classifier_scores_images_as_the_bare_model_does(server: Server, face: np.ndarray) -> None:
    # Not among the app's configured models (a replica holds three): the header loads it on demand.
    response = server.client.post(
        "/v1/score/image", content=encode(face, ".png"), headers={"content-type": "image/png", MULTIPLEX: CLASSIFIER}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"]["family"], body["model"]["score"]) == ("classifier", "cls_fake_or_abnormal") and body["faces"]
    scorer = bare_scorer(CLASSIFIER, server.tracking_uri)
    for name, values in bare_scores(face, scorer).items():
        # ODIN included: its input gradient is taken inside the request as in the bare scorer.
        np.testing.assert_allclose([f["scores"][name] for f in body["faces"]], values, rtol=0, atol=1e-4)
    for result in body["faces"]:
        assert result["score"] == result["scores"]["cls_fake_or_abnormal"]


def test_heatmaps_for_the_vqvae_family_only(server: Server, face: np.ndarray, tmp_path: Path) -> None:
    data = encode(face, ".png")
    response = server.client.post(
        "/v1/score/image", params={"heatmap": 1}, content=data, headers={"content-type": "image/png", MULTIPLEX: VQVAE}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"]["name"], body["model"]["score"]) == ("flowood-vqvae", "vq_latent_nll")
    assert body["faces"][0]["heatmap"] is not None
    for result in body["faces"][:MAX_HEATMAPS]:
        heatmap = result["heatmap"]
        assert heatmap["kind"] == "restoration" and heatmap["vmax"] > 0 and 0 < heatmap["max_value"] <= 3
        for key in ("png_base64", "crop_png_base64"):
            image = cv2.imdecode(np.frombuffer(base64.b64decode(heatmap[key]), np.uint8), cv2.IMREAD_COLOR)
            assert image.shape == (32, 32, 3)
    plain = server.client.post("/v1/score/image", content=data, headers={"content-type": "image/png", MULTIPLEX: VQVAE})
    assert [f["score"] for f in plain.json()["faces"]] == [f["score"] for f in body["faces"]]
    assert all(f["heatmap"] is None for f in plain.json()["faces"])

    clip = write_video(tmp_path / "clip.mp4", face_frames(10, seed=2)).read_bytes()
    video = server.client.post(
        "/v1/score/video?heatmap=1", content=clip, headers={"content-type": "video/mp4", MULTIPLEX: VQVAE}
    )
    assert video.status_code == 200, video.text
    frames = video.json()["frames"]
    mapped = [f for f in frames if f["heatmap"] is not None]
    # The most suspicious frames get the maps.
    assert len(mapped) == min(MAX_HEATMAPS, len(frames))
    assert min(f["score"] for f in mapped) >= max((f["score"] for f in frames if f["heatmap"] is None), default=-np.inf)

    glow = server.client.post("/v1/score/image?heatmap=1", content=data, headers={"content-type": "image/png"})
    assert_error(glow, 400, "heatmap_unsupported")


@pytest.mark.parametrize(
    ("model_id", "version", "family"),
    [("models:/flowood-glow/2", "2", "glow"), ("2", "2", "glow"), ("candidate", "2", "glow"),
     ("models:/flowood-glow/1", "1", "glow"), (VQVAE, "1", "vqvae")],
)
def test_multiplexed_model_header(server: Server, face: np.ndarray, model_id: str, version: str, family: str) -> None:
    response = server.client.post(
        "/v1/score/image", content=encode(face, ".png"), headers={"content-type": "image/png", MULTIPLEX: model_id}
    )
    assert response.status_code == 200, response.text
    model = response.json()["model"]
    assert (model["version"], model["family"]) == (version, family)


@pytest.mark.parametrize(
    ("model_id", "status", "code"),
    [("models:/flowood-glow/99", 404, "unknown_model"), ("models:/flowood-nothing@champion", 404, "unknown_model"),
     ("no-such-alias", 404, "unknown_model"), ("models:/flowood-glow", 400, "invalid_model_id")],
)
def test_unknown_models_are_4xx(server: Server, face: np.ndarray, model_id: str, status: int, code: str) -> None:
    response = server.client.post(
        "/v1/score/image", content=encode(face, ".png"), headers={"content-type": "image/png", MULTIPLEX: model_id}
    )
    assert_error(response, status, code)


def _bad_image_requests(face: np.ndarray) -> list[tuple[str, dict, int, str]]:
    jpeg, png = encode(face, ".jpg"), encode(face, ".png")
    oversize = b"\0" * (BODY_LIMIT + 1)
    return [
        ("empty body", {"content": b"", "headers": {"content-type": "image/jpeg"}}, 400, "empty_body"),
        ("not an image", {"content": b"hello, not an image" * 50, "headers": {"content-type": "image/jpeg"}},
         400, "invalid_image"),
        ("truncated jpeg", {"content": jpeg[: len(jpeg) // 2], "headers": {"content-type": "image/jpeg"}},
         400, "invalid_image"),
        ("truncated png", {"content": png[: len(png) // 2], "headers": {"content-type": "image/png"}},
         400, "invalid_image"),
        ("wrong content type", {"content": jpeg, "headers": {"content-type": "text/plain"}},
         415, "unsupported_media_type"),
        ("video content type", {"content": jpeg, "headers": {"content-type": "video/mp4"}},
         415, "unsupported_media_type"),
        ("no content type", {"content": jpeg}, 415, "unsupported_media_type"),
        ("type mismatch", {"content": png, "headers": {"content-type": "image/jpeg"}}, 415, "content_type_mismatch"),
        ("gif", {"content": b"GIF89a" + b"\0" * 100, "headers": {"content-type": "image/gif"}}, 415,
         "unsupported_media_type"),
        ("over the limit", {"content": oversize, "headers": {"content-type": "image/jpeg"}}, 413, "payload_too_large"),
        ("over the limit, chunked",
         {"content": iter([b"\0" * 65536] * (BODY_LIMIT // 65536 + 2)), "headers": {"content-type": "image/jpeg"}},
         413, "payload_too_large"),
        ("over the limit, multipart", {"files": {"file": ("big.jpg", oversize, "image/jpeg")}},
         413, "payload_too_large"),
        ("png bomb", {"content": png_claiming(5000, 5000), "headers": {"content-type": "image/png"}},
         413, "image_too_large"),
        ("huge png bomb", {"content": png_claiming(100_000, 100_000), "headers": {"content-type": "image/png"}},
         413, "image_too_large"),
        ("jpeg bomb", {"content": jpeg_claiming(6000, 6000), "headers": {"content-type": "image/jpeg"}},
         413, "image_too_large"),
        ("no face", {"content": encode(noise_frames(1)[0], ".png"), "headers": {"content-type": "image/png"}},
         422, "no_face"),
        ("multipart without file", {"data": {"note": "no file"}, "files": {"other": ("a.png", png, "image/png")}},
         400, "missing_file"),
        ("multipart text part", {"files": {"file": ("a.txt", b"text", "text/plain")}}, 415, "unsupported_media_type"),
        ("bad query", {"content": png, "params": {"heatmap": "maybe"}, "headers": {"content-type": "image/png"}},
         422, "invalid_request"),
    ]


def test_bad_images_are_4xx_with_json(server: Server, face: np.ndarray) -> None:
    failures = []
    for name, request, status, code in _bad_image_requests(face):
        response = server.client.post("/v1/score/image", **request)
        try:
            assert_error(response, status, code)
        except (AssertionError, ValueError) as exc:
            failures.append(f"{name}: {response.status_code} {response.text[:300]} ({exc})")
    assert not failures, "\n".join(failures)


def test_bad_videos_are_4xx_with_json(server: Server, face: np.ndarray, tmp_path: Path) -> None:
    good = write_video(tmp_path / "good.mp4", face_frames(25, seed=4)).read_bytes()
    long = write_video(tmp_path / "long.mp4", face_frames(75, width=64, height=48)).read_bytes()  # 3 s
    faceless = write_video(tmp_path / "noface.mp4", noise_frames(10)).read_bytes()
    cases = [
        ("empty body", {"content": b"", "headers": {"content-type": "video/mp4"}}, 400, "empty_body"),
        ("not a video", {"content": b"not a video at all " * 100, "headers": {"content-type": "video/mp4"}},
         400, "invalid_video"),
        ("truncated", {"content": good[: len(good) // 2], "headers": {"content-type": "video/mp4"}},
         400, "invalid_video"),
        ("image type", {"content": good, "headers": {"content-type": "image/jpeg"}}, 415, "unsupported_media_type"),
        ("too long", {"content": long, "headers": {"content-type": "video/mp4"}}, 422, "video_too_long"),
        ("no face", {"content": faceless, "headers": {"content-type": "video/mp4"}}, 422, "no_face"),
        ("over the limit", {"content": b"\0" * (BODY_LIMIT + 1), "headers": {"content-type": "video/mp4"}},
         413, "payload_too_large"),
        ("over the limit, chunked",
         {"content": iter([b"\0" * 65536] * (BODY_LIMIT // 65536 + 2)), "headers": {"content-type": "video/mp4"}},
         413, "payload_too_large"),
    ]
    failures = []
    for name, request, status, code in cases:
        response = server.client.post("/v1/score/video", **request)
        try:
            assert_error(response, status, code)
        except (AssertionError, ValueError) as exc:
            failures.append(f"{name}: {response.status_code} {response.text[:300]} ({exc})")
    assert not failures, "\n".join(failures)


def test_declared_oversize_is_refused_before_the_body_is_sent(server: Server) -> None:
    request = (
        "POST /v1/score/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {10**9}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(request)  # headers only: a server waiting for the body would never answer
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), received[:500]
    assert b"payload_too_large" in body


def test_routing_errors_are_json(server: Server) -> None:
    assert_error(server.client.get("/v1/nothing"), 404, "not_found")
    assert_error(server.client.get("/v1/score/image"), 405, "method_not_allowed")


def test_bearer_token_auth(server: Server, face: np.ndarray) -> None:
    client, data = server.client, encode(face, ".png")
    assert client.get("/secured/healthz").status_code == 200  # probes need no token
    assert client.get("/secured/docs").status_code == 200
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"}):
        response = client.get("/secured/v1/models", headers=headers)
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
    assert_error(client.post("/secured/v1/score/image", content=data, headers={"content-type": "image/png"}),
                 401, "unauthorized")
    good = {"authorization": f"Bearer {TOKEN}"}
    assert client.get("/secured/v1/models", headers=good).status_code == 200
    response = client.post("/secured/v1/score/image", content=data, headers={"content-type": "image/png", **good})
    assert response.status_code == 200, response.text
    # The open app takes requests without a token.
    assert client.get("/v1/models").status_code == 200


def test_a_moved_alias_is_picked_up(server: Server, face: np.ndarray) -> None:
    data = encode(face, ".png")

    def served_version() -> str:
        response = server.client.post("/v1/score/image", content=data, headers={"content-type": "image/png"})
        assert response.status_code == 200, response.text
        return response.json()["model"]["version"]

    configure(server.tracking_uri)
    assert served_version() == "1"
    promote("flowood-glow", "2")
    try:
        assert served_version() == "2"
        glow = next(m for m in server.client.get("/v1/models").json()["models"] if m["name"] == "flowood-glow")
        assert glow["version"] == "2" and "champion" in glow["aliases"]
    finally:
        promote("flowood-glow", "1")
    assert served_version() == "1"


def test_no_5xx_and_replicas_stay_healthy(server: Server, face: np.ndarray) -> None:
    """After every request of this module (runs last), bad inputs included: no 5xx, healthy replicas."""
    for _, request, status, _ in _bad_image_requests(face):
        assert server.client.post("/v1/score/image", **request).status_code == status
    assert not [s for s in server.statuses if s[1] >= 500], [s for s in server.statuses if s[1] >= 500]
    assert server.client.get("/healthz").json()["status"] == "ok"
    status = serve.status()
    for name in ("open", "secured"):
        app = status.applications[name]
        assert app.status == "RUNNING", app
        for deployment in app.deployments.values():
            assert deployment.status == "HEALTHY", deployment
            assert set(deployment.replica_states) == {"RUNNING"}, deployment.replica_states


def test_deploy_config_validates_against_rays_schema() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text()))
    assert config.http_options.host == "127.0.0.1"
    (app,) = config.applications
    assert app.import_path == "flowood_ray.cluster.serve:build_app"
    settings = ServeSettings.model_validate(app.args)
    assert settings.models and all(uri.startswith("models:/") for uri in settings.models)
    assert [d.name for d in app.deployments] == ["ScoringService"]


def test_build_app_takes_serve_run_arguments(tmp_path: Path) -> None:
    """`serve run flowood_ray.cluster.serve:build_app model=URI key=value` passes strings."""
    app = build_app({"model": GLOW, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "max_body_bytes": "2048"})
    assert isinstance(app, Application)
    assert ServeSettings.model_validate({"model": f"{GLOW},{VQVAE}"}).models == [GLOW, VQVAE]
    for bad in ({"model": "flowood-glow"}, {"model": GLOW, "max_body_byts": 1}, {"models": []},
                {"model": GLOW, "models": [VQVAE]}):
        with pytest.raises(ValueError):
            ServeSettings.model_validate(bad)
