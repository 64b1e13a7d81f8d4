"""CLI behaviours a new user hits (issue 10): each was a traceback or a silent surprise before."""

import subprocess
import sys

import numpy as np
import pytest

from polysense.cli import main
from polysense.errors import InputError
from polysense.timeline import audio_chunks


def test_an_input_flag_given_twice_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["predict", "bundle", "--image", "a.jpg", "--image", "b.jpg"])
    assert stop.value.code == 2 and "--image given twice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value", [("--json", "/nonexistent/folder/x.json"), ("--plot", "/nonexistent/x.png")]
)
def test_bench_checks_its_output_paths_before_running(flag, value, capsys):
    assert main(["bench", "no-such-bundle", flag, value]) == 2  # refused before the bundle is even opened
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "chunk_ms, rate, message", [(float("nan"), 16000, "--chunk-ms"), (100.0, 0, "sample rate")]
)
def test_stream_refuses_a_bad_chunk_length_or_rate(chunk_ms, rate, message):
    with pytest.raises(InputError, match=message):
        next(audio_chunks("-", chunk_ms, rate))


def test_global_flags_after_the_command_and_no_progress_off_a_terminal(bundle, trained_run, capsys):
    args = ["eval", str(bundle), "--data", str(trained_run / "manifest.csv"), "--split", "test", "--quiet"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "accuracy" in captured.out
    assert "evaluating" not in captured.err  # stderr is not a terminal here: no progress bar


def test_a_closed_pipe_ends_quietly(bundle):
    code = f"import sys; from polysense.cli import main; sys.exit(main(['info', {str(bundle)!r}, '--json']))"
    pipeline = f"{sys.executable} -c {code!r} | head -c 20"
    result = subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True)
    assert result.stdout.startswith("{") and "Traceback" not in result.stderr and "Error" not in result.stderr


def test_an_audio_file_with_a_sample_rate_is_refused(tmp_path):
    import soundfile

    from polysense.audio import load_audio

    path = tmp_path / "a.wav"
    soundfile.write(str(path), np.zeros(800, np.float32), 8000)
    with pytest.raises(InputError, match="sample_rate is for sample arrays"):
        load_audio(str(path), sample_rate=16000)
    assert load_audio(str(path))[1] == 8000
