"""`polysense train` and `polysense export`: flags generated from the options dataclasses (help in the fields'
metadata), one parser tree, and the commands without torch."""

import argparse
import dataclasses
import subprocess
import sys
import types
import typing

import pytest
from blocking import run_blocked

INSTALL = "pip install torch==2.13.0 && pip install 'polysense[train]'"


@pytest.fixture(scope="module")
def train_cli():
    pytest.importorskip("torch")
    from polysense.models.training import cli

    return cli


@pytest.fixture(scope="module")
def flags():
    """polysense.models.training.flags needs no torch itself, but its package (polysense.models) does."""
    pytest.importorskip("torch")
    from polysense.models.training import flags

    return flags


def _option_names() -> list[str]:
    try:
        from polysense.models.training.options import TrainOptions
    except ImportError:
        return []  # no torch: the train_cli fixture skips the tests that use these
    return [f.name for f in dataclasses.fields(TrainOptions)]


def _actions(parser: argparse.ArgumentParser) -> dict:
    return {action.dest: action for action in parser._actions}


def _command(name: str) -> argparse.ArgumentParser:
    """The `polysense NAME` sub-parser of the real tree, its deferred flags defined."""
    from polysense.cli.main import build_parser

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    parser = commands.choices[name]
    parser.define_arguments()
    return parser


# The options dataclasses whose fields become the flags of a command, and that command's other arguments.
OPTION_COMMANDS = {
    "train": ("polysense.models.training.options:TrainOptions", {"help", "quiet", "resume", "nproc"}),
    "export": ("polysense.export.variants:VariantPolicy", {"help", "quiet", "run_dir", "out", "no_progress"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(OPTION_COMMANDS))
def test_every_option_has_help_in_its_field_metadata_and_a_flag_named_after_it(train_cli, command):
    """The contract a documentation generator relies on: every field of an options dataclass that becomes
    flags has metadata["help"], and its flag is --field-name (or metadata["flag"])."""
    import importlib

    where, others = OPTION_COMMANDS[command]
    module, name = where.split(":")
    cls = getattr(importlib.import_module(module), name)
    actions = _actions(_command(command))
    for field in dataclasses.fields(cls):
        help_text = field.metadata.get("help")
        assert isinstance(help_text, str) and help_text.strip(), f"{cls.__name__}.{field.name} has no help"
        flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
        assert actions[field.name].option_strings == [flag]
        assert help_text.replace("%", "%%") in actions[field.name].help
    # A flag of neither kind would be one this test (and the generated docs) do not know.
    assert set(actions) == {f.name for f in dataclasses.fields(cls)} | others


@pytest.mark.slow
def test_no_optional_flags_give_the_dataclass_defaults(train_cli):
    from polysense.models.training.options import TrainOptions

    args = train_cli.build_train_parser().parse_args(["--data", "x", "--out", "y"])
    assert train_cli.options_from_args(args) == TrainOptions(data="x", out="y")
    assert args.resume is False


@pytest.mark.slow
def test_todays_flag_names_are_kept(train_cli):
    flags = {s for a in train_cli.build_train_parser()._actions for s in a.option_strings}
    expected = (
        "--data --out --modalities --strategy --epochs --pretrain-epochs --finetune-encoders --batch-size --lr "
        "--weight-decay --modality-dropout --aux-loss-weight --patience --seed --device --image-size "
        "--image-width --embed-dim --image-encoder --text-encoder --audio-encoder --fusion --max-text-length --n "
        "--resume --no-progress --pretrained-lr --from-scratch --no-augment --audio-norm-frames --accumulate --nproc "
        "--label-smoothing --keep --solo-epochs --voice-norm --audio-noise --allow-leakage --dp-epsilon --dp-delta "
        "--dp-max-grad-norm --dp-accountant"
    )
    assert set(expected.split()) | {"-h", "--help"} == flags


def _non_default(name: str) -> tuple[list[str], object]:
    """Arguments that set field `name` to a value other than its default, and that value."""
    from polysense.models.training.flags import flag_name
    from polysense.models.training.options import TrainOptions, option_choices

    field = next(f for f in dataclasses.fields(TrainOptions) if f.name == name)
    flag, default = flag_name(field), field.default
    kind = typing.get_type_hints(TrainOptions)[name]
    if default is None and typing.get_origin(kind) in (typing.Union, types.UnionType):
        (kind,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]  # None: the families decide
    if name == "modalities":
        return [flag, "text, audio"], ("text", "audio")
    if name == "finetune_encoders":  # only valid with the staged strategy
        return [flag, "--strategy", "staged"], True
    if name == "pretrain_epochs":  # likewise
        return [flag, "2", "--strategy", "staged"], 2
    if name in option_choices():
        # a field with a single choice (one registered family) can only be set to its default
        value = next((c for c in option_choices()[name] if c != default), default)
        return [flag, value], value
    if kind is bool:
        return [flag], not default
    if kind is int:
        value = 5 if default is None else default + 1
        return [flag, str(value)], value
    if kind is float:
        value = 1e-4 if default is None else default / 2
        return [flag, str(value)], value
    assert kind is str, f"add a value for {name} ({kind}) to this test"
    return [flag, "elsewhere"], "elsewhere"


@pytest.mark.slow
@pytest.mark.parametrize("name", _option_names())
def test_a_value_on_the_command_line_reaches_the_options(train_cli, name):
    extra, expected = _non_default(name)
    if name.startswith("dp_") and name != "dp_epsilon":  # the other DP options apply only with --dp-epsilon
        extra = [*extra, "--dp-epsilon", "1"]
    args = train_cli.build_train_parser().parse_args(["--data", "x", "--out", "y", *extra])
    options = train_cli.options_from_args(args)
    assert getattr(options, name) == expected


@pytest.mark.slow
def test_bad_values_are_refused_by_argparse(train_cli, capsys):
    parser = train_cli.build_train_parser()
    for bad in (["--device", "tpu"], ["--epochs", "many"], ["--fusion", "sum"]):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(["--data", "x", "--out", "y", *bad])
        assert stop.value.code == 2
        assert bad[0] in capsys.readouterr().err


@pytest.mark.slow
def test_a_field_without_help_is_caught(flags):
    add_arguments, option, undocumented_fields = flags.add_arguments, flags.option, flags.undocumented_fields

    @dataclasses.dataclass(frozen=True)
    class Undocumented:
        documented: int = option(1, help="has help")
        blank: int = option(2, help=" ")
        bare: int = 3

    assert undocumented_fields(Undocumented) == ["blank", "bare"]
    with pytest.raises(TypeError, match="Undocumented.blank has no help text"):
        add_arguments(argparse.ArgumentParser(), Undocumented)


@pytest.mark.slow
def test_a_bool_that_defaults_to_true_needs_a_no_flag(flags):
    add_arguments, option = flags.add_arguments, flags.option

    @dataclasses.dataclass(frozen=True)
    class Switch:
        colour: bool = option(True, help="colours")

    with pytest.raises(TypeError, match='flag="--no-colour"'):
        add_arguments(argparse.ArgumentParser(), Switch)


@pytest.mark.slow
def test_flags_need_no_source_code(flags):
    """Help comes from field metadata, not from the source: a class made at run time (no source) works."""
    add_arguments, option, options_from_args = flags.add_arguments, flags.option, flags.options_from_args

    made = dataclasses.make_dataclass(
        "Made",
        [
            ("size", int, option(help="how big")),
            ("ratio", float | None, option(None, help="a share; default: decided later")),
            ("fast", bool, option(True, help="go fast", flag="--no-fast")),
        ],
        frozen=True,
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser, made)
    assert options_from_args(parser.parse_args(["--size", "3", "--no-fast"]), made) == made(3, None, False)
    assert "--ratio RATIO  a share; default: decided later\n" in parser.format_help().replace("\n   ", "")


@pytest.mark.slow
def test_given_flags_are_noted_and_give_back_the_same_arguments(flags):
    option, given = flags.option, flags.given_options

    @dataclasses.dataclass(frozen=True)
    class Options:
        name: str = option(help="a name")
        sizes: tuple[int, ...] = option((1, 2), help="sizes")
        rate: float = option(0.5, help="a rate")
        seed: int | None = option(None, help="default: random")
        on: bool = option(True, help="on", flag="--no-on")
        loud: bool = option(False, help="loud")

    parser = argparse.ArgumentParser()
    flags.add_arguments(parser, Options)
    args = parser.parse_args(["--name=-x", "--sizes", "3, 4", "--rate=-1e-05", "--no-on"])
    assert given(args) == {"name", "sizes", "rate", "on"}
    again = parser.parse_args(flags.arguments_for(Options, {n: getattr(args, n) for n in given(args)}))
    parsed = flags.options_from_args(args, Options)
    assert flags.options_from_args(again, Options) == parsed == Options("-x", (3, 4), -1e-5, None, False)
    assert given(again) == given(args)
    assert given(parser.parse_args(["--name", "y"])) == {"name"}


@pytest.mark.slow
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


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "x", "--out", "y"],
        ["train", "--help"],
        ["--quiet", "train", "--data", "x", "--out", "y", "--quiet"],
        ["export", "run", "--out", "b"],
        ["export", "--help"],
        ["demo"],
    ],
)
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


@pytest.mark.slow
def test_the_train_and_export_commands_are_one_tree_with_the_rest(train_cli, capsys):
    """Their sub-parsers are those of `polysense`: defined on first use, formatted like any other, and their
    errors name the command."""
    from polysense.cli.main import build_parser, main

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert "--batch-size BATCH_SIZE" in commands.choices["train"].format_help()
    assert "--max-accuracy-drop" in commands.choices["export"].format_help()
    with pytest.raises(SystemExit) as stop:
        main(["train", "--data", "x", "--out", "y", "--bogus", "3"])
    assert stop.value.code == 2 and "unrecognized arguments: --bogus 3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["train", "--out", "y"])
    assert stop.value.code == 2
    assert "polysense train: error: the following arguments are required: --data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["--quiet", "train", "--quiet", "--help"])  # the global flag, before and after the command
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("usage: polysense train")


@pytest.mark.slow
def test_nproc_starts_the_processes_with_the_flags_given(train_cli, monkeypatch, tmp_path):
    """`polysense train --nproc N` starts `polysense train` again under torchrun: with the options given on
    the command line (not those left at their defaults, so a --resume keeps the stored ones), without --nproc,
    and with progress off when this one has it off (stderr is no terminal here)."""
    from polysense.cli.main import main

    launched = []
    monkeypatch.setattr(train_cli, "launch", lambda argv, n: launched.append((argv, n)) or 0)
    out = tmp_path / "run"
    argv = [
        "train",
        "--data",
        "builtin",
        "--out",
        str(out),
        "--nproc",
        "2",
        "--lr",
        "0.01",
        "--modalities",
        "text",
    ]
    assert main([*argv, "--from-scratch"]) == 0
    expected = [
        *("--data", "builtin", "--out", str(out), "--modalities", "text", "--lr", "0.01"),
        *("--from-scratch", "--no-progress"),
    ]
    assert launched == [(expected, 2)]
    # The processes parse those arguments into the same options, and the same flags count as given.
    parser = train_cli.build_train_parser()
    here = parser.parse_args([*argv[1:], "--from-scratch", "--no-progress"])
    there = parser.parse_args(expected)
    assert train_cli.options_from_args(there) == train_cli.options_from_args(here)
    assert train_cli.relaunch_arguments(there, {"epochs", "progress"}) == ["--no-progress"]
    there.resume = True
    assert train_cli.relaunch_arguments(there, {"out"}) == ["--out", str(out), "--resume"]
    there.out = "-odd"  # a value that reads as a flag is given with =
    assert train_cli.relaunch_arguments(there, {"out"}) == ["--out=-odd", "--resume"]


@pytest.mark.slow
def test_nproc_must_be_positive(train_cli, capsys):
    from polysense.cli.main import main

    assert main(["train", "--data", "x", "--out", "y", "--nproc", "0"]) == 2
    assert capsys.readouterr().err == "error: --nproc must be at least 1, got 0\n"


@pytest.mark.parametrize("argv", [["--help"], ["predict", "--help"], ["info", "--help"]])
def test_help_and_runtime_commands_load_no_training_code(argv):
    """The train and export sub-parsers are in the tree, but their flags (and torch) load only when used."""
    code = f"""
import sys
from polysense.cli.main import main
try:
    main({argv!r})
except SystemExit as stop:
    assert stop.code == 0, stop.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx") or m.startswith("polysense.models"))
print("loaded:", heavy, file=sys.stderr)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().endswith("loaded: []")
    assert result.stdout.startswith("usage: polysense")


def test_the_help_of_pretrained_defaults_names_every_pretrained_family(train_cli):
    # Issue 43: --epochs, --pretrained-lr and --from-scratch named MiniLM alone.
    from polysense.models.registry import ENCODERS, family_defaults
    from polysense.models.training.options import TrainOptions

    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainOptions)}
    pretrained = [(m, n) for m in ENCODERS for n in ENCODERS[m] if "epochs" in family_defaults(m, n)]
    assert len(pretrained) >= 3  # minilm-l6; efficientnet-lite0 for images and for audio
    for modality, name in pretrained:
        defaults = family_defaults(modality, name)
        assert name in helps["from_scratch"] and name in helps["pretrained_lr"], (modality, name)
        assert f"{defaults['epochs']}" in helps["epochs"] and name in helps["epochs"], (modality, name)


@pytest.mark.slow
def test_demo_on_an_existing_folder_says_to_remove_it_not_to_resume(train_cli, tmp_path, capsys):
    # Issue 43: it said "pass --resume", which demo does not take.
    from polysense.cli.main import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    assert main(["demo", "--out", str(tmp_path / "run")]) == 2  # before anything is written
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {tmp_path / 'run'} exists") and "--resume" not in err
    assert f"rm -rf {tmp_path / 'run'}" in err
