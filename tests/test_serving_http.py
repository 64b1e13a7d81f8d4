"""`polysense serve`: HTTP and WebSocket answers equal Pipeline.predict; every bad request gets its status and
the polysense message; auth, metrics, readiness; a real server process shuts down gracefully on SIGTERM."""

import base64
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

pytest.importorskip("onnxruntime")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

import polysense  # noqa: E402
from benchmarks.hostile import ready  # noqa: E402
from polysense.cli.main import main  # noqa: E402
from polysense.errors import DependencyError  # noqa: E402
from polysense.serving.handler import ServeOptions  # noqa: E402
from polysense.serving.http import create_app  # noqa: E402

KEY = "k" * 32
VOICE = {
    "mean": [-8.0] * 40,
    "spread": [1.0] * 40,
    "frames": 30,
}  # a voice profile, as `polysense voice` writes


@pytest.fixture(scope="module")
def row(test_rows):
    return test_rows[0]


def _client(pipe, **options):
    client = TestClient(create_app(pipe, ServeOptions(**options)))
    client.__enter__()
    assert client.app.state.service.ready.wait(10)
    return client


@pytest.fixture(scope="module")
def client(pipe):
    client = _client(pipe)
    yield client
    client.__exit__(None, None, None)


def _b64(path):
    return base64.b64encode(Path(path).read_bytes()).decode()


def _assert_same(answer, expected):
    assert answer["label"] == expected.label
    got = np.array([answer["probabilities"][k] for k in expected.probabilities])
    np.testing.assert_allclose(got, list(expected.probabilities.values()), atol=1e-5)


def test_json_and_multipart_predictions_equal_pipeline_predict(client, pipe, row):
    expected = pipe.predict(image=row.image, text=row.text, audio=row.audio)
    answer = client.post(
        "/v1/predict", json={"text": row.text, "image": _b64(row.image), "audio": _b64(row.audio)}
    )
    assert answer.status_code == 200
    _assert_same(answer.json(), expected)
    assert answer.json()["modalities"] == ["image", "text", "audio"]
    assert {"queue", "total", "preprocess_image"} <= set(answer.json()["timings_ms"])
    with open(row.image, "rb") as image, open(row.audio, "rb") as audio:
        files = {"image": ("x.jpg", image), "audio": ("x.wav", audio)}
        answer = client.post("/v1/predict", files=files, data={"text": row.text})
    assert answer.status_code == 200
    _assert_same(answer.json(), expected)
    _assert_same(client.post("/v1/predict", json={"text": row.text}).json(), pipe.predict(text=row.text))


def test_predict_batch_answers_each_sample_and_a_bad_one_fails_alone(client, pipe, row):
    samples = [{"text": row.text}, {"image": "not base64!"}, {"image": _b64(row.image)}, {"video": 1}, {}]
    answer = client.post("/v1/predict_batch", json={"samples": samples})
    assert answer.status_code == 200
    got = answer.json()["predictions"]
    _assert_same(got[0], pipe.predict(text=row.text))
    _assert_same(got[2], pipe.predict(image=row.image))
    assert "sample 1: image is not valid base64" in got[1]["error"]
    assert "sample 3: unknown field 'video'" in got[3]["error"]
    assert "no input given" in got[4]["error"] and got[4]["type"] == "InputError"


@pytest.mark.parametrize(
    "request_kwargs, status, message",
    [
        ({"content": b"{", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"json": ["text"]}, 400, "send a JSON object"),
        ({"json": {"text": 3}}, 400, "text must be a string"),
        ({"json": {"audio": "AAAA", "sample_rate": "fast"}}, 400, "sample_rate must be an integer"),
        ({"json": {"audio": "AAAA", "voice": {"mean": [1.0]}}}, 400, "mean, spread and frames"),
        ({"json": {"text": "a", "voice": VOICE}}, 400, "voice was given without audio"),
        ({"json": {"image": base64.b64encode(b"not an image").decode()}}, 400, "image"),
        (
            {"content": b"text=hi", "headers": {"content-type": "text/plain"}},
            415,
            "application/json or multipart",
        ),
        ({"data": {"colour": "red"}, "files": {"image": ("a", b"x")}}, 400, "unknown field 'colour'"),
        (
            {"data": {"voice": "{not json"}, "files": {"audio": ("a", b"x")}},
            400,
            "voice is not a voice profile",
        ),
        ({"files": {"audio": ("a", b"x"), "voice": ("v.json", b"[1, 2]")}}, 400, "mean, spread and frames"),
        (
            {"files": {"audio": ("a", b"x"), "voice": ("v.json", b"[" + b"0," * (1 << 19) + b"0]")}},
            400,
            "too large for a voice profile",
        ),
        (
            {"data": {"voice": "[" + "0," * (1 << 19) + "0]"}, "files": {"audio": ("a", b"x")}},
            400,
            "too large",
        ),
        (
            {"json": {"audio": "AAAA", "voice": {**VOICE, "mean": [10**400]}}},
            400,
            "mean and spread must be lists of numbers",
        ),
        ({"json": {"audio": "AAAA", "voice": {**VOICE, "mean": [0.0] * 5000}}}, 400, "at most 4096 bands"),
        ({"data": {"image": "not a file"}, "files": {"audio": ("a", b"x")}}, 400, "must be a file part"),
        (
            {
                "content": b'{"text": "a", "sample_rate": ' + b"1" * 5000 + b"}",
                "headers": {"content-type": "application/json"},
            },
            400,
            "not valid JSON",
        ),
        (
            {"data": {"sample_rate": "\u00b2"}, "files": {"audio": ("a", b"x")}},
            400,
            "sample_rate must be an integer",
        ),
    ],
)
def test_bad_requests_get_their_status_and_the_polysense_message(client, request_kwargs, status, message):
    answer = client.post("/v1/predict", **request_kwargs)
    assert answer.status_code == status
    assert message in answer.json()["error"]


def test_bodies_and_inputs_over_the_limits_get_413(pipe, bundle, row):
    client = _client(pipe, max_body_bytes=4096, max_batch_samples=2)
    try:
        answer = client.post("/v1/predict", json={"text": "x" * 5000})
        assert answer.status_code == 413  # the limit as the operator sets it (issue 43: max_body_bytes=4,096)
        assert (
            "over this server's limit of 4,096 bytes (polysense serve --max-body-mb 0.00390625)"
            in (answer.json()["error"])
        )
        answer = client.post("/v1/predict_batch", json={"samples": [{"text": "a"}] * 3})
        assert answer.status_code == 413 and "--max-batch-samples" in answer.json()["error"]
    finally:
        client.__exit__(None, None, None)
    small = polysense.Pipeline.load(bundle, device="cpu", limits=polysense.Limits(max_image_pixels=100))
    client = _client(small)
    try:
        answer = client.post("/v1/predict", json={"image": _b64(row.image)})
        assert answer.status_code == 413 and "max_image_pixels" in answer.json()["error"]
    finally:
        client.__exit__(None, None, None)


def test_the_api_key_guards_v1_and_metrics_but_not_health(pipe):
    client = _client(pipe, api_key=KEY)
    try:
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        for path in ("/v1/info", "/metrics"):
            answer = client.get(path)
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        answer = client.post("/v1/predict", json={"text": "hi"}, headers={"Authorization": f"Bearer {KEY}"})
        assert answer.status_code == 200
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/v1/stream") as ws:
            ws.receive_json()
        assert refused.value.code == 1008  # after the handshake, so the client sees why
    finally:
        client.__exit__(None, None, None)


def test_info_metrics_and_readiness(client, pipe):
    info = client.get("/v1/info").json()
    assert info["labels"] == list(pipe.labels) and info["modalities"] == list(pipe.modalities)
    assert set(info["precisions"]) == set(pipe.description.components)
    client.post("/v1/predict", json={"text": "counted"})
    client.post("/v1/predict", json={})
    metrics = client.get("/metrics").text
    assert 'polysense_requests_total{code="200",endpoint="predict"}' in metrics
    assert 'polysense_errors_total{type="InputError"}' in metrics
    for name in ("polysense_request_seconds_bucket", "polysense_batch_size_bucket", "polysense_queue_depth"):
        assert name in metrics
    service = client.app.state.service
    service.ready.clear()
    try:
        assert client.get("/readyz").status_code == 503
        answer = client.post("/v1/predict", json={"text": "too early"})
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    finally:
        service.ready.set()


def test_a_full_server_answers_503_with_retry_after_at_once(client):
    service = client.app.state.service
    service.inflight = service.options.max_queue  # as if max_queue requests were in flight
    try:
        answer = client.post("/v1/predict", json={"text": "one too many"})
    finally:
        service.inflight = 0
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert "max_queue" in answer.json()["error"]


def test_a_request_takes_its_place_once_its_body_is_in(client):
    """The place in the queue is taken after the body has arrived: a queue that filled up while the body was
    arriving answers 503 with Retry-After then, and the place count is as before afterwards."""
    service = client.app.state.service

    def body_while_the_queue_fills():
        assert service.inflight == 0  # the body is being read: no place is held for it yet
        service.inflight = service.options.max_queue  # as if the queue filled meanwhile
        yield json.dumps({"text": "ready too late"}).encode()

    try:
        answer = client.post(
            "/v1/predict", content=body_while_the_queue_fills(), headers={"content-type": "application/json"}
        )
        assert service.inflight == service.options.max_queue  # this request took no place and gave none back
    finally:
        service.inflight = 0
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert "max_queue" in answer.json()["error"]
    assert client.post("/v1/predict", json={"text": "ready"}).status_code == 200
    assert service.inflight == 0


def test_admission_refuses_a_request_whose_expected_wait_is_over_max_queue_delay_ms(pipe):
    """With the service time known (1 ms a sample), 8 in flight is 8 ms of work ahead: over a 5 ms limit, 503
    at once while the server is overloaded; under 8 in flight nothing is refused for its wait (normal
    concurrency is served as before); at 0.5 ms a sample, when requests do not arrive faster than they leave
    (clients waiting for their answers, a burst into an idle server), or with the limit off, 8 in flight are
    admitted."""
    from polysense.serving.service import ADMIT_ALWAYS_BELOW

    assert ADMIT_ALWAYS_BELOW == 8
    client = _client(pipe, max_queue_delay_ms=5)
    service = client.app.state.service
    service.clock = lambda: 1000.0
    service.overload.overloaded, service.overload.window_end = True, 1000.1  # within an overloaded window

    def status(inflight: int, per_sample_s: float) -> httpx.Response:
        service.inflight, service.service_time.per_sample_s = inflight, per_sample_s
        try:
            return client.post("/v1/predict", json={"text": "how long would I wait"})
        finally:
            service.inflight = 0

    try:
        assert status(7, 0.001).status_code == 200  # 7 ms ahead, but fewer than 8 in flight
        refused = status(8, 0.001)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "max_queue_delay_ms=5" in refused.json()["error"] and "8.0 ms" in refused.json()["error"]
        assert status(8, 0.0005).status_code == 200  # 4 ms ahead
        assert status(100, 0.0).status_code == 200  # nothing measured yet: only max_queue bounds the queue
        service.overload.overloaded = False  # requests arrive no faster than they leave
        assert status(8, 0.001).status_code == 200
    finally:
        client.__exit__(None, None, None)
    off = _client(pipe, max_queue_delay_ms=0)
    try:
        off.app.state.service.inflight, off.app.state.service.service_time.per_sample_s = 100, 0.1
        assert off.post("/v1/predict", json={"text": "no time limit"}).status_code == 200
    finally:
        off.app.state.service.inflight = 0
        off.__exit__(None, None, None)


def test_the_service_time_is_measured_from_departures_while_busy(pipe):
    """Busy time per sample: from admission, or from the previous departure if that came later."""
    import asyncio
    import contextlib

    from polysense.serving.service import Service

    service = Service(pipe, ServeOptions())
    service.ready.set()
    now = [10.0]
    service.clock = lambda: now[0]
    alpha = service.service_time.alpha

    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            first = contextlib.AsyncExitStack()
            await first.enter_async_context(service.admit())  # at 10
            await stack.enter_async_context(service.admit(4))  # at 10 too: 4 samples of a predict_batch
            now[0] = 12.0
            await first.aclose()  # busy 10-12 on 1 sample
            assert service.service_time.per_sample_s == pytest.approx(2.0)
            now[0] = 14.0  # the batch leaves: busy 12-14 on 4 samples, 0.5 s each
        expected = 2.0 + alpha * (0.5 - 2.0)
        assert service.service_time.per_sample_s == pytest.approx(expected)
        now[0] = 100.0  # idle since 14
        async with service.admit():
            now[0] = 100.3  # busy 100-100.3 (not 14-100.3)
        assert service.service_time.per_sample_s == pytest.approx(expected + alpha * (0.3 - expected))

    try:
        asyncio.run(scenario())
        assert service.inflight == 0 and service.accepted == service.answered == 3
    finally:
        service.close()


@pytest.mark.parametrize("value", [-1, 600_001])
def test_max_queue_delay_ms_is_checked(value):
    with pytest.raises(polysense.errors.ConfigError, match="max_queue_delay_ms"):
        ServeOptions(max_queue_delay_ms=value)


def test_a_caller_without_the_key_gets_401_before_any_queue_state(pipe):
    client = _client(pipe, api_key=KEY)
    service = client.app.state.service
    service.inflight = service.options.max_queue  # as if max_queue requests were in flight
    try:
        for path in ("/v1/predict", "/v1/predict_batch"):
            answer = client.post(path, json={"text": "no key"})
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
            assert "retry-after" not in answer.headers and "max_queue" not in answer.text
            assert answer.json()["type"] == "Unauthorized"
        answer = client.post("/v1/predict", json={"text": "a"}, headers={"Authorization": f"Bearer {KEY}"})
        assert answer.status_code == 503  # with the key: the queue's state
    finally:
        service.inflight = 0
        client.__exit__(None, None, None)


def test_unknown_paths_and_wrong_methods_are_answered_in_json(client):
    answer = client.get("/v1/nothing-here")
    assert answer.status_code == 404 and answer.headers["content-type"] == "application/json"
    assert answer.json()["type"] == "NotFound" and "/v1/nothing-here" in answer.json()["error"]
    answer = client.get("/v1/predict")
    assert answer.status_code == 405 and answer.json()["type"] == "MethodNotAllowed"
    assert "POST" in answer.json()["error"] and "POST" in answer.headers["allow"]


def _wide_png(width: int) -> bytes:
    """A real PNG of width x 1 pixels (a few KB): hostile, within max_image_pixels by its count alone."""
    import cv2

    ok, encoded = cv2.imencode(".png", np.zeros((1, width, 3), np.uint8))
    assert ok
    return encoded.tobytes()


def test_predict_batch_fails_only_the_sample_whose_decoding_raises(client, pipe, row):
    good = {"text": row.text, "image": _b64(row.image)}
    hostile = {"text": row.text, "image": base64.b64encode(_wide_png(1_000_000)).decode()}
    answer = client.post("/v1/predict_batch", json={"samples": [good, hostile, good]})
    assert answer.status_code == 200
    first, bad, last = answer.json()["predictions"]
    expected = pipe.predict(image=row.image, text=row.text)
    _assert_same(first, expected)
    _assert_same(last, expected)
    # whatever the library makes of it (an InputError, or a prediction once it crops before upscaling), the
    # hostile sample answers for itself only
    assert "error" in bad or "label" in bad


def test_multipart_files_are_held_in_memory_never_spooled_to_disk(client, pipe, monkeypatch):
    import tempfile

    def no_disk(*args, **kwargs):
        raise AssertionError("a multipart part was spooled to a temporary file")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_disk)  # what a SpooledTemporaryFile rolls over into
    text = "a calm square " * 150_000  # 2.1 MB: over the 1 MB python-multipart spools by default
    answer = client.post("/v1/predict", files={"text": ("text.txt", text.encode())})
    assert answer.status_code == 200, answer.text
    _assert_same(answer.json(), pipe.predict(text=text))


def test_websocket_stream_final_equals_offline_prediction(client, pipe, row):
    samples, rate = soundfile.read(row.audio, dtype="int16")
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_json({"sample_rate": rate, "format": "s16le", "text": row.text})
        assert ws.receive_json()["type"] == "ready"
        partials = 0
        for start in range(0, samples.size, 700):
            ws.send_bytes(samples[start : start + 700].tobytes())
            message = ws.receive_json()
            assert message["type"] == "partial"
            partials += 1
        ws.send_json({"type": "end"})
        final = ws.receive_json()
    assert final["type"] == "final" and partials > 1
    assert final["audio_seconds"] == pytest.approx(samples.size / rate)
    _assert_same(final, pipe.predict(audio=row.audio, text=row.text))


def test_a_binary_first_stream_message_gets_an_error_not_a_crash(client):
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_bytes(b'{"sample_rate": 16000}')
        error = ws.receive_json()
        assert error["type"] == "InputError" and "start the stream with a text message" in error["error"]
        with pytest.raises(WebSocketDisconnect):
            ws.receive_json()


def test_many_websocket_streams_at_once_each_equal_offline(client, pipe, test_rows):
    from concurrent.futures import ThreadPoolExecutor

    rows = test_rows[:6]
    encoder = client.app.state.service.streams
    encoded_before = encoder.streams_encoded

    def stream(row):
        samples, rate = soundfile.read(row.audio, dtype="float32")
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_json({"sample_rate": rate, "format": "f32le"})
            assert ws.receive_json()["type"] == "ready"
            for start in range(0, samples.size, 1200):
                ws.send_bytes(samples[start : start + 1200].astype("<f4").tobytes())
                assert ws.receive_json()["type"] == "partial"
            ws.send_json({"type": "end"})
            return ws.receive_json()

    with ThreadPoolExecutor(len(rows)) as pool:
        finals = list(pool.map(stream, rows))
    for row, final in zip(rows, finals):
        _assert_same(final, pipe.predict(audio=row.audio))
    assert encoder.streams_encoded > encoded_before


@pytest.mark.parametrize(
    "start, chunk, message",
    [
        ({"format": "s16le"}, None, "sample_rate"),
        ({"sample_rate": 16000, "format": "mp3"}, None, "format 'mp3' is unknown"),
        ({"sample_rate": 3, "format": "s16le"}, None, "limit min_sample_rate"),
        ({"sample_rate": 16000, "format": "s16le"}, b"\x00\x01\x02", "not whole 2-byte samples"),
        ({"sample_rate": 16000, "voice": VOICE}, None, "trained without --voice-norm"),
        ({"sample_rate": 16000, "voice": {"mean": "x"}}, None, "mean, spread and frames"),
        ({"sample_rate": 16000, "format": "f32le"}, np.full(8, np.nan, np.float32).tobytes(), "NaN"),
    ],
)
def test_bad_stream_messages_get_an_error_and_a_close(client, start, chunk, message):
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_json(start)
        if chunk is not None:
            assert ws.receive_json()["type"] == "ready"
            ws.send_bytes(chunk)
        error = ws.receive_json()
        assert error["type"] != "partial" and message in error["error"]
        with pytest.raises(WebSocketDisconnect):
            ws.receive_json()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(bundle):
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "polysense.cli.main",
        "serve",
        str(bundle),
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        if not ready(port, within_s=60):
            pytest.fail("the server did not become ready")
        answered, failed, stop = [], [], threading.Event()

        def load():
            with httpx.Client(timeout=10) as http:
                while not stop.is_set():
                    try:
                        answer = http.post(f"{url}/v1/predict", json={"text": "a calm square"})
                    except httpx.TransportError:
                        return  # refused or closed before it was accepted: the server had stopped accepting
                    (answered if answer.status_code == 200 else failed).append(answer.status_code)

        clients = [threading.Thread(target=load) for _ in range(8)]
        for thread in clients:
            thread.start()
        time.sleep(1.0)
        sent = time.monotonic()
        server.send_signal(signal.SIGTERM)
        code = server.wait(10)
        took = time.monotonic() - sent
        stop.set()
        for thread in clients:
            thread.join(10)
    finally:
        if server.poll() is None:
            server.kill()
    assert code == 0 and took < 10
    assert len(answered) > 50 and failed == []


def test_serve_cli_errors_are_one_line(tmp_path, bundle, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert main(["serve", str(bundle), "--port", "0"]) == 2
    assert main(["serve", str(bundle), "--api-key", "short"]) == 2
    assert main(["serve", str(bundle), "--max-batch", "0"]) == 2
    assert main(["serve", str(bundle), "--max-queue", "8", "--max-batch-samples", "9"]) == 2
    assert main(["serve", str(bundle), "--max-body-mb", "nan"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 6 and all(line.startswith("error: ") for line in lines)
    assert "16 characters" in lines[2] and "max_batch" in lines[3] and "over max_queue" in lines[4]


def test_serve_without_its_packages_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_starlette(name, *args, **kwargs):
        if name.startswith("starlette"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "polysense.serving.http", raising=False)
    monkeypatch.setattr(builtins, "__import__", without_starlette)
    with pytest.raises(DependencyError, match=r"polysense\[serve\]"):
        import polysense.serving.http  # noqa: F401


def test_the_load_benchmark_runs_in_quick_mode(bundle, tmp_path):
    pytest.importorskip("matplotlib")
    import json
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "serving.py"
    command = [sys.executable, str(script), "--bundle", str(bundle), "--quick", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    report = json.loads((tmp_path / "serving.json").read_text())
    assert [r["clients"] for r in report["closed"]["batched"]] == [1, 32]
    for rows in report["closed"].values():
        assert all(r["answered_200"] > 0 and r["errors"] == 0 for r in rows)
    assert report["overload"]["alive_after"] and report["overload"]["errors"] == 0
    assert report["soak"]["errors"] == 0 and len(report["soak"]["rss_mb"]) >= 2
    stop = report["sigterm"]
    assert stop["exit_code"] == 0 and set(stop["statuses"]) == {"200"}
    assert stop["server_accepted"] == stop["server_answered"] > 0
    assert {t["target"].split(" ")[0] for t in report["targets"]} >= {"32", "soak:", "overload:", "SIGTERM:"}
    assert isinstance(report["machine"]["isa"], list)  # the CPU's instruction sets travel with the numbers
    assert (tmp_path / "serving.md").read_text().startswith("# polysense serve under load")
    assert (tmp_path / "serving.png").stat().st_size > 1000


def test_an_ensemble_is_served_as_one_bundle_is(pipe, other_bundle, row):
    other = polysense.Pipeline.load(other_bundle, device="cpu", precision="fp32")
    ensemble = polysense.Ensemble([pipe, other])
    client = _client(ensemble)
    try:
        info = client.get("/v1/info").json()
        assert info["members"] == 2 and info["labels"] == list(pipe.labels)
        assert [set(p) for p in info["precisions"]] == [set(pipe.description.components)] * 2
        answer = client.post("/v1/predict", json={"text": row.text, "image": _b64(row.image)})
        assert answer.status_code == 200
        _assert_same(answer.json(), ensemble.predict(text=row.text, image=row.image))
        batch = client.post(
            "/v1/predict_batch", json={"samples": [{"text": row.text}, {"text": "a calm morning"}]}
        )
        assert batch.status_code == 200
        _assert_same(batch.json()["predictions"][0], ensemble.predict(text=row.text))
        samples, rate = soundfile.read(row.audio, dtype="int16")
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_json({"sample_rate": rate, "format": "s16le", "text": row.text})
            assert ws.receive_json()["type"] == "ready"
            for start in range(0, samples.size, 700):
                ws.send_bytes(samples[start : start + 700].tobytes())
                assert ws.receive_json()["type"] == "partial"
            ws.send_json({"type": "end"})
            final = ws.receive_json()
        assert final["type"] == "final"
        _assert_same(final, ensemble.predict(audio=row.audio, text=row.text))
    finally:
        client.__exit__(None, None, None)


def test_serve_takes_several_bundles_as_an_ensemble_but_not_on_ray(bundle, other_bundle, capsys):
    assert main(["serve", str(bundle), str(other_bundle), "--ray"]) == 2
    assert main(["serve", str(bundle), str(other_bundle), "--write-config", "x.yaml"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        lines == ["error: Ray Serve deploys one bundle; serve an ensemble without --ray/--write-config"] * 2
    )
