"""Nothing leaves the device and nothing is written behind the user's back (see polysense.privacy).

Each check runs in a fresh process with HOME pointed at an empty folder, so onnxruntime's telemetry (a device id
and an event database under ~/.cache/Microsoft/DeveloperTools) would land there. Sockets are caught three ways:
a Python audit hook, the process's open descriptors at the end, and, where strace is installed, every socket
and connect system call of the process and its threads.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LIBRARY_RUN = """
import os, sys
sockets = []
sys.addaudithook(lambda event, args: sockets.append(event) if event.startswith("socket.") else None)
import numpy as np
import polysense
pipe = polysense.Pipeline.load(sys.argv[1], device="cpu")
pipe.predict(text="a calm morning")
pipe.predict_batch([{"text": "hello"}, {"text": "good day"}])
if "audio" in pipe.modalities:
    stream = pipe.audio_stream()
    stream.accept_waveform(np.zeros(8000, np.float32), 16000)
    stream.input_finished()
    stream.result()
open_sockets = [fd for fd in os.listdir("/proc/self/fd") if "socket:" in os.path.realpath(f"/proc/self/fd/{fd}")]
print("SOCKETS", len(sockets) + len(open_sockets))
"""


def _environment(home: Path, allow: bool) -> dict[str, str]:
    environment = {
        k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")
    }
    environment.pop("POLYSENSE_ALLOW_TELEMETRY", None)
    if allow:
        environment["POLYSENSE_ALLOW_TELEMETRY"] = "1"
    return {**environment, "HOME": str(home)}


def _run(command: list[str], home: Path, trace: Path | None, allow: bool = False) -> str:
    if trace is not None:
        command = ["strace", "-f", "-qq", "-e", "trace=socket,connect", "-o", str(trace), *command]
    done = subprocess.run(
        command, env=_environment(home, allow), capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-qq", "-e", "trace=none", "true"], capture_output=True, check=False)
    return probe.returncode == 0  # ptrace may be forbidden in a container


def _written(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*"))


@pytest.fixture
def trace_file(tmp_path) -> Path | None:
    return tmp_path / "syscalls.txt" if _strace_works() else None


def _network_calls(trace: Path | None) -> list[str]:
    if trace is None:
        return []
    return [line for line in trace.read_text().splitlines() if "socket(" in line or "connect(" in line]


def test_library_load_predict_and_stream_write_nothing_and_open_no_socket(bundle, tmp_path, trace_file):
    home = tmp_path / "home"
    home.mkdir()
    out = _run([sys.executable, "-c", LIBRARY_RUN, str(bundle)], home, trace_file)
    assert "SOCKETS 0" in out
    assert _written(home) == []
    assert _network_calls(trace_file) == []


def test_cli_predict_and_info_write_nothing_and_open_no_socket(bundle, tmp_path, trace_file):
    home = tmp_path / "home"
    home.mkdir()
    polysense = [sys.executable, "-m", "polysense.cli.main"]
    out = _run([*polysense, "predict", str(bundle), "--text", "hello", "--json"], home, trace_file)
    assert "label" in json.loads(out)
    assert _written(home) == []
    assert _network_calls(trace_file) == []


# What an unwanted library would do: write under HOME and keep a socket open. The self-test below proves the
# checks above see both, without depending on whether onnxruntime records telemetry on this machine (it does on
# some machines and not on others, even with the opt-in).
LEAKY_RUN = LIBRARY_RUN.replace(
    "open_sockets =",
    "import pathlib, socket\n"
    "pathlib.Path(os.environ['HOME'], '.cache', 'leak').mkdir(parents=True)\n"
    "kept = socket.socket()\n"
    "open_sockets =",
)


def test_the_checks_catch_a_write_into_home_and_a_socket(bundle, tmp_path, trace_file):
    home = tmp_path / "home"
    home.mkdir()
    out = _run([sys.executable, "-c", LEAKY_RUN, str(bundle)], home, trace_file)
    assert "SOCKETS 0" not in out
    assert ".cache/leak" in _written(home)
    if trace_file is not None:
        assert _network_calls(trace_file) != []


def test_the_opt_in_leaves_onnxruntime_telemetry_on():
    script = "import os, polysense.privacy as p; print(os.environ.get('ORT_DISABLE_TELEMETRY'), p.telemetry_disabled())"
    environment = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    for allow, expected in ((True, "None False"), (False, "1 True")):
        environment.pop("POLYSENSE_ALLOW_TELEMETRY", None)
        if allow:
            environment["POLYSENSE_ALLOW_TELEMETRY"] = "1"
        done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)
        assert done.stdout.strip() == expected, done.stderr
