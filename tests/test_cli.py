"""CLI behaviours a new user hits (issue 10): each was a traceback or a silent surprise before."""

import subprocess
import sys

import numpy as np
import pytest

from polysense.cli.main import main
from polysense.errors import InputError
from polysense.tools.timeline import audio_chunks


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


def test_stream_with_several_bundles_is_one_error_line_naming_the_fix(capsys):
    assert main(["stream", "one", "two", "--audio", "x.wav"]) == 2  # refused before a bundle is opened
    err = capsys.readouterr().err
    assert (
        err.startswith("error: stream takes one bundle, got 2; stream with one of them")
        and err.count("\n") == 1
    )
    assert "polysense predict one two --audio FILE" in err and "polysense serve one two" in err


@pytest.mark.parametrize(
    "chunk_ms, rate, message", [(float("nan"), 16000, "--chunk-ms"), (100.0, 0, "sample rate")]
)
def test_stream_refuses_a_bad_chunk_length_or_rate(chunk_ms, rate, message):
    with pytest.raises(InputError, match=message):
        next(audio_chunks("-", chunk_ms, rate))


def test_global_flags_after_the_command_and_no_progress_off_a_terminal(bundle, split_manifest, capsys):
    args = ["eval", str(bundle), "--data", str(split_manifest), "--split", "test", "--quiet"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "accuracy" in captured.out
    assert "evaluating" not in captured.err  # stderr is not a terminal here: no progress bar


def test_a_closed_pipe_ends_quietly(bundle):
    code = f"import sys; from polysense.cli.main import main; sys.exit(main(['info', {str(bundle)!r}, '--json']))"
    pipeline = f"{sys.executable} -c {code!r} | head -c 20"
    result = subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True)
    assert result.stdout.startswith("{") and "Traceback" not in result.stderr and "Error" not in result.stderr


def test_an_audio_file_with_a_sample_rate_is_refused(tmp_path):
    import soundfile

    from polysense.preprocess.audio import load_audio

    path = tmp_path / "a.wav"
    soundfile.write(str(path), np.zeros(800, np.float32), 8000)
    with pytest.raises(InputError, match="sample_rate is for sample arrays"):
        load_audio(str(path), sample_rate=16000)
    assert load_audio(str(path))[1] == 8000


def test_audio_too_short_for_one_frame_is_an_input_error():
    from polysense.preprocess.audio import AudioPreprocessor

    with pytest.raises(InputError, match="audio too short"):
        AudioPreprocessor()(np.zeros(1, np.float32), sample_rate=48_000)
    assert AudioPreprocessor()(np.zeros(3, np.float32), sample_rate=48_000).shape[0] == 1


def test_opencv_errors_become_input_errors(monkeypatch):
    import cv2

    from polysense.preprocess.image import decode_image

    def refuse(*args):
        raise cv2.error("OpenCV(4) imgcodecs: image too large")

    ok, png = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))
    monkeypatch.setattr(cv2, "imdecode", refuse)
    with pytest.raises(InputError, match="OpenCV cannot process it .* re-save it as a plain PNG or JPEG"):
        decode_image(png.tobytes())


def test_a_nul_character_in_a_manifest_path_is_a_row_problem(tmp_path):
    from polysense.tools.manifest import read_manifest

    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a\\u0000.jpg", "label": "x"}\n{"text": "fine", "label": "y"}\n')
    manifest = read_manifest(path)
    assert [(p.line, "NUL" in p.reason) for p in manifest.problems] == [(1, True)]


def test_bench_refuses_a_plot_format_it_cannot_write_before_running(capsys):
    # Issue 43: --plot x.txt was a matplotlib traceback after the whole benchmark.
    assert main(["bench", "no-such-bundle", "--plot", "x.txt"]) == 2  # refused before the bundle is opened
    err = capsys.readouterr().err
    assert err.startswith("error: --plot x.txt: name a .png, .svg, .pdf file") and "--plot x.png" in err


@pytest.mark.parametrize("flags", [["--quiet"], [], ["--no-progress"]])
def test_data_builtin_draws_no_progress_bar_quiet_or_off_a_terminal(flags, tmp_path, capsys):
    assert main(["data", "builtin", "--out", str(tmp_path / "d"), "--n", "12", *flags]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "writing built-in data" not in err


def test_warnings_print_as_one_warning_line(monkeypatch, capsys):
    import logging
    import warnings

    from polysense.cli.main import _CliFormatter

    def warns(args):
        warnings.warn("no int8 variant of fusion in this bundle; they run fp32", UserWarning, stacklevel=2)
        return 0

    monkeypatch.setattr("polysense.cli.bundle._run_info", warns)
    assert main(["info", "bundle"]) == 0
    assert capsys.readouterr().err == "warning: no int8 variant of fusion in this bundle; they run fp32\n"
    record = logging.LogRecord("polysense", logging.WARNING, "x.py", 1, "%d rows left out", (3,), None)
    assert _CliFormatter().format(record) == "warning: 3 rows left out"
    record.levelno = logging.INFO
    assert _CliFormatter().format(record) == "3 rows left out"


def test_a_wav_piped_to_stream_is_read_by_its_header(tmp_path):
    # Issue 43: `stream --audio -` read a piped WAV's 44-byte header as 22 samples at --sample-rate.
    import io

    import soundfile

    samples = (np.sin(np.arange(800) / 5) * 0.5).astype(np.float32)
    wav = io.BytesIO()
    soundfile.write(wav, samples, 8000, format="WAV", subtype="PCM_16")
    chunks = list(audio_chunks("-", 50.0, 16000, io.BytesIO(wav.getvalue())))
    assert {rate for _, rate in chunks} == {8000} and [len(c) for c, _ in chunks] == [400, 400]
    piped = np.concatenate([c[:, 0] for c, _ in chunks]) / 32768
    np.testing.assert_allclose(piped, samples, atol=1 / 32768)
    raw = np.arange(100, dtype="<i2").tobytes()  # not a WAV: raw PCM, its first bytes included
    assert sum(len(c) for c, _ in audio_chunks("-", 50.0, 16000, io.BytesIO(raw))) == 100


def test_stream_of_a_missing_file_says_not_found_as_predict_does(bundle, capsys):
    # Issue 43: "cannot read audio (... System error.)".
    assert main(["stream", str(bundle), "--audio", "nope.wav"]) == 2
    assert capsys.readouterr().err == "error: audio file not found: nope.wav\n"


def test_a_misspelt_flag_is_refused_by_its_command_with_the_nearest_flag(capsys):
    # Issue 43: `predict --imagee x` printed the top-level usage, which says nothing of predict's flags.
    with pytest.raises(SystemExit) as stop:
        main(["predict", "bundle", "--imagee", "x"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("usage: polysense predict")
    assert "polysense predict: error: unrecognized arguments: --imagee x (did you mean --image?)" in err


def test_help_shows_the_defaults(capsys):
    # Issue 43: `serve --help` showed no defaults.
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help at the terminal's width
    assert "requests per model run (default 32)" in out and "--max-queue MAX_QUEUE requests" in out
    assert "(default 128)" in out and "(default auto)" in out


def test_predict_many_counts_in_the_singular_too(bundle, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("a calm morning")
    (tmp_path / "data" / "b.jpg").write_bytes(b"not a photo")
    args = ["predict", str(bundle), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "p.jsonl")]
    assert main(args) == 0
    assert f"wrote 1 prediction to {tmp_path / 'p.jsonl'}; 1 sample skipped\n" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["predict", "no-such-bundle"],
            "error: no input given; pass one or more of --image, --text, --audio",
        ),
        (["tune", "no-such-bundle"], "error: bundle not found: no-such-bundle"),
    ],
)
def test_common_mistakes_are_said_in_flags_and_first(argv, message, capsys):
    # The new-user pass after issue 43: predict without an input named Python keywords; tune of a missing
    # bundle said it had no probe.npz.
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(message)


def test_serve_max_audio_seconds_bounds_what_one_recording_may_cost(bundle):
    """`serve --max-audio-seconds` lowers Limits.max_audio_seconds for the served model (for audio front ends
    that cost much per second); a bad value names the flag, and Ray replicas refuse it rather than ignore it."""
    from polysense.cli.main import build_parser
    from polysense.cli.predict import load_model
    from polysense.errors import ConfigError, LimitError

    args = build_parser().parse_args(
        ["serve", str(bundle), "--max-audio-seconds", "0.5", "--device", "cpu", "--threads", "1"]
    )
    model = load_model(args)
    one_second = np.zeros(16000, np.float32)
    with pytest.raises(LimitError, match="max_audio_seconds"):
        model.predict(audio=one_second, sample_rate=16000)
    assert model.predict(audio=one_second[:4000], sample_rate=16000).label
    bad = build_parser().parse_args(["serve", str(bundle), "--max-audio-seconds", "0", "--threads", "1"])
    with pytest.raises(ConfigError, match="--max-audio-seconds must be a positive"):
        load_model(bad)
    assert main(["serve", str(bundle), "--ray", "--max-audio-seconds", "5"]) == 2


def test_predict_top_must_show_at_least_one_label(bundle, capsys):
    with pytest.raises(SystemExit):
        main(["predict", str(bundle), "--text", "hi", "--top", "0"])
    assert "--top: must be 1 or more" in capsys.readouterr().err
