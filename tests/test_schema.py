"""The bundle description is validated where it is read: every malformed field is a BundleError naming it."""

import copy
import json
import shutil

import pytest

pytest.importorskip("onnxruntime")

from polysense.bundle.reader import open_bundle  # noqa: E402
from polysense.bundle.schema import DESCRIPTION_FILE, BundleDescription  # noqa: E402
from polysense.errors import BundleError  # noqa: E402


@pytest.fixture(scope="module")
def described(bundle):
    return open_bundle(bundle).description.to_dict()


def _set(data, path, value):
    *parents, last = path
    for key in parents:
        data = data[key]
    if value is KeyError:
        del data[last]
    else:
        data[last] = value


AUDIO, VARIANT = ("components", "audio_encoder"), ("components", "image_encoder", "variants", "fp32")
BROKEN = [
    (("labels",), KeyError, "lacks 'labels'"),
    (("labels",), "a,b", "labels should be list"),
    (("embed_dim",), True, "embed_dim should be int, got a boolean"),
    (("components", "fusion"), KeyError, "need image_encoder, text_encoder, audio_encoder, fusion"),
    ((*VARIANT, "file"), "../elsewhere.onnx", "not a plain file name"),
    ((*VARIANT, "bytes"), "12", "bytes should be int"),
    (("components", "image_encoder", "variants", "int4"), {}, "unknown precision 'int4'"),
    (("components", "image_encoder", "variants", "fp32"), KeyError, "has no fp32 variant"),
    ((*AUDIO, "dynamic_axes", "frames"), {"time": "frames"}, "axes must be whole numbers"),
    (("preprocessing", "text", "tokenizer"), "/etc/passwd", "not a plain file name"),
    (("preprocessing", "smell"), {}, "unknown modality 'smell'"),
    (("preprocessing", "audio"), KeyError, "lack audio"),
    (("streaming", "audio", "state", 0, "batch_axis"), 7, "does not index a size-1 axis"),
    (("streaming", "audio", "state", 0, "name"), "cache_of_nothing", "no state tensor 'cache_of_nothing'"),
    (("streaming",), {}, "streaming state must be there exactly when a streaming encoder is"),
    # an encoder must take what its preprocessing gives: token ids, or (a frozen text graph's) vectors
    (
        ("components", "text_encoder", "inputs", 0, "name"),
        "vectors",
        "takes vectors, mask, but its preprocessing gives ids, mask",
    ),
    (
        ("preprocessing", "text", "graphs"),
        [{"role": "encoder", "file": "t.onnx", "sha256": "0", "package": "", "version": "", "source": ""}],
        "takes ids, but its preprocessing gives vectors",
    ),
    (
        ("preprocessing", "text", "graphs"),
        [{"role": "mel", "file": "t.onnx", "sha256": "0", "package": "", "version": "", "source": ""}],
        "a text front end runs one graph, its encoder",
    ),
    (
        ("preprocessing", "audio", "front"),
        "frozen-windows",
        "the frozen-windows front end runs these graphs: encoder",
    ),
    (("preprocessing", "audio", "n_mels"), 513, "n_mels"),
]


@pytest.mark.parametrize("path, value, message", BROKEN, ids=[m for _, _, m in BROKEN])
def test_malformed_descriptions_are_refused_with_the_field_named(described, path, value, message):
    data = copy.deepcopy(described)
    _set(data, path, value)
    with pytest.raises(BundleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BundleDescription.from_dict(data)


def test_a_deeply_nested_or_non_object_description_is_a_bundle_error(bundle, described, tmp_path):
    copy_dir = tmp_path / "b"
    shutil.copytree(bundle, copy_dir)
    for text in ("[" * 100_000, json.dumps([described]), "null"):
        (copy_dir / DESCRIPTION_FILE).write_text(text)
        with pytest.raises(BundleError, match="export it again"):
            open_bundle(copy_dir)
