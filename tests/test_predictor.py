"""Pipeline and Ensemble both satisfy polysense.Predictor, member by member, with compatible signatures.

Structural, from the classes alone (no bundle is loaded): every member the protocols declare exists on each
class, as a property where the protocol has a property, and as a method whose parameters accept every call the
protocol allows. `make typecheck` proves the same with the full types.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import polysense
from polysense.inference.ensemble.ensemble import Ensemble
from polysense.inference.ensemble.results import EnsembleEmbeddings, EnsemblePrepared
from polysense.inference.ensemble.stream import EnsembleAudioStream
from polysense.inference.fusion import Embeddings, Prepared
from polysense.inference.pipeline import Pipeline
from polysense.inference.predictor import LiveAudioStream, Predictor, PreparedSample, SampleEmbeddings
from polysense.inference.streaming import AudioStream

POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def members(protocol: type) -> dict[str, object]:
    """The members a protocol declares: its public names, and __len__ where it has one."""
    return {
        name: value
        for name, value in vars(protocol).items()
        if isinstance(value, property)
        or (callable(value) and (not name.startswith("_") or name == "__len__"))
    }


def check_parameters(expected: inspect.Signature, got: inspect.Signature, where: str) -> None:
    """`got` accepts every call that `expected` allows: the same parameters by name, kind and default, and any
    extra ones optional (a default, or *args / **kwargs)."""
    declared = expected.parameters
    actual = got.parameters
    for name, parameter in declared.items():
        assert name in actual, f"{where}: no parameter {name!r}"
        own = actual[name]
        same_kind = own.kind == parameter.kind or (
            parameter.kind in POSITIONAL and own.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
        )
        assert same_kind, (
            f"{where}: {name!r} is {own.kind.description}, the protocol has {parameter.kind.description}"
        )
        assert own.default == parameter.default, (
            f"{where}: {name!r} defaults to {own.default!r}, not {parameter.default!r}"
        )
    assert [n for n in actual if n in declared] == list(declared), f"{where}: parameters in another order"
    for name, own in actual.items():
        if name not in declared:
            optional = own.default is not inspect.Parameter.empty or own.kind in (
                inspect.Parameter.VAR_POSITIONAL,
                inspect.Parameter.VAR_KEYWORD,
            )
            assert optional, f"{where}: extra parameter {name!r} has no default"


def check_satisfies(cls: type, protocol: type, instance_attributes: tuple[str, ...] = ()) -> None:
    """`cls` has every member of `protocol`; `instance_attributes`: data members `cls` sets on its instances
    (where the protocol declares a read-only property), which a class alone cannot show."""
    for name, declared in members(protocol).items():
        where = f"{cls.__name__}.{name}"
        if isinstance(declared, property):
            if name in instance_attributes:
                continue
            fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
            assert isinstance(getattr(cls, name, None), property) or name in fields, (
                f"{where}: no such property"
            )
            continue
        own = getattr(cls, name, None)
        assert callable(own) and not isinstance(own, property), f"{where}: no such method"
        check_parameters(inspect.signature(declared), inspect.signature(own), where)


@pytest.mark.parametrize("cls", [Pipeline, Ensemble])
def test_pipeline_and_ensemble_are_predictors(cls: type) -> None:
    check_satisfies(cls, Predictor)


@pytest.mark.parametrize(
    ("cls", "protocol"),
    [
        (Prepared, PreparedSample),
        (EnsemblePrepared, PreparedSample),
        (Embeddings, SampleEmbeddings),
        (EnsembleEmbeddings, SampleEmbeddings),
    ],
)
def test_prepared_samples_and_embeddings_match_their_protocols(cls: type, protocol: type) -> None:
    check_satisfies(cls, protocol)


def test_audio_streams_are_live_audio_streams() -> None:
    # An AudioStream sets these in __init__ / reset; an EnsembleAudioStream has them as properties.
    check_satisfies(
        AudioStream,
        LiveAudioStream,
        instance_attributes=("finished", "frames_processed", "model_rate", "embedding"),
    )
    check_satisfies(EnsembleAudioStream, LiveAudioStream)


def test_the_protocol_declares_what_callers_use() -> None:
    declared = set(members(Predictor))
    assert {"labels", "modalities", "limits", "predict", "predict_batch", "prepare", "embed"} <= declared
    assert {"audio_stream", "voice_profile", "adaptive_voice", "description"} <= declared
    assert "video_stream" not in declared  # a Pipeline's alone


def test_check_parameters_refuses_an_incompatible_signature() -> None:
    def declared(self, samples, *, voice=None): ...

    def renamed(self, batch, *, voice=None): ...

    def required_extra(self, samples, extra, *, voice=None): ...

    def other_default(self, samples, *, voice=1): ...

    for wrong in (renamed, required_extra, other_default):
        with pytest.raises(AssertionError):
            check_parameters(inspect.signature(declared), inspect.signature(wrong), wrong.__name__)
    check_parameters(inspect.signature(declared), inspect.signature(declared), "itself")


def test_polysense_exports_predictor() -> None:
    assert polysense.Predictor is Predictor
    assert "Predictor" in polysense.__all__
