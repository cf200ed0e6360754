"""How the scoring service answers a model it cannot load, without Ray: the registry's own answers
(unknown model, version or alias: 404; unreachable, timed out, missing database: 503) against bugs
(any other exception: 500 `internal_error`, traceback in the log, not in the response)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from conftest import TINY_MODELS, free_port
from flowood_ray.cluster.serve_models import load_served_model, registry_call
from flowood_ray.cluster.serve_schemas import ApiError, add_error_handlers
from flowood_ray.cluster.serve_settings import ServeSettings
from flowood_ray.models.catalog import build_modules, parse_configs
from flowood_ray.registry import ModelBundle, configure, register_bundle, resolve_version

NAME = "flowood-glow"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite registry holding one Glow version whose recorded config does not fit its weights, as a
    bundle written by code with a config bug would be."""
    root = tmp_path_factory.mktemp("registry")
    uri = configure(f"sqlite:///{root / 'mlflow.db'}")
    experiment = mlflow.create_experiment("serve-errors", artifact_location=(root / "artifacts").as_uri())
    glow = TINY_MODELS["glow"]["glow"]
    recorded = parse_configs("glow", {"glow": {**glow, "hidden_channels": glow["hidden_channels"] // 2}})
    bundle = ModelBundle(family="glow", configs={k: v.model_dump(mode="json") for k, v in recorded.items()},
                         modules=build_modules("glow", TINY_MODELS["glow"]), code_version="test")
    run = mlflow.MlflowClient().create_run(experiment)
    register_bundle(bundle, run.info.run_id, name=NAME, alias="champion")
    return uri


@pytest.fixture
def settings(registry: str) -> ServeSettings:
    configure(registry)
    return ServeSettings(models=[f"models:/{NAME}@champion"], token=None, tracking_uri=registry)


def _refusal(call) -> tuple[int, str]:
    with pytest.raises(ApiError) as raised:
        call()
    return raised.value.status, raised.value.code


@pytest.mark.parametrize("uri", [f"models:/{NAME}/7", "models:/flowood-nothing/1"])
def test_unknown_models_and_versions_are_404(settings: ServeSettings, uri: str) -> None:
    # Catches the registry's "not found" being reported as an outage (503) or a bug (500).
    assert _refusal(lambda: load_served_model(uri, settings)) == (404, "unknown_model")


@pytest.mark.parametrize("uri", [f"models:/{NAME}@nope", "models:/flowood-nothing@champion"])
def test_unknown_aliases_are_404(settings: ServeSettings, uri: str) -> None:
    # MLflow reports an unknown alias as INVALID_PARAMETER_VALUE, not RESOURCE_DOES_NOT_EXIST.
    def resolve() -> None:
        with registry_call(uri):
            resolve_version(uri)

    assert _refusal(resolve) == (404, "unknown_model")


@pytest.fixture
def fast_failing_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers: every request times out."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def test_a_registry_that_refuses_connections_is_503(settings: ServeSettings, fast_failing_http: None) -> None:
    configure(f"http://127.0.0.1:{free_port()}")
    assert _refusal(lambda: load_served_model(f"models:/{NAME}/1", settings)) == (503, "registry_unavailable")


def test_a_registry_that_times_out_is_503(settings: ServeSettings, fast_failing_http: None, silent_server: int) -> None:
    configure(f"http://127.0.0.1:{silent_server}")

    def resolve() -> None:
        with registry_call(f"models:/{NAME}@champion"):
            resolve_version(f"models:/{NAME}@champion")

    assert _refusal(resolve) == (503, "registry_unavailable")


def test_a_missing_sqlite_registry_is_503_and_is_not_created(settings: ServeSettings, tmp_path: Path) -> None:
    database = tmp_path / "moved" / "mlflow.db"
    configure(f"sqlite:///{database}")
    # Catches MLflow creating an empty database at a mistyped path and then calling the model unknown (404).
    assert _refusal(lambda: load_served_model(f"models:/{NAME}/1", settings)) == (503, "registry_unavailable")
    assert not database.parent.exists()


def test_a_model_that_fails_to_build_is_a_500_with_the_traceback_logged_only(
    settings: ServeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    # The registry answered and the bundle downloaded: the failure is ours, not the registry's.
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_served_model(f"models:/{NAME}/1", settings)

    app = FastAPI()
    add_error_handlers(app)

    @app.get("/load")
    def load(uri: str) -> dict[str, str]:
        return {"version": load_served_model(uri, settings).version}

    client = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="flowood_ray.cluster.serve_schemas"):
        broken = client.get("/load", params={"uri": f"models:/{NAME}/1"})
    # Catches the old mapping of every load failure to 503 registry_unavailable.
    assert broken.status_code == 500 and broken.json()["error"] == "internal_error"
    assert "size mismatch" not in broken.text and "Traceback" not in broken.text
    logged = [r for r in caplog.records if r.exc_info is not None]
    assert logged and "size mismatch" in caplog.text and "Traceback" in caplog.text

    unknown = client.get("/load", params={"uri": f"models:/{NAME}/7"})
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_model")
