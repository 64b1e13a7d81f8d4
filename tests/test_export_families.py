"""Every registered encoder family and fusion head exports, and its graph computes what torch computes.

Built from randomly initialised models (no training), so a family that cannot export cannot land: this is how
`--text-encoder transformer` and `--fusion transformer` once failed only after a whole training run.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from polysense.export.components import components  # noqa: E402
from polysense.export.parity import TOLERANCE, check_component, export_component  # noqa: E402
from polysense.modalities import MODALITIES  # noqa: E402
from polysense.models import ENCODERS, FUSIONS, ModelConfig, MultimodalClassifier  # noqa: E402

# Each case varies one family or the fusion over the default (from-scratch, small) families, so that a case
# costs what its own family costs.
DEFAULTS = {m: ModelConfig.__dataclass_fields__[f"{m}_family"].default for m in MODALITIES}
CASES = [
    *[
        ({**DEFAULTS, modality: family}, "concat")
        for modality in MODALITIES
        for family in ENCODERS[modality]
        if family != DEFAULTS[modality]
    ],
    *[(DEFAULTS, fusion) for fusion in FUSIONS],
]


@pytest.mark.parametrize(
    "families, fusion", CASES, ids=[f"{'-'.join(f.values())}+{fusion}" for f, fusion in CASES]
)
def test_every_family_and_fusion_exports_with_parity(families, fusion, tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(
        modalities=MODALITIES,
        num_classes=5,
        embed_dim=16,
        image_width=8,
        vocab_size=40,
        fusion=fusion,
        **{f"{m}_family": families[m] for m in MODALITIES},
    )
    model = MultimodalClassifier(config).eval()
    for component in components(model, image_size=32):
        path = tmp_path / f"{component.name}.onnx"
        export_component(component, path)
        assert check_component(component, path, []) <= TOLERANCE, component.name
