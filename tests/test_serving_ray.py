"""`polysense serve --ray`: a local Ray with 2 replicas answers as Pipeline.predict does (label, probabilities
within 1e-5 at fp32), over the Starlette server's JSON; a bad sample fails alone; both replicas answer; the
config file for `serve deploy` is what Ray's own schema reads; bad Ray options are one `error:` line."""

import base64
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("starlette")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
yaml = pytest.importorskip("yaml")
psutil = pytest.importorskip("psutil")

import polysense  # noqa: E402
from polysense.cli.main import main  # noqa: E402
from polysense.errors import BundleError, ConfigError, DependencyError  # noqa: E402
from polysense.serving.handler import ServeOptions  # noqa: E402
from polysense.serving.ray_app import (  # noqa: E402
    IMPORT_PATH,
    RayOptions,
    app_builder,
    build_app,
    deploy,
    write_config,
)
from polysense.serving.ray_replica import REPLICA_HEADER  # noqa: E402

KEY = "k" * 32
AUTH = {"Authorization": f"Bearer {KEY}"}


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
        yield deploy(options, ServeOptions(max_batch=8, max_wait_ms=5, api_key=KEY), block=False)
    finally:
        serve.shutdown()
        ray.shutdown()
        deadline = time.monotonic() + 15
        while _ray_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _ray_processes(), f"Ray left processes behind: {_ray_processes()}"


def _b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def _assert_same(answer: dict, expected) -> None:
    assert answer["label"] == expected.label
    got = np.array([answer["probabilities"][k] for k in expected.probabilities])
    np.testing.assert_allclose(got, list(expected.probabilities.values()), atol=1e-5)


def _post(url: str, path: str, body: dict, headers: dict = AUTH) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers, timeout=30)


def test_answers_equal_pipeline_predict_for_every_subset_sent_concurrently(url, pipe, rows):
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
    for answer, (_, sample) in zip(answers, cases):
        assert answer.status_code == 200, answer.text
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


def test_a_bad_sample_fails_alone_with_the_polysense_message(url, pipe, rows):
    row = rows[0]
    with pytest.raises(polysense.InputError) as expected:
        pipe.prepare({"image": b"not an image"})
    bad = {"image": base64.b64encode(b"not an image").decode()}
    answer = _post(url, "/v1/predict", bad)
    assert answer.status_code == 400
    assert answer.json() == {"error": str(expected.value), "type": type(expected.value).__name__}

    samples = [{"text": row.text}, bad, {"image": _b64(row.image)}, {"text": 3}]
    answer = _post(url, "/v1/predict_batch", {"samples": samples})
    assert answer.status_code == 200
    got = answer.json()["predictions"]
    _assert_same(got[0], pipe.predict(text=row.text))
    assert got[1]["error"] == str(expected.value)
    _assert_same(got[2], pipe.predict(image=row.image))
    assert got[3] == {"error": "sample 3: text must be a string", "type": "InputError"}


def test_other_endpoints_auth_and_refusals(url, pipe):
    info = httpx.get(url + "/v1/info", headers=AUTH).json()
    assert info["labels"] == list(pipe.labels) and info["max_batch"] == 8
    assert httpx.get(url + "/healthz").json() == {"status": "alive"}  # no key needed
    assert httpx.get(url + "/readyz").status_code == 200
    refused = _post(url, "/v1/predict", {"text": "x"}, headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/v1/info").status_code == 401
    assert httpx.get(url + "/v1/predict", headers=AUTH).status_code == 405
    assert httpx.get(url + "/metrics", headers=AUTH).status_code == 404
    multipart = httpx.post(url + "/v1/predict", headers=AUTH, files={"image": ("x.jpg", b"..")})
    assert multipart.status_code == 415 and "multipart" in multipart.json()["error"]
    broken = httpx.post(
        url + "/v1/predict", headers={**AUTH, "Content-Type": "application/json"}, content=b"{"
    )
    assert broken.status_code == 400 and broken.json()["type"] == "InputError"


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
