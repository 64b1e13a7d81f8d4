"""Admission at the head (issue 40, point 5): uvicorn running `polysense serve`'s app with its connection protocol
(polysense.serving.connections) refuses prediction requests as soon as their head is parsed, with the answers
the app would give (401 first, then 503 with Retry-After), keeps the connection usable when the refused body
is all there, and counts the refusals in /metrics. The server runs in a thread of this process, so a test can
fill the queue by setting `Service.inflight` (no request is in flight when it does)."""

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from benchmarks.hostile import connect, free_port, read_all, ready

pytest.importorskip("onnxruntime")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from polysense.serving.connections import uvicorn_limits  # noqa: E402
from polysense.serving.handler import ServeOptions  # noqa: E402
from polysense.serving.http import create_app  # noqa: E402
from polysense.serving.service import OVERLOAD_WINDOW_S, Overload, Service  # noqa: E402

KEY = "k" * 32
BODY = json.dumps({"text": "a calm square"}).encode()


def request(body: bytes = BODY, key: str | None = None, declared: int | None = None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n".encode() if key else b""
    length = len(body) if declared is None else declared
    return (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + auth
        + b"Content-Length: %d\r\n\r\n" % length
        + body
    )


@contextlib.contextmanager
def running(pipe, **options) -> Iterator[tuple[int, Service]]:
    """uvicorn serving `pipe` in a thread, as polysense.serving.server.serve runs it: (port, its Service)."""
    serve_options = ServeOptions(**options)
    app = create_app(pipe, serve_options, warmed_up=True)
    service = app.state.service
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_limits(serve_options, service)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert ready(port, within_s=30), "the server did not start"
        yield port, service
    finally:
        server.should_exit = True
        thread.join(15)


@contextlib.contextmanager
def full_queue(service: Service) -> Iterator[None]:
    service.inflight = service.options.max_queue
    try:
        yield
    finally:
        service.inflight = 0


def answers(sock: socket.socket, count: int, within_s: float = 5.0) -> list[tuple[bytes, dict]]:
    """`count` HTTP/1.1 answers read from a kept-alive connection: (head, JSON body) each."""
    sock.settimeout(within_s)
    data, got = b"", []
    while len(got) < count:
        if b"\r\n\r\n" in data:
            head, rest = data.split(b"\r\n\r\n", 1)
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            if len(rest) >= length:
                got.append((head, json.loads(rest[:length])))
                data = rest[length:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return got


@pytest.fixture(scope="module")
def server(pipe):
    with running(pipe, max_queue=4, max_batch_samples=4) as port_and_service:
        yield port_and_service


def test_a_request_finding_the_queue_full_gets_503_and_the_connection_stays_usable(server):
    """The refused request's body is dropped, not read as the next request: the request sent right after it
    on the same connection (in the same packet) is answered 200 once the queue has room."""
    port, service = server
    with connect(port) as sock:
        with full_queue(service):
            sock.sendall(request())
            [(head, body)] = answers(sock, 1)
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower()
        assert b"connection: close" not in head.lower()
        assert body["type"] == "OverloadedError" and "max_queue=4" in body["error"]
        sock.sendall(request() + request())  # two in one packet, both served
        assert [h[:12] for h, _ in answers(sock, 2)] == [b"HTTP/1.1 200"] * 2
    assert service.arrived == 0  # every request counted at the head was answered


def test_a_refusal_at_the_head_never_reaches_the_app(server, monkeypatch):
    """What made refusing cost as much as serving under 4x overload: an ASGI task, Starlette's middleware
    stack and a JSON answer per refused request. Refused at the head, the app is not called at all."""
    from polysense.serving.admission import Admission

    port, service = server
    called = []
    through = Admission.__call__

    async def counted(self, scope, receive, send):
        called.append(scope["path"])
        await through(self, scope, receive, send)

    monkeypatch.setattr(Admission, "__call__", counted)
    with connect(port) as sock:
        with full_queue(service):
            sock.sendall(request() * 3)
            assert [head[9:12] for head, _ in answers(sock, 3)] == [b"503"] * 3
        assert called == []
        sock.sendall(request())
        assert answers(sock, 1)[0][0].startswith(b"HTTP/1.1 200") and called == ["/v1/predict"]


def test_refused_requests_in_one_packet_are_each_answered_in_order(server):
    port, service = server
    with connect(port) as sock, full_queue(service):
        sock.sendall(request() * 3)
        got = answers(sock, 3)
    assert [head[:12] for head, _ in got] == [b"HTTP/1.1 503"] * 3


def test_a_refused_request_whose_body_is_not_all_here_is_answered_and_closed(server):
    """Nothing more is read for a refused request: its 503 says `connection: close` and the server closes."""
    port, service = server
    with connect(port) as sock, full_queue(service):
        sock.sendall(request(BODY[:5], declared=len(BODY)))
        answer = read_all(sock, 3)
    assert answer.startswith(b"HTTP/1.1 503") and b"connection: close" in answer.lower()
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["type"] == "OverloadedError"


def test_an_http_1_0_request_is_refused_and_its_connection_closed(server):
    port, service = server
    with connect(port) as sock, full_queue(service):
        sock.sendall(request().replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        answer = read_all(sock, 3)
    assert answer.startswith(b"HTTP/1.1 503") and b"connection: close" in answer.lower()


def test_requests_counted_at_the_head_are_uncounted_when_their_client_hangs_up(server):
    """A request whose body is all here counts in Service.arrived until answered, or until its connection is
    lost: clients hanging up leave no count behind (the count would refuse others for good)."""
    port, service = server
    before = _answered(service)
    for _ in range(8):
        with connect(port) as sock:
            sock.sendall(request())
    deadline = time.monotonic() + 5
    while (_answered(service) < before + 8 or service.arrived) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _answered(service) == before + 8  # each ended one way or another (200 or 499)
    assert service.arrived == 0 and service.inflight == 0


def _answered(service: Service) -> float:
    """Prediction requests the server has finished with, whatever their status."""
    text = service.metrics.exposition()[0].decode()
    return sum(
        float(n) for n in re.findall(r'polysense_requests_total\{code="\d+",endpoint="predict"\} (\S+)', text)
    )


def test_refusals_at_the_head_are_counted_in_the_metrics(server):
    port, service = server
    requests, errors = _count(service, "503", "OverloadedError")
    with connect(port) as sock, full_queue(service):
        sock.sendall(request() * 2)
        answers(sock, 2)
    assert _count(service, "503", "OverloadedError") == (requests + 2, errors + 2)


def _count(service: Service, code: str, error: str) -> tuple[float, float]:
    text = service.metrics.exposition()[0].decode()
    requests = re.search(rf'polysense_requests_total\{{code="{code}",endpoint="predict"\}} (\S+)', text)
    errors = re.search(rf'polysense_errors_total\{{type="{error}"\}} (\S+)', text)
    return (float(requests.group(1)) if requests else 0.0, float(errors.group(1)) if errors else 0.0)


def test_without_the_api_key_401_comes_before_503(pipe):
    """A caller without the key learns nothing of the queue: 401 whatever it holds; with the key, 503 while
    it is full and 200 after, on the same connection."""
    with running(pipe, max_queue=4, max_batch_samples=4, api_key=KEY) as (port, service):
        with connect(port) as sock:
            with full_queue(service):
                sock.sendall(request() + request(key="w" * 32) + request(key=KEY))
                got = answers(sock, 3)
            sock.sendall(request(key=KEY))
            got += answers(sock, 1)
        statuses = [head[9:12] for head, _ in got]
        assert statuses == [b"401", b"401", b"503", b"200"]
        assert b"www-authenticate: bearer" in got[0][0].lower() and "max_queue" not in json.dumps(got[0][1])
        assert _count(service, "401", "Unauthorized")[0] == 2


def test_the_wait_rule_applies_only_while_requests_arrive_faster_than_they_leave():
    """Overload is judged on the last whole window: clients that wait for their answers (as many arrivals as
    departures) are never overload, however many; 5 arrivals per departure (4x overload) is; a burst into a
    quiet server is not, until its window has passed; a quiet gap ends it."""
    overload = Overload()
    window = OVERLOAD_WINDOW_S

    def run(arrivals: int, departures: int, start: float) -> bool:
        for _ in range(arrivals):
            overload.arrival(start)
        for _ in range(departures):
            overload.departure(start + window / 2)
        return overload.now(start + window * 1.01)

    assert not overload.now(0.0)
    assert not run(400, 400, 0.0)  # 32 closed-loop clients: one arrival per departure
    assert not run(400, 390, window * 1.01)
    assert run(800, 150, window * 2.02)  # 4x overload
    assert overload.now(window * 3.03 - 1e-6)  # for the whole of the next window
    assert not run(8, 0, window * 3.03)  # a handful is never overload
    for _ in range(300):  # a burst into a quiet server
        overload.arrival(10.0)
    assert not overload.now(10.0 + window / 2)  # served: the window before it was quiet
    assert overload.now(10.0 + window * 1.01)  # still unanswered a window later: overload
    assert not overload.now(100.0)  # a quiet gap ends it


def test_a_server_that_was_overloaded_and_idle_serves_a_burst_again(pipe):
    """The wait rule: refused while overloaded, admitted in a burst after a quiet moment."""
    service = Service(pipe, ServeOptions(max_queue=16, max_batch_samples=16, max_queue_delay_ms=5))
    service.ready.set()
    now = [100.0]
    service.clock = lambda: now[0]
    service.service_time.per_sample_s = 0.001  # 1 ms a sample: 8 in flight is 8 ms of work
    try:
        for _ in range(200):
            service.arrival()  # 200 arrivals, no departure: overload
        now[0] += OVERLOAD_WINDOW_S * 1.01
        assert service.refusal(ahead=8) is not None and service.refusal(ahead=7) is None
        now[0] += 10.0
        assert service.refusal(ahead=8) is None
    finally:
        service.close()
