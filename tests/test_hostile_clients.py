"""Hostile clients against a real `polysense serve` process (issue 40): slow headers, an endless header, slow
and lying bodies, a hang-up mid-body, many idle connections and idle WebSocket streams. Each attack runs for a
few seconds while normal clients keep getting answers equal to the library's; the server's limits are set
short here (2 s) so that each attack's end is seen quickly. 200 idle connections stand for the issue's 1,000,
to keep the fast tier fast (the mechanism is per connection: the count only scales the file descriptors)."""

import contextlib
import json
import re
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.hostile import JSON_HEAD, MULTIPART_HEAD, closed_within, connect, free_port, read_all, ready

pytest.importorskip("onnxruntime")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
websockets_sync = pytest.importorskip("websockets.sync.client")

LIMIT_S = 2.0  # the server's header, body and stream-start timeouts in this module
MAX_QUEUE = 16
MAX_STREAMS = 4
MAX_CONNECTIONS = 260
IDLE = 200
TEXT = "a calm square"


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    limit = str(LIMIT_S)
    command = [
        sys.executable, "-m", "polysense.cli.main", "serve", str(bundle), "--port", str(port),
        "--device", "cpu", "--precision", "fp32", "--max-queue", str(MAX_QUEUE), "--max-batch-samples", "8",
        "--max-streams", str(MAX_STREAMS), "--max-connections", str(MAX_CONNECTIONS), "--max-header-kb", "16",
        "--header-timeout-s", limit, "--body-timeout-s", limit, "--idle-timeout-s", limit,
        "--ws-start-timeout-s", limit,
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        if not ready(port, within_s=60):
            pytest.fail(f"the server did not become ready:\n{log.read_text()}")
        yield port, url, log
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def expected(pipe):
    return pipe.predict(text=TEXT)


def _same(answer: dict, expected) -> bool:
    got = np.array([answer["probabilities"][k] for k in expected.probabilities])
    return answer["label"] == expected.label and np.allclose(
        got, list(expected.probabilities.values()), atol=1e-5
    )


class GoodClients:
    """`count` threads posting TEXT in a loop (each request bounded to 5 s), counting right, wrong and failed."""

    def __init__(self, url: str, expected, count: int = 4) -> None:
        self.url, self.expected, self.stop = url, expected, threading.Event()
        self.right, self.wrong, self.failed = 0, [], []
        self.threads = [threading.Thread(target=self.run) for _ in range(count)]

    def run(self) -> None:
        with httpx.Client(timeout=5) as http:
            while not self.stop.is_set():
                try:
                    answer = http.post(f"{self.url}/v1/predict", json={"text": TEXT})
                except httpx.HTTPError as error:
                    self.failed.append(repr(error))
                    continue
                if answer.status_code != 200:
                    self.failed.append(answer.status_code)
                elif _same(answer.json(), self.expected):
                    self.right += 1
                else:
                    self.wrong.append(answer.json())

    def __enter__(self) -> "GoodClients":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def test_an_endless_header_gets_431_and_stalls_no_one(server, expected):
    port, url, _ = server
    with GoodClients(url, expected) as good:
        attacker = connect(port)
        attacker.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        answer = b""
        for _ in range(200):  # up to 200 KB, 10 ms apart: the server must stop it long before
            if select.select([attacker], [], [], 0)[0]:  # the server answered: stop before a reset drops it
                break
            attacker.sendall(b"a" * 1024)
            time.sleep(0.01)
        answer = read_all(attacker, 3)
        attacker.close()
        time.sleep(0.5)
    assert answer.startswith(b"HTTP/1.1 431") and b"--max-header-kb" in answer
    assert good.right > 10 and good.wrong == [] and good.failed == []


def test_slow_headers_are_cut_off_at_the_header_timeout(server, expected):
    port, url, _ = server
    with GoodClients(url, expected) as good:
        attackers = [connect(port) for _ in range(8)]
        start = time.monotonic()
        head = b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 100
        for byte in range(len(head)):  # one byte per 0.1 s each: the head would take 14 s
            if time.monotonic() - start > LIMIT_S + 2:
                break
            for sock in attackers:
                with contextlib.suppress(OSError):  # closed by the server already
                    sock.sendall(head[byte : byte + 1])
            time.sleep(0.1)
        answers = [read_all(sock, 3) for sock in attackers]
        took = time.monotonic() - start
        for sock in attackers:
            sock.close()
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers), answers[0]
    assert took < LIMIT_S + 6
    assert good.right > 10 and good.wrong == [] and good.failed == []


def test_bodies_that_never_arrive_release_their_slots(server, expected):
    """MAX_QUEUE JSON requests declaring 100 bytes and sending none hold no place in the queue (a good request is
    answered, at the latest once they are cut off); at body_timeout_s each gets 408. Multipart requests declaring
    32 MB and sending 5 bytes hold no budget."""
    port, url, _ = server
    liars = [connect(port) for _ in range(MAX_QUEUE)]
    for sock in liars:
        sock.sendall(JSON_HEAD % 100)
    started = time.monotonic()
    with httpx.Client(timeout=5) as http:
        for _ in range(100):  # at once since slots are taken after the body; bounded: 100 x 0.1 s
            answer = http.post(f"{url}/v1/predict", json={"text": TEXT})
            if answer.status_code == 200:
                break
            assert answer.status_code == 503
            time.sleep(0.1)
        released_after = time.monotonic() - started
        assert answer.status_code == 200 and _same(answer.json(), expected)
    answers = [read_all(sock, 3) for sock in liars]
    for sock in liars:
        sock.close()
    assert all(a.startswith(b"HTTP/1.1 408") and b"--body-timeout-s" in a for a in answers), answers[0]
    assert released_after < LIMIT_S + 4

    uploads = [connect(port) for _ in range(MAX_QUEUE // 2)]
    for sock in uploads:
        sock.sendall(MULTIPART_HEAD)
    with GoodClients(url, expected) as good:
        time.sleep(1.0)
    for sock in uploads:
        sock.close()
    assert good.right > 10 and good.wrong == [] and good.failed == []


def test_slow_bodies_hold_no_queue_place(server, expected):
    """MAX_QUEUE clients sending their bodies slowly are all in flight, yet a good client gets its answer at once:
    a request takes its place in the queue only once its body has arrived in full. The slow ones, once their
    bodies are complete (within body_timeout_s), get the right answer too."""
    port, url, _ = server
    body = json.dumps({"text": TEXT}).encode()
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    slow = [connect(port) for _ in range(MAX_QUEUE)]
    started = time.monotonic()
    for sock in slow:
        sock.sendall(head + body[:5])
    time.sleep(0.3)  # the server has every head and a few body bytes: the requests are in flight
    with httpx.Client(timeout=5) as http:
        answers = [http.post(f"{url}/v1/predict", json={"text": TEXT}) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 200], answers[0].text
    assert all(_same(answer.json(), expected) for answer in answers)
    assert time.monotonic() - started < LIMIT_S  # all of it while the slow bodies were still arriving
    for sock in slow:
        sock.sendall(body[5:])
    replies = [_read_response(sock) for sock in slow]
    for sock in slow:
        sock.close()
    assert all(reply.startswith(b"HTTP/1.1 200") for reply in replies), replies[0]
    assert all(_same(json.loads(reply.split(b"\r\n\r\n", 1)[1]), expected) for reply in replies)


def _read_response(sock: socket.socket, within_s: float = 5.0) -> bytes:
    """One HTTP/1.1 answer with a Content-Length (the connection is kept alive, so read to the length)."""
    sock.settimeout(within_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


def test_a_hang_up_mid_body_is_a_499_not_a_500(server):
    port, url, log = server
    for _ in range(5):
        sock = connect(port)
        sock.sendall(JSON_HEAD % 1000 + b'{"text": "')
        time.sleep(0.1)
        sock.close()
    time.sleep(0.5)
    with httpx.Client(timeout=5) as http:
        metrics = http.get(f"{url}/metrics").text
    counted = re.search(r'polysense_requests_total\{code="499",endpoint="predict"\} (\d+)', metrics)
    assert counted and float(counted.group(1)) >= 5
    assert 'code="500"' not in metrics
    assert "Traceback" not in log.read_text()


def test_idle_connections_are_closed_and_capped(server, expected):
    port, url, _ = server
    idle = [connect(port) for _ in range(IDLE)]
    with GoodClients(url, expected) as good:
        time.sleep(1.0)
    assert good.right > 10 and good.wrong == [] and good.failed == []
    over = [connect(port) for _ in range(MAX_CONNECTIONS)]  # past the cap: closed at once
    refused = sum(closed_within(sock, 1.0) for sock in over[-20:])
    assert refused == 20
    deadline = time.monotonic() + LIMIT_S + 4
    open_after = [sock for sock in idle if not closed_within(sock, max(0.01, deadline - time.monotonic()))]
    for sock in idle + over:
        sock.close()
    assert open_after == []  # every silent connection closed at header_timeout_s
    with httpx.Client(timeout=5) as http:
        answer = http.post(f"{url}/v1/predict", json={"text": TEXT})
    assert answer.status_code == 200 and _same(answer.json(), expected)


def test_streams_that_never_start_give_their_places_back(server, pipe):
    port, _, _ = server
    ws_url = f"ws://127.0.0.1:{port}/v1/stream"
    start = time.monotonic()
    closed = []
    with contextlib.ExitStack() as stack:
        idle = [
            stack.enter_context(websockets_sync.connect(ws_url, open_timeout=5)) for _ in range(MAX_STREAMS)
        ]
        for ws in idle:
            try:
                closed.append(ws.recv(timeout=LIMIT_S + 4))  # the error message, then the close
            except TimeoutError as error:
                closed.append(repr(error))
    assert time.monotonic() - start < LIMIT_S + 5
    assert all("ws_start_timeout_s" in message for message in closed), closed
    rate = 16000
    audio = (np.sin(np.arange(rate) * 0.05) * 8000).astype(np.int16)
    with websockets_sync.connect(ws_url, open_timeout=5) as ws:
        ws.send(json.dumps({"sample_rate": rate, "format": "s16le", "text": TEXT}))
        assert '"ready"' in ws.recv(timeout=5)
        ws.send(audio.tobytes())
        ws.send('{"type": "end"}')
        messages = [ws.recv(timeout=10)]
        while '"final"' not in messages[-1] and len(messages) < 10:
            messages.append(ws.recv(timeout=10))
    assert '"final"' in messages[-1]
    expected = pipe.predict(audio=audio.astype(np.float32) / 32768, sample_rate=rate, text=TEXT)
    assert _same(json.loads(messages[-1]), expected)


def test_the_server_log_has_no_traceback(server):
    _, _, log = server
    assert "Traceback" not in Path(log).read_text()
