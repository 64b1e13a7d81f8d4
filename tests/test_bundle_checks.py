"""A bundle is refused at Pipeline.load when its graphs are not the ones its description promises, when a file
leads outside the folder, or when any field of the description is removed or mistyped."""

import copy
import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

import polysense  # noqa: E402
from polysense.bundle.reader import open_bundle, sha256_file  # noqa: E402
from polysense.bundle.schema import DESCRIPTION_FILE  # noqa: E402
from polysense.cli.main import main  # noqa: E402
from polysense.errors import BundleError  # noqa: E402


def _description(folder):
    return json.loads((folder / DESCRIPTION_FILE).read_text())


def _rewrite(folder, description):
    """Write the description back with each variant's hash and size made to match its file again."""
    for component in description["components"].values():
        for variant in component["variants"].values():
            path = folder / variant["file"]
            if path.is_file():
                variant.update(sha256=sha256_file(path), bytes=path.stat().st_size)
    text = description["preprocessing"].get("text")
    if text:
        text["sha256"] = sha256_file(folder / text["tokenizer"])
    (folder / DESCRIPTION_FILE).write_text(json.dumps(description))


@pytest.mark.parametrize(
    "target, source, message",
    [
        ("image_encoder", "text_encoder", r"inputs are \['ids', 'mask'\]"),
        ("text_encoder", "image_encoder", r"inputs are \['image'\]"),
        ("fusion", "image_encoder", r"inputs are \['image'\]"),
        ("audio_encoder", "text_encoder", r"inputs are \['ids', 'mask'\]"),
    ],
)
def test_a_swapped_component_is_refused_at_load(copied_bundle, target, source, message):
    shutil.copyfile(copied_bundle / f"{source}.fp32.onnx", copied_bundle / f"{target}.fp32.onnx")
    _rewrite(
        copied_bundle, _description(copied_bundle)
    )  # the hashes vouch for the swapped file: only the graph check is left
    with pytest.raises(BundleError, match=message + r".*export the bundle again"):
        polysense.Pipeline.load(copied_bundle, precision="fp32")


def _edit(path, value):
    def edit(description):
        *parents, last = path
        node = description
        for key in parents:
            node = node[key]
        node[last] = value(node[last]) if callable(value) else value

    return edit


EDITS = {
    "a label fewer than the fusion outputs": (
        _edit(("labels",), lambda labels: labels[:-1]),
        r"output has shape \['batch', 12\], but its 11 labels need \[batch, 11\]: one logit per label",
    ),
    "fusion output size edited to match": (
        lambda d: (
            d.__setitem__("labels", d["labels"][:-1]),
            d["components"]["fusion"]["outputs"][0].__setitem__("shape", ["batch", len(d["labels"])]),
        ),
        "output logits has size .* on axis 1",
    ),
    "embed_dim": (_edit(("embed_dim",), lambda dim: dim + 1), r"needs \d+ \(embed_dim\)"),
    "an input dtype": (
        _edit(("components", "image_encoder", "inputs", 0, "dtype"), "float16"),
        "input image is float32 of rank 4, bundle.json says float16",
    ),
    "an input rank": (
        _edit(("components", "image_encoder", "inputs", 0, "shape"), ["batch", 3, 64]),
        "rank 4, bundle.json says float32 of rank 3",
    ),
    "a state shape": (
        _edit(("streaming", "audio", "state", 0, "shape"), lambda shape: [*shape[:-1], shape[-1] + 1]),
        "state tensor conv1_cache has size",
    ),
    "an output name": (
        _edit(("components", "text_encoder", "outputs", 0, "name"), "vector"),
        r"outputs are \['embedding'\], bundle.json lists \['vector'\]",
    ),
}


@pytest.mark.parametrize("name", EDITS)
def test_a_description_that_does_not_match_its_graphs_is_refused(copied_bundle, name):
    edit, message = EDITS[name]
    description = _description(copied_bundle)
    edit(description)
    _rewrite(copied_bundle, description)
    with pytest.raises(BundleError, match=message):
        polysense.Pipeline.load(copied_bundle, precision="fp32")


def test_duplicate_labels_are_refused(copied_bundle, capsys):
    """Eleven names for twelve logits: the probabilities under the repeated name would overwrite each other."""
    description = _description(copied_bundle)
    description["labels"][-1] = description["labels"][0]
    _rewrite(copied_bundle, description)
    message = f"label '{description['labels'][0]}' is listed 2 times; .*every label must be different"
    with pytest.raises(BundleError, match=message):
        polysense.Pipeline.load(copied_bundle, precision="fp32")
    assert main(["info", str(copied_bundle)]) == 2
    assert capsys.readouterr().err.count("error:") == 1


@pytest.mark.parametrize("shape", [["batch", 11], ["batch", "classes"], ["batch", 1, 12], []])
def test_a_fusion_output_that_cannot_map_onto_the_labels_is_refused_before_any_graph_is_read(
    copied_bundle, shape
):
    """Checked in the description itself, so `open_bundle` (what `polysense info` and the tools read) refuses
    it too, not only a Pipeline once it has its sessions."""
    description = _description(copied_bundle)
    description["components"]["fusion"]["outputs"][0]["shape"] = shape
    _rewrite(copied_bundle, description)
    with pytest.raises(BundleError, match=r"fusion head's output has shape .* need \[batch, 12\]"):
        open_bundle(copied_bundle)


def _logits_cut_to_eleven(onnx, path, declared="classes"):
    """Rewrite the fusion graph at `path` so that it returns 11 logits where its description promises 12: a
    Slice whose end comes from the data (max(mask) + 10), which no shape inference can fix, so the graph
    declares whatever it likes for that axis: [batch, `declared`]."""
    model = onnx.load(path)
    graph, helper = model.graph, onnx.helper
    for node in graph.node:
        node.output[:] = ["logits_all" if name == "logits" else name for name in node.output]
    constant = lambda name, values: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, onnx.TensorProto.INT64, [1], values)
    )
    graph.node.extend(
        [
            constant("one_axis", [1]),
            constant("start", [0]),
            constant("ten", [10]),
            helper.make_node("ReduceMax", ["mask"], ["mask_max"], keepdims=1),
            helper.make_node("Reshape", ["mask_max", "one_axis"], ["mask_max_1d"]),
            helper.make_node("Cast", ["mask_max_1d"], ["present"], to=onnx.TensorProto.INT64),
            helper.make_node("Add", ["present", "ten"], ["end"]),
            helper.make_node("Slice", ["logits_all", "start", "end", "one_axis"], ["logits"]),
        ]
    )
    axis = graph.output[0].type.tensor_type.shape.dim[1]
    if isinstance(declared, int):
        axis.dim_value = declared
    else:
        axis.dim_param = declared
    onnx.save(model, path)


@pytest.mark.slow  # rewrites the graph with onnx
def test_a_fusion_graph_without_a_fixed_number_of_logits_is_refused(copied_bundle, capsys):
    """The description says [batch, 12] and the graph [batch, "classes"]: only the description's size was
    compared with the labels, so the graph loaded and answered 11 probabilities under the first 11 of its 12
    labels, the last one never scored."""
    onnx = pytest.importorskip("onnx")
    _logits_cut_to_eleven(onnx, copied_bundle / "fusion.fp32.onnx")
    _rewrite(
        copied_bundle, _description(copied_bundle)
    )  # the hashes vouch for it: only the graph check is left
    with pytest.raises(BundleError, match="output logits has 'classes' values per sample, not a fixed 12"):
        polysense.Pipeline.load(copied_bundle, device="cpu", precision="fp32")


@pytest.mark.slow  # rewrites the graph with onnx
def test_a_fusion_graph_returning_other_than_it_declares_is_refused_when_it_does(copied_bundle):
    """The graph declares [batch, 12] and returns 11 logits (onnxruntime only logs a warning): every load check
    passes, so the logits' shape is checked at each run, before any probability is named."""
    onnx = pytest.importorskip("onnx")
    _logits_cut_to_eleven(onnx, copied_bundle / "fusion.fp32.onnx", declared=12)
    _rewrite(copied_bundle, _description(copied_bundle))
    pipe = polysense.Pipeline.load(copied_bundle, device="cpu", precision="fp32")
    with pytest.raises(BundleError, match=r"logits of shape \(1, 11\), not one per label \(1, 12\)"):
        pipe.predict(text="a red circle")


def test_a_file_linking_outside_the_bundle_is_refused(copied_bundle, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copyfile(copied_bundle / "tokenizer.json", outside)
    (copied_bundle / "tokenizer.json").unlink()
    os.symlink(outside, copied_bundle / "tokenizer.json")  # same bytes, same hash: only the location is wrong
    with pytest.raises(BundleError, match="outside the bundle folder"):
        polysense.Pipeline.load(copied_bundle)
    (copied_bundle / "tokenizer.json").unlink()
    os.symlink(
        copied_bundle / DESCRIPTION_FILE, copied_bundle / "tokenizer.json"
    )  # inside: allowed, then hash-checked
    with pytest.raises(BundleError, match="tokenizer.json does not match its sha256"):
        polysense.Pipeline.load(copied_bundle)


def test_the_bytes_handed_to_onnxruntime_are_the_bytes_hashed(copied_bundle, monkeypatch):
    """Each used file is read once: altering it after the check cannot reach onnxruntime."""
    from polysense.bundle import reader as bundle_module

    reads = []
    original = bundle_module.Bundle.read

    def counting_read(self, name):
        reads.append(name)
        return original(self, name)

    monkeypatch.setattr(bundle_module.Bundle, "read", counting_read)
    opened = []
    real_open, real_read_bytes = open, Path.read_bytes

    def tracking_open(file, *args, **kwargs):
        opened.append(os.path.basename(str(file)))
        return real_open(file, *args, **kwargs)

    def tracking_read_bytes(path):
        opened.append(path.name)
        return real_read_bytes(path)

    monkeypatch.setattr(bundle_module, "open", tracking_open, raising=False)  # how sha256_file reads
    monkeypatch.setattr(Path, "read_bytes", tracking_read_bytes)
    pipe = polysense.Pipeline.load(copied_bundle, device="cpu")
    used = [pipe.description.component(n).variant(p).file for n, p in pipe.precisions.items()]
    assert sorted(reads) == sorted([*used, "tokenizer.json"])
    for name, _ in pipe.description.files():
        assert opened.count(name) == 1, f"{name} opened {opened.count(name)} times"


def _paths(node, prefix=()):
    """Every key path of the description, except inside the free-form metrics, producer and measurements."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return
    for key, value in items:
        path = (*prefix, key)
        if key in ("metrics", "producer", "measurements"):
            yield path
            continue
        yield path
        yield from _paths(value, path)


def _mistyped(value):
    if isinstance(value, str):
        return 7
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "x"
    return "7"


def test_every_field_removed_or_mistyped_is_refused_or_harmless(copied_bundle, capsys):
    """Each field of the description removed, then mistyped: Pipeline.load raises BundleError or, for an
    optional field, loads; `polysense info` prints one error line or the description; nothing else escapes."""
    original = _description(copied_bundle)
    outcomes = {"refused": 0, "loaded": 0}
    for path in list(_paths(original)):
        for change in ("remove", "mistype"):
            description = copy.deepcopy(original)
            *parents, last = path
            node = description
            for key in parents:
                node = node[key]
            if change == "remove":
                if isinstance(node, list):
                    continue  # removing a list item shifts the others: covered by the checks above
                del node[last]
            else:
                node[last] = _mistyped(node[last])
            (copied_bundle / DESCRIPTION_FILE).write_text(json.dumps(description))
            try:
                polysense.Pipeline.load(copied_bundle, device="cpu")
                outcomes["loaded"] += 1
            except BundleError:
                outcomes["refused"] += 1
            code = main(["info", str(copied_bundle)])
            assert code in (0, 2), (path, change)
            capsys.readouterr()
    assert outcomes["refused"] > 100
