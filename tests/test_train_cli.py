"""`polysense train`: flags generated from TrainOptions, and the command without torch."""

import argparse
import dataclasses
import typing

import pytest
from blocking import run_blocked

INSTALL = "pip install torch==2.13.0 && pip install 'polysense[train]'"


@pytest.fixture(scope="module")
def train_cli():
    pytest.importorskip("torch")
    from polysense.models.training import cli

    return cli


def _option_names() -> list[str]:
    try:
        from polysense.models.training.options import TrainOptions
    except ImportError:
        return []  # no torch: the train_cli fixture skips the tests that use these
    return [f.name for f in dataclasses.fields(TrainOptions)]


def _actions(parser: argparse.ArgumentParser) -> dict:
    return {action.dest: action for action in parser._actions}


def test_every_option_has_a_flag_with_its_comment_as_help(train_cli):
    from polysense.models.training.flags import field_comments
    from polysense.models.training.options import TrainOptions

    comments = field_comments(TrainOptions)
    actions = _actions(train_cli.build_train_parser())
    for field in dataclasses.fields(TrainOptions):
        assert comments.get(field.name), f"TrainOptions.{field.name} has no trailing comment"
        help_text = actions[field.name].help
        assert comments[field.name].replace("%", "%%") in help_text
    assert set(actions) - {f.name for f in dataclasses.fields(TrainOptions)} == {"help", "resume", "nproc"}


def test_no_optional_flags_give_the_dataclass_defaults(train_cli):
    from polysense.models.training.options import TrainOptions

    args = train_cli.build_train_parser().parse_args(["--data", "x", "--out", "y"])
    assert train_cli.options_from_args(args) == TrainOptions(data="x", out="y")
    assert args.resume is False


def test_todays_flag_names_are_kept(train_cli):
    flags = {s for a in train_cli.build_train_parser()._actions for s in a.option_strings}
    expected = (
        "--data --out --modalities --strategy --epochs --pretrain-epochs --finetune-encoders --batch-size --lr "
        "--weight-decay --modality-dropout --aux-loss-weight --patience --seed --device --image-size "
        "--image-width --embed-dim --image-encoder --text-encoder --audio-encoder --fusion --max-text-length --n "
        "--resume --no-progress --pretrained-lr --from-scratch --no-augment --audio-norm-frames --accumulate --nproc "
        "--label-smoothing --keep --solo-epochs --voice-norm --audio-noise"
    )
    assert set(expected.split()) | {"-h", "--help"} == flags


def _non_default(name: str) -> tuple[list[str], object]:
    """Arguments that set field `name` to a value other than its default, and that value."""
    from polysense.models.training.flags import flag_name
    from polysense.models.training.options import TrainOptions, option_choices

    field = next(f for f in dataclasses.fields(TrainOptions) if f.name == name)
    flag, default = flag_name(field), field.default
    kind = typing.get_type_hints(TrainOptions)[name]
    if name == "modalities":
        return [flag, "text, audio"], ("text", "audio")
    if name == "finetune_encoders":  # only valid with the staged strategy
        return [flag, "--strategy", "staged"], True
    if name in option_choices():
        # a field with a single choice (one registered family) can only be set to its default
        value = next((c for c in option_choices()[name] if c != default), default)
        return [flag, value], value
    if kind is bool:
        return [flag], not default
    if kind is int:
        return [flag, str(default + 1)], default + 1
    if kind is float:
        value = default / 2 if default > 0 else 1e-4  # 0 or -1 mean "the family's own"
        return [flag, str(value)], value
    assert kind is str, f"add a value for {name} ({kind}) to this test"
    return [flag, "elsewhere"], "elsewhere"


@pytest.mark.parametrize("name", _option_names())
def test_a_value_on_the_command_line_reaches_the_options(train_cli, name):
    extra, expected = _non_default(name)
    args = train_cli.build_train_parser().parse_args(["--data", "x", "--out", "y", *extra])
    options = train_cli.options_from_args(args)
    assert getattr(options, name) == expected


def test_bad_values_are_refused_by_argparse(train_cli, capsys):
    parser = train_cli.build_train_parser()
    for bad in (["--device", "tpu"], ["--epochs", "many"], ["--fusion", "sum"]):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(["--data", "x", "--out", "y", *bad])
        assert stop.value.code == 2
        assert bad[0] in capsys.readouterr().err


def test_a_field_without_a_comment_is_caught():
    pytest.importorskip("torch")
    from polysense.models.training.flags import add_arguments

    @dataclasses.dataclass(frozen=True)
    class Undocumented:
        documented: int = 1  # has help
        bare: int = 2

    with pytest.raises(TypeError, match="Undocumented.bare has no trailing # comment"):
        add_arguments(argparse.ArgumentParser(), Undocumented)


def test_polysense_train_help_lists_the_generated_flags(train_cli, capsys):
    from polysense.cli.main import main
    from polysense.models.training.flags import flag_name
    from polysense.models.training.options import TrainOptions

    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: polysense train")
    for field in dataclasses.fields(TrainOptions):
        assert flag_name(field) in out
    assert "--no-progress" in out and "--resume" in out and "--n N" in out


def test_polysense_help_lists_train(capsys):
    from polysense.cli.main import main

    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    assert "train a multimodal classifier" in capsys.readouterr().out


def test_other_commands_still_refuse_unknown_arguments(capsys):
    from polysense.cli.main import main

    with pytest.raises(SystemExit) as stop:
        main(["info", "bundle", "--epochs", "3"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --epochs 3" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "--data", "x", "--out", "y"], ["train", "--help"], ["demo"]])
def test_training_commands_without_torch_name_the_install_command(argv):
    result = run_blocked(
        ("torch",),
        f"""
        import sys
        from polysense.cli.main import main
        sys.exit(main({argv!r}))
        """,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: this command needs the training extra")
    assert INSTALL in lines[0]
    assert result.stdout == ""
