"""The audio encoder engine: one causal encoder session shared by offline prediction and every live stream.

As in sherpa-onnx, the engine owns the model and the streams own their data: a stream carries only its buffers
and its state tensors, and asks the engine to run frames with that state. The state's names, shapes and batch
axes come from the bundle description, so several streams' states can be stacked into one batch and split
again without the engine knowing which tensor is which.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from polysense.bundle.schema import AudioStreaming
from polysense.errors import InputError
from polysense.inference.sessions import Session, to_numpy

State = dict[str, np.ndarray]


class DeferredStream(Protocol):
    """What `AudioEngine.encode_streams` needs of a stream (polysense.inference.streaming.AudioStream has it)."""

    @property
    def engine(self) -> AudioEngine: ...

    @property
    def pending_frames(self) -> np.ndarray: ...

    @property
    def state(self) -> State: ...

    def absorb(self, embedding: np.ndarray, state: State) -> None: ...


class AudioEngine:
    def __init__(
        self, session: Session, streaming: AudioStreaming, frames_input: str, embed_dim: int
    ) -> None:
        self._session = session
        self._layout = streaming.state
        self._frames_input = frames_input
        self._embedding_output = session.output_names[0]
        self.embed_dim = embed_dim

    def initial_state(self, batch_size: int = 1) -> State:
        """Zero state tensors for `batch_size` recordings."""
        state = {}
        for tensor in self._layout:
            shape = list(tensor.shape)
            shape[tensor.batch_axis] = batch_size
            state[tensor.name] = np.zeros(shape, np.float32)
        return state

    def run(self, frames: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """frames [B, T, n_mels] after `state` -> embeddings [B, D] of everything so far, and the new state."""
        outputs = self._session.run({self._frames_input: frames, **state})
        named = dict(zip(self._session.output_names, outputs))
        new_state = {t.name: to_numpy(named[t.output_name]) for t in self._layout}
        return to_numpy(named[self._embedding_output]), new_state

    def stack(self, states: Sequence[State]) -> State:
        """Several streams' states as one batch, in the given order."""
        return {t.name: np.concatenate([s[t.name] for s in states], axis=t.batch_axis) for t in self._layout}

    def unstack(self, state: State, count: int) -> list[State]:
        """The inverse of stack(): one state per stream."""
        return [
            {t.name: np.take(state[t.name], [i], axis=t.batch_axis) for t in self._layout}
            for i in range(count)
        ]

    def encode_clips(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """Embeddings [N, D] of whole recordings' frames, each from the zero state. Clips of equal frame count
        run as one batch; others run apart, since padding would enter the causal state."""
        out = np.zeros((len(clips), self.embed_dim), np.float32)
        by_length: dict[int, list[int]] = {}
        for index, frames in enumerate(clips):
            by_length.setdefault(frames.shape[0], []).append(index)
        for indices in by_length.values():
            embeddings, _ = self.run(np.stack([clips[i] for i in indices]), self.initial_state(len(indices)))
            out[indices] = embeddings
        return out

    def encode_streams(self, streams: Sequence[DeferredStream]) -> None:
        """Run the pending frames of several deferred streams (`Pipeline.audio_stream(encode=False)`), one
        encoder call per group of equal frame count, their states stacked along each tensor's batch axis."""
        foreign = [s for s in streams if s.engine is not self]
        if foreign:
            raise InputError("a stream of another pipeline was passed; encode each pipeline's streams apart")
        groups: dict[int, list[DeferredStream]] = {}
        for stream in streams:
            if stream.pending_frames.shape[0]:
                groups.setdefault(stream.pending_frames.shape[0], []).append(stream)
        for group in groups.values():
            frames = np.stack([s.pending_frames for s in group])
            embeddings, state = self.run(frames, self.stack([s.state for s in group]))
            for stream, embedding, own_state in zip(group, embeddings, self.unstack(state, len(group))):
                stream.absorb(embedding, own_state)
