"""Live audio streams encoded together: many streams' new frames in one encoder run.

Each stream is made with `Pipeline.audio_stream(encode=False)` (or an Ensemble's): its owner feeds chunks on its
own thread (resampling and log-mel happen there), then asks the StreamEncoder to encode the new frames. One worker
thread takes every stream waiting at that moment and runs them through the audio encoder together
(`polysense.inference.streaming.encode_streams`: one call per group of equal frame count, states stacked), so a
hundred live connections cost a few encoder calls per chunk period, not a hundred.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from polysense.errors import OverloadedError
from polysense.inference.predictor import LiveAudioStream
from polysense.inference.streaming import encode_streams


class StreamEncoder:
    """Batches the pending frames of deferred audio streams across streams. Thread-safe; close() when done."""

    def __init__(self, max_queue: int = 1024) -> None:
        self.max_queue = max_queue
        self.batches = 0
        self.streams_encoded = 0
        self._waiting: list[tuple[LiveAudioStream, Future[None]]] = []
        self._closed = False
        self._condition = threading.Condition()
        self._worker = threading.Thread(target=self._serve, name="polysense-streams", daemon=True)
        self._worker.start()

    def encode(self, stream: LiveAudioStream) -> Future[None]:
        """Queue the pending frames of a stream that `audio_stream(encode=False)` made (a Pipeline's or an
        Ensemble's); the Future completes once they are encoded. Do not touch the stream until then."""
        future: Future[None] = Future()
        with self._condition:
            if self._closed:
                raise OverloadedError("the server is shutting down; no new audio is encoded")
            if len(self._waiting) >= self.max_queue:
                raise OverloadedError(f"{self.max_queue} streams are waiting to be encoded; retry shortly")
            self._waiting.append((stream, future))
            self._condition.notify()
        return future

    def close(self) -> None:
        """Encode what is waiting, then stop the worker."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._worker.join()

    def _serve(self) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._closed:
                    self._condition.wait()
                if not self._waiting:
                    return
                waiting, self._waiting = self._waiting, []
            live = [(s, f) for s, f in waiting if f.set_running_or_notify_cancel()]
            try:
                encode_streams([s for s, _ in live])
            except Exception as error:  # every stream of the run gets the error; the worker lives on
                for _, future in live:
                    future.set_exception(error)
                continue
            self.batches += 1
            self.streams_encoded += len(live)
            for _, future in live:
                future.set_result(None)
