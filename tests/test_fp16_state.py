"""The fp16 variant of the streaming audio encoder over a long recording: its accumulating state (sums and
counts over every frame so far) must stay fp32, or a running sum passes fp16's 65504 within minutes and the
stream's state turns to inf/NaN."""

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from polysense.bundle.reader import open_bundle  # noqa: E402

pytestmark = pytest.mark.slow  # onnx


@pytest.fixture(scope="module")
def bundle(exported_bundle):
    """The run trained and exported in this session (conftest.py), not the committed tiny bundle: these tests
    check what export writes now."""
    return exported_bundle


def _stream(session, chunks, state):
    names = [o.name for o in session.get_outputs()]
    for frames in chunks:
        outputs = dict(zip(names, session.run(None, {"frames": frames, **state})))
        state = {name: outputs[f"{name}_out"] for name in state}
    return outputs["embedding"], state


def test_ten_minutes_through_the_fp16_audio_encoder_stay_with_fp32(bundle, tmp_path):
    import onnxruntime as ort

    from polysense.export.quantize import ACCUMULATORS, convert_fp16

    description = open_bundle(bundle).description
    source = bundle / description.component("audio_encoder").variant("fp32").file
    target = tmp_path / "audio_encoder.fp16.onnx"
    convert_fp16(source, target)
    fp32 = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    fp16 = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    state = {
        i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
        for i in fp32.get_inputs()[1:]
    }
    assert (
        {"band_sum", "pool_sum"} <= set(state) <= {"conv1_cache", "conv2_cache", "gru_hidden", *ACCUMULATORS}
    )
    n_mels = fp32.get_inputs()[0].shape[2]
    rng = np.random.default_rng(0)
    # 600 chunks of 100 frames = 10 minutes at a 10 ms hop, log-mel-like values
    chunks = [(rng.standard_normal((1, 100, n_mels)) * 2 - 8).astype(np.float32) for _ in range(600)]
    expected, expected_state = _stream(fp32, chunks, dict(state))
    got, got_state = _stream(fp16, chunks, dict(state))
    assert all(np.isfinite(v).all() for v in got_state.values())
    for name in ("band_sum", "pool_sum", "pool_count"):
        # Within 1 % of the state's largest value (an element near zero may differ by more of its own value).
        scale = np.abs(expected_state[name]).max()
        assert np.abs(got_state[name] - expected_state[name]).max() <= 1e-2 * scale, name
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 2e-2
