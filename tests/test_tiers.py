"""The test tiers hold together: the torch-free tier cannot import torch by a module's top, and what it runs on
(the committed bundles, the split manifest made without training) is what the slow tier makes now."""

import ast
import json
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
HEAVY = ("torch", "onnx", "onnxscript", "polysense.models", "polysense.export")


def _heavy(name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in HEAVY)


def _top_level_imports(tree: ast.Module) -> list[str]:
    """Modules a test module imports at its top, importorskip included."""
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, (ast.Assign, ast.Expr)):
            for call in ast.walk(node):
                if (
                    isinstance(call, ast.Call)
                    and ast.unparse(call.func).endswith("importorskip")
                    and call.args
                    and isinstance(call.args[0], ast.Constant)
                ):
                    names.append(call.args[0].value)
    return names


def _marked_slow(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
        and "slow" in ast.unparse(node.value)
        for node in tree.body
    )


@pytest.mark.parametrize("path", sorted(TESTS.glob("test_*.py")), ids=lambda p: p.name)
def test_a_module_that_imports_torch_at_its_top_is_marked_slow(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    heavy = [name for name in _top_level_imports(tree) if _heavy(name)]
    assert not heavy or _marked_slow(tree), (
        f"{path.name} imports {', '.join(heavy)} at its top: add `pytestmark = pytest.mark.slow` after its "
        "imports, or import it inside the tests that need it (and mark those @pytest.mark.slow)"
    )


def test_the_committed_bundles_are_small_and_load_without_torch(bundle, other_bundle):
    import polysense

    for folder in (bundle, other_bundle):
        assert sum(p.stat().st_size for p in folder.iterdir()) < 2_000_000
        pipe = polysense.Pipeline.load(folder, device="cpu")
        assert pipe.modalities == ("image", "text", "audio")


@pytest.mark.slow
def test_the_split_manifest_is_the_manifest_training_writes(split_manifest, trained_run):
    """The fast tier's test rows are the test split a run on the same data has."""
    from polysense.tools.manifest import read_manifest

    def rows(path):
        return [(r.image, r.text, r.audio, r.label, r.split) for r in read_manifest(path).rows]

    assert rows(split_manifest) == rows(trained_run / "manifest.csv")


@pytest.mark.slow
def test_tiny_bundles_are_current(bundle, exported_bundle):
    """The committed bundle describes itself as export describes a bundle now: same schema version, components
    with the same inputs and outputs, same preprocessing. If not, run `make tiny-bundle` and commit the result."""
    committed = json.loads((bundle / "bundle.json").read_text())
    fresh = json.loads((exported_bundle / "bundle.json").read_text())
    hint = "the committed tiny bundles are out of date: run `make tiny-bundle` and commit tests/assets"
    assert committed["schema_version"] == fresh["schema_version"], hint
    assert set(committed) == set(fresh), hint

    def interface(description):
        return {
            name: (c["inputs"], c["outputs"], c["dynamic_axes"], sorted(set().union(*c["variants"].values())))
            for name, c in description["components"].items()
        }

    assert interface(committed) == interface(fresh), hint
    committed_text = committed["preprocessing"]["text"]
    fresh_text = fresh["preprocessing"]["text"]
    assert set(committed_text) == set(fresh_text), hint
    for modality in ("image", "audio"):
        assert committed["preprocessing"][modality] == fresh["preprocessing"][modality], hint
