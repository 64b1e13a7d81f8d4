"""onnxruntime sessions from one factory, with explicit options and an honest report of the provider used."""

from __future__ import annotations

import importlib.metadata
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from polysense.bundle.schema import TensorSpec
from polysense.errors import BundleError, ConfigError, DependencyError

log = logging.getLogger("polysense")

# A session's input or output: a numpy array, or under CUDA an onnxruntime OrtValue kept on the device
# (onnxruntime ships no type hints, so the OrtValue side cannot be named more precisely).
DeviceArray = Any

DEVICES = ("auto", "cpu", "cuda")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def import_onnxruntime() -> ModuleType:
    """The onnxruntime module, or a DependencyError that says how to install it properly."""
    if _installed("onnxruntime") and _installed("onnxruntime-gpu"):
        raise DependencyError(
            "both onnxruntime and onnxruntime-gpu are installed; they share one module and break each other. "
            "Fix: pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'polysense[cpu]' "
            "(or 'polysense[gpu]' for CUDA)"
        )
    try:
        import onnxruntime
    except ImportError as error:
        raise DependencyError(
            f"onnxruntime is not installed ({error}); install the runtime with pip install 'polysense[cpu]' "
            "(or 'polysense[gpu]' for CUDA)"
        ) from error
    return onnxruntime


@dataclass(frozen=True)
class SessionSettings:
    device: str = "auto"  # auto: CUDA when this onnxruntime has it, else CPU; cpu; cuda
    intra_op_threads: int = 0  # threads per operator; 0 lets onnxruntime choose (one per physical core)
    graph_optimization: str = "all"  # basic | extended | all

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device {self.device!r} is unknown; choose auto, cpu or cuda")
        if self.graph_optimization not in ("basic", "extended", "all"):
            raise ConfigError("graph_optimization must be basic, extended or all")
        if self.intra_op_threads < 0:
            raise ConfigError("intra_op_threads cannot be negative (0 = onnxruntime's default)")


def runnable(settings: SessionSettings) -> SessionSettings:
    """The settings with `device` resolved to what this onnxruntime can run: cuda asked for without CUDA support
    becomes cpu, with one warning for the whole pipeline (not one per session), so precision "auto" then picks
    the CPU variants instead of fp16 ones that are slow on a CPU."""
    available = import_onnxruntime().get_available_providers()
    device = settings.device
    if device == "auto":
        device = "cuda" if CUDA in available else "cpu"
    elif device == "cuda" and CUDA not in available:
        warnings.warn(
            "CUDA was asked for but this onnxruntime has no CUDA support; running on CPU "
            "(install 'polysense[gpu]' instead of 'polysense[cpu]' for CUDA)",
            stacklevel=4,  # the caller of Pipeline.load
        )
        device = "cpu"
    return SessionSettings(device, settings.intra_op_threads, settings.graph_optimization)


class Session:
    """One component's inference session. On CUDA it runs through IO binding, so outputs can stay on the
    device and feed the next session without a round trip through host memory."""

    def __init__(self, model: bytes | Path, settings: SessionSettings, name: str = "") -> None:
        """`model`: the ONNX graph's bytes (as read and verified from a bundle) or a file path; `name` names
        it in errors and warnings."""
        if not name:
            name = "the ONNX graph's bytes" if isinstance(model, bytes) else Path(model).name
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[settings.graph_optimization]
        options.log_severity_level = 3  # errors only; polysense reports what matters itself
        # Idle intra-op threads would spin for a while after each run, stealing the cores that the next
        # stage (preprocessing, another session) needs: end to end 8.0 ms with spinning, 2.6 ms without.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Without the arena, the memory of one large input (10 minutes of audio: +130 MB) goes back once it is
        # done instead of staying reserved for the life of the process; batch-1 latency measured the same.
        options.enable_cpu_mem_arena = False
        available = ort.get_available_providers()
        wants_cuda = settings.device == "cuda" or (settings.device == "auto" and CUDA in available)
        providers = [CUDA, CPU] if wants_cuda and CUDA in available else [CPU]
        try:
            source = model if isinstance(model, bytes) else str(model)
            self.session = ort.InferenceSession(source, options, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types for bad models
            raise BundleError(
                f"{name}: onnxruntime cannot load it ({error}); export the bundle again"
            ) from error
        got = self.session.get_providers()
        self.on_cuda = got[0] == CUDA
        if settings.device == "cuda" and not self.on_cuda:
            reason = (
                "this onnxruntime has no CUDA support (install 'polysense[gpu]' instead of 'polysense[cpu]')"
                if CUDA not in available
                else "the CUDA provider failed to start (CUDA or cuDNN libraries missing or not matching "
                "this onnxruntime-gpu build)"
            )
            warnings.warn(f"{name}: CUDA was asked for but the session runs on CPU: {reason}", stacklevel=3)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._ort = ort

    def signature(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """The graph's inputs and outputs as it declares them (dtype as numpy names them; a symbolic or
        unknown axis as a string)."""

        def specs(args: list) -> list[TensorSpec]:
            return [
                TensorSpec(a.name, _ONNX_TYPES.get(a.type, a.type), tuple(_axis(d) for d in a.shape or ()))
                for a in args
            ]

        return specs(self.session.get_inputs()), specs(self.session.get_outputs())

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def run(self, feeds: dict[str, DeviceArray]) -> list[DeviceArray]:
        """Outputs in graph order: numpy arrays on CPU, OrtValues on the device under CUDA.

        Feeds may be numpy arrays or (under CUDA) OrtValues produced by another session.
        """
        if not self.on_cuda:
            return self.session.run(self.output_names, feeds)
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()


_ONNX_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}


def _axis(dim: int | str | None) -> int | str:
    return dim if isinstance(dim, int) else str(dim or "?")


def to_numpy(value: DeviceArray) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()
