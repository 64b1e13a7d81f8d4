"""`polysense serve --ray`: a local Ray with 2 replicas runs the uvicorn server's own app, so every endpoint
answers as that app does in process (the same statuses, headers and JSON bodies; probabilities within 1e-5 at
fp32): predictions of every modality subset, multipart, batches with a bad sample, info, health, metrics, the
errors, and the /v1/stream WebSocket through Ray's proxy; both replicas answer; the config file for `serve
deploy` is what Ray's own schema reads; bad Ray options are one `error:` line."""

import base64
import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
yaml = pytest.importorskip("yaml")
psutil = pytest.importorskip("psutil")
soundfile = pytest.importorskip("soundfile")
ws_client = pytest.importorskip("websockets.sync.client")
from starlette.testclient import TestClient  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from polysense.cli.main import main  # noqa: E402
from polysense.errors import BundleError, ConfigError, DependencyError  # noqa: E402
from polysense.serving.handler import ServeOptions  # noqa: E402
from polysense.serving.http import create_app  # noqa: E402
from polysense.serving.ray_app import (  # noqa: E402
    IMPORT_PATH,
    RayOptions,
    app_builder,
    build_app,
    deploy,
    write_config,
)
from polysense.serving.ray_replica import REPLICA_HEADER  # noqa: E402

pytestmark = pytest.mark.slow  # starts Ray

KEY = "k" * 32
AUTH = {"Authorization": f"Bearer {KEY}"}
OPTIONS = ServeOptions(max_batch=8, max_wait_ms=5, max_batch_samples=4, api_key=KEY)
TIMEOUT_S = 30  # any one request or WebSocket message; the replicas answer in well under a second


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ray_processes() -> list:
    """Ray's processes this test started (GCS, raylet, workers, ...) still alive."""
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "ray" in " ".join(child.cmdline()):
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture(scope="module")
def rows(test_rows):
    return test_rows[:3]


@pytest.fixture(scope="module")
def url(bundle):
    """The bundle on a local Ray: 2 replicas of half a CPU each, an API key, fp32 for exact comparisons."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        options = RayOptions(
            bundle=str(bundle),
            device="cpu",
            precision="fp32",
            threads=1,
            replicas=2,
            cpus_per_replica=0.5,
            port=_free_port(),
        )
        yield deploy(options, OPTIONS, block=False)
    finally:
        serve.shutdown()
        ray.shutdown()
        deadline = time.monotonic() + 15
        while _ray_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _ray_processes(), f"Ray left processes behind: {_ray_processes()}"


@pytest.fixture(scope="module")
def local(pipe):
    """The app `polysense serve` runs on uvicorn, with the same options, in process: what Ray must answer."""
    with TestClient(create_app(pipe, OPTIONS)) as client:
        assert client.app.state.service.ready.wait(10)
        yield client


def _b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def _assert_same(answer: dict, expected) -> None:
    assert answer["label"] == expected.label
    got = np.array([answer["probabilities"][k] for k in expected.probabilities])
    np.testing.assert_allclose(got, list(expected.probabilities.values()), atol=1e-5)


def _assert_same_json(got, expected, where: str = "answer") -> None:
    """Equal JSON, numbers within 1e-5 (model runs batched differently), timings aside (they vary)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict), where
        got, expected = ({k: v for k, v in d.items() if k != "timings_ms"} for d in (got, expected))
        assert got.keys() == expected.keys(), where
        for key in expected:
            _assert_same_json(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for index, (a, b) in enumerate(zip(got, expected)):
            _assert_same_json(a, b, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-5), where
    else:
        assert got == expected, where


def _assert_same_answer(got, expected, what: str) -> None:
    """Ray's answer `got` (httpx) is the in-process app's `expected`: status, headers that matter, body."""
    assert got.status_code == expected.status_code, f"{what}: {got.text}"
    for header in ("content-type", "www-authenticate", "retry-after", "allow"):
        assert got.headers.get(header) == expected.headers.get(header), f"{what}: {header}"
    if expected.headers.get("content-type") == "application/json":
        _assert_same_json(got.json(), expected.json(), what)
    else:
        assert got.text == expected.text, what


def _post(url: str, path: str, body: dict, headers: dict = AUTH) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers, timeout=TIMEOUT_S)


def test_predictions_equal_the_uvicorn_apps_for_every_subset_sent_concurrently(url, local, pipe, rows):
    cases = []
    for row in rows:
        cases += [
            ({"text": row.text}, {"text": row.text}),
            ({"image": _b64(row.image)}, {"image": row.image}),
            ({"text": row.text, "image": _b64(row.image)}, {"text": row.text, "image": row.image}),
            (
                {"text": row.text, "image": _b64(row.image), "audio": _b64(row.audio)},
                {"text": row.text, "image": row.image, "audio": row.audio},
            ),
        ]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda case: _post(url, "/v1/predict", case[0]), cases))
    for answer, (body, sample) in zip(answers, cases):
        _assert_same_answer(answer, local.post("/v1/predict", json=body, headers=AUTH), str(sorted(sample)))
        _assert_same(answer.json(), pipe.predict(**sample))
        assert answer.json()["modalities"] == [m for m in ("image", "text", "audio") if m in sample]


def test_both_replicas_answer(url, rows):
    seen = set()
    with ThreadPoolExecutor(4) as pool:
        for _ in range(10):
            bodies = [{"text": f"{rows[0].text} {i}"} for i in range(8)]
            answers = pool.map(lambda body: _post(url, "/v1/predict", body), bodies)
            seen |= {a.headers[REPLICA_HEADER] for a in answers}
            if len(seen) == 2:
                break
    assert len(seen) == 2


def _requests(row) -> dict:
    """(method, path, httpx keyword arguments) of requests that must be answered as on uvicorn."""
    bad = {"image": base64.b64encode(b"not an image").decode()}
    batch = [{"text": row.text}, bad, {"image": _b64(row.image)}, {"text": 3}]
    broken = {"headers": {**AUTH, "Content-Type": "application/json"}, "content": b"{"}
    return {
        "info": ("GET", "/v1/info", {"headers": AUTH}),
        "healthz without a key": ("GET", "/healthz", {}),
        "readyz without a key": ("GET", "/readyz", {}),
        "a bad image": ("POST", "/v1/predict", {"headers": AUTH, "json": bad}),
        "a batch with bad samples": (
            "POST",
            "/v1/predict_batch",
            {"headers": AUTH, "json": {"samples": batch}},
        ),
        "too many samples": ("POST", "/v1/predict_batch", {"headers": AUTH, "json": {"samples": batch * 2}}),
        "multipart": (
            "POST",
            "/v1/predict",
            {
                "headers": AUTH,
                "files": {"image": ("x.jpg", Path(row.image).read_bytes())},
                "data": {"text": row.text},
            },
        ),
        "a multipart batch": (
            "POST",
            "/v1/predict_batch",
            {"headers": AUTH, "files": {"image": ("x.jpg", b"..")}},
        ),
        "broken JSON": ("POST", "/v1/predict", broken),
        "plain text": (
            "POST",
            "/v1/predict",
            {"headers": {**AUTH, "Content-Type": "text/plain"}, "content": b"hi"},
        ),
        "no sample": ("POST", "/v1/predict", {"headers": AUTH, "json": {}}),
        "a wrong key": (
            "POST",
            "/v1/predict",
            {"headers": {"Authorization": "Bearer wrong"}, "json": {"text": "x"}},
        ),
        "info without a key": ("GET", "/v1/info", {}),
        "metrics without a key": ("GET", "/metrics", {}),
        "a wrong method": ("GET", "/v1/predict", {"headers": AUTH}),
        "no such path": ("GET", "/v2/predict", {"headers": AUTH}),
    }


def test_every_endpoint_and_error_answers_as_on_uvicorn(url, local, rows):
    for what, (method, path, kwargs) in _requests(rows[0]).items():
        got = httpx.request(method, url + path, timeout=TIMEOUT_S, **kwargs)
        _assert_same_answer(got, local.request(method, path, **kwargs), what)
    # Each replica counts what it answered, and Ray routes a scrape to either: scraped until one shows the
    # predictions it answered (Ray's router may have sent every 200 to the other replica).
    for _ in range(20):
        metrics = httpx.get(url + "/metrics", headers=AUTH, timeout=TIMEOUT_S)
        assert metrics.status_code == 200
        assert metrics.headers["content-type"] == local.get("/metrics", headers=AUTH).headers["content-type"]
        if 'polysense_requests_total{code="200",endpoint="predict"}' in metrics.text:
            break
    else:
        raise AssertionError(f"no replica's /metrics counted the answered predictions:\n{metrics.text}")


def _ws_url(url: str) -> str:
    return url.replace("http://", "ws://", 1) + "/v1/stream"


def _stream_over_ray(url: str, start: dict, chunks: list[bytes]) -> list[dict]:
    """Every message Ray's proxy relays for one stream, the close code last ({"close": code})."""
    messages = []
    with ws_client.connect(_ws_url(url), additional_headers=AUTH, open_timeout=TIMEOUT_S) as ws:
        try:
            ws.send(json.dumps(start))
            messages.append(json.loads(ws.recv(TIMEOUT_S)))
            for chunk in chunks:
                ws.send(chunk)
                messages.append(json.loads(ws.recv(TIMEOUT_S)))
            ws.send(json.dumps({"type": "end"}))
            while True:
                messages.append(json.loads(ws.recv(TIMEOUT_S)))
        except ConnectionClosed:
            pass
        messages.append({"close": ws.close_code})
    return messages


def _stream_in_process(local: TestClient, start: dict, chunks: list[bytes]) -> list[dict]:
    messages = []
    with local.websocket_connect("/v1/stream", headers=dict(AUTH)) as ws:  # a copy: it adds its headers
        try:
            ws.send_json(start)
            messages.append(ws.receive_json())
            for chunk in chunks:
                ws.send_bytes(chunk)
                messages.append(ws.receive_json())
            ws.send_json({"type": "end"})
            while True:
                messages.append(ws.receive_json())
        except WebSocketDisconnect as closed:
            messages.append({"close": closed.code})
    return messages


def test_the_websocket_stream_answers_as_on_uvicorn(url, local, pipe, rows):
    row = rows[0]
    samples, rate = soundfile.read(row.audio, dtype="int16")
    chunks = [samples[i : i + 700].tobytes() for i in range(0, samples.size, 700)]
    start = {"sample_rate": rate, "format": "s16le", "text": row.text}
    got = _stream_over_ray(url, start, chunks)
    _assert_same_json(got, _stream_in_process(local, start, chunks), "stream")
    assert [m.get("type") for m in got] == ["ready", *["partial"] * len(chunks), "final", None]
    assert got[-1] == {"close": 1000}
    _assert_same(got[-2], pipe.predict(audio=row.audio, text=row.text))
    bad_start = {"sample_rate": "fast"}
    _assert_same_json(_stream_over_ray(url, bad_start, []), _stream_in_process(local, bad_start, []), "bad")
    with ws_client.connect(_ws_url(url), open_timeout=TIMEOUT_S) as ws:  # no key: closed after the handshake
        with pytest.raises(ConnectionClosed):
            ws.recv(TIMEOUT_S)
        assert ws.close_code == 1008


def test_a_replica_builds_the_uvicorn_app_at_startup_and_ships_only_its_arguments(
    monkeypatch, bundle, local, rows
):
    """Without Ray: what Ray pickles into the deployment holds no Pipeline, and the app it builds at lifespan
    startup answers as the uvicorn app does, naming its replica; a replica without its API key fails to start."""
    import pickle

    from polysense.serving import ray_replica

    monkeypatch.setattr(ray_replica, "_replica_id", lambda: "replica-1")
    options = {"max_batch": 8, "max_wait_ms": 5, "max_batch_samples": 4, "api_key": KEY}
    app = ray_replica.ReplicaApp(str(bundle), "cpu", "fp32", 1, options)
    shipped = pickle.dumps(app)
    assert len(shipped) < 2000  # the arguments, not a model
    with TestClient(pickle.loads(shipped)) as replica:
        for what, (method, path, kwargs) in _requests(rows[0]).items():
            got = replica.request(method, path, **kwargs)
            _assert_same_answer(got, local.request(method, path, **kwargs), what)
            assert got.headers[REPLICA_HEADER] == "replica-1"
    monkeypatch.delenv("NO_SUCH_KEY_VARIABLE", raising=False)
    keyless = ray_replica.ReplicaApp(str(bundle), options={}, api_key_env="NO_SUCH_KEY_VARIABLE")
    with pytest.raises(ConfigError, match=r"\$NO_SUCH_KEY_VARIABLE is not set"), TestClient(keyless):
        pass


def test_the_config_file_is_what_serve_deploy_reads(tmp_path, bundle):
    from ray.serve.schema import ServeDeploySchema

    path = tmp_path / "serve.yaml"
    options = RayOptions(bundle=str(bundle), min_replicas=1, max_replicas=4, host="0.0.0.0", port=8123)
    write_config(options, ServeOptions(max_batch=16, api_key=KEY), str(path))
    text = path.read_text()
    assert KEY not in text  # the key stays out of the file: replicas read $POLYSENSE_API_KEY
    config = yaml.safe_load(text)
    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    validate(config)  # Ray's own check of a `serve deploy` file
    assert config["http_options"]["host"] == "0.0.0.0" and config["http_options"]["port"] == 8123
    (app,) = config["applications"]
    assert app["import_path"] == IMPORT_PATH and app["route_prefix"] == "/"
    assert app["args"]["bundle"] == str(bundle) and app["args"]["max_batch"] == 16
    assert app["args"]["api_key_env"] == "POLYSENSE_API_KEY"
    (deployment,) = app["deployments"]
    assert deployment["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in deployment
    assert deployment["ray_actor_options"] == {"num_cpus": 1.0}
    # args as `serve run IMPORT_PATH key=value` gives them (strings) build the same application
    assert isinstance(app_builder({k: str(v) for k, v in app["args"].items()}), serve.Application)
    with pytest.raises(ConfigError, match="unknown argument 'replica'"):
        app_builder({"bundle": str(bundle), "replica": 2})


def test_cli_writes_a_config_and_refuses_bad_ray_options(tmp_path, bundle, capsys):
    path = tmp_path / "x.yaml"
    assert main(["serve", str(bundle), "--write-config", str(path), "--replicas", "3"]) == 0
    assert f"serve deploy {path}" in capsys.readouterr().out
    deployment = yaml.safe_load(path.read_text())["applications"][0]["deployments"][0]
    assert deployment["num_replicas"] == 3
    for flags in (
        ["--replicas", "0"],
        ["--min-replicas", "1"],
        ["--min-replicas", "3", "--max-replicas", "2"],
    ):
        assert main(["serve", str(bundle), "--ray", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert main(["serve", str(bundle), "--write-config", str(tmp_path / "no" / "x.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot write")


def test_without_ray_the_error_names_the_extra(monkeypatch, bundle, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(DependencyError, match=r"pip install 'polysense\[ray\]'"):
        build_app(RayOptions(bundle=str(bundle)), ServeOptions())
    with pytest.raises(BundleError, match="not a polysense bundle"):
        deploy(RayOptions(bundle=str(tmp_path)), ServeOptions(), block=False)  # before Ray is imported
