import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("torch", "onnx", "onnxscript", "polysense.models", "polysense.export")


def test_runtime_imports_neither_torch_nor_onnx():
    runtime = Path(__file__).resolve().parents[1] / "runtime"
    modules = ", ".join(f"polysense.{p.stem}" for p in sorted(runtime.glob("*.py")) if p.stem != "__init__")
    code = (
        f"import sys, polysense, {modules}\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} or m in {FORBIDDEN!r}]\n"
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_runtime_sources_do_not_import_training_code():
    runtime = Path(__file__).resolve().parents[1] / "runtime"
    for source in runtime.glob("**/*.py"):
        for line in source.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                module = stripped.split()[1]
                assert module.split(".")[0] not in ("torch", "onnx", "onnxscript"), f"{source}: {line}"
                assert not module.startswith(("polysense.models", "polysense.export")), f"{source}: {line}"
