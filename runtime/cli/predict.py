"""The runtime commands on one bundle: `polysense predict` (one sample, or many with --data), `eval` and
`stream`. They share --device, --precision, --threads and --json."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from polysense.bundle.schema import PRECISIONS
from polysense.errors import ConfigError
from polysense.inference.sessions import DEVICES
from polysense.limits import DEFAULT_LIMITS, Limits
from polysense.modalities import MODALITIES, SPECS
from polysense.tools.manifest import SPLITS

if TYPE_CHECKING:  # each command loads the inference code when it runs, not when the parser is built
    from polysense.inference.pipeline import Pipeline
    from polysense.inference.predictor import AnyPredictor


DEVICE_HELP = "where the models run; auto: CUDA where this onnxruntime has it, else the CPU"


class _Once(argparse.Action):
    """An option that may be given once: a second --image would otherwise silently replace the first."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice; one prediction takes one {self.dest}")
        setattr(namespace, self.dest, values)


def _bundle_command(
    commands: argparse._SubParsersAction, name: str, help: str, json_help: str, ensemble: bool = True
) -> argparse.ArgumentParser:
    """A runtime command on one bundle (or, with `ensemble`, one or more: an ensemble): BUNDLE, --device,
    --precision, --threads and --json (what it prints as JSON differs)."""
    command = commands.add_parser(name, help=help)
    if ensemble:
        command.add_argument(
            "bundle",
            nargs="+",
            metavar="BUNDLE",
            help="bundle folder (what `polysense export` writes); several: an ensemble, their probabilities "
            "averaged",
        )
    else:
        command.add_argument("bundle", help="bundle folder (what `polysense export` writes)")
    command.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    command.add_argument(
        "--precision",
        choices=("auto", *PRECISIONS),
        default="auto",
        help="variant per component (default auto)",
    )
    command.add_argument(
        "--threads",
        type=non_negative,
        default=0,
        help="onnxruntime threads per model run (default 0: one per core)",
    )
    command.add_argument("--json", action="store_true", help=json_help)
    add_trusted_key(command)
    return command


def add_trusted_key(
    command: argparse.ArgumentParser,
    help: str = "refuse a bundle unless it is signed by this public key (`polysense bundle sign`; repeatable)",
) -> None:
    command.add_argument("--trusted-key", action="append", metavar="KEY.pub", help=help)


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def load_model(args: argparse.Namespace) -> AnyPredictor:
    """The Pipeline (or, for several bundles, the Ensemble) the runtime commands' common flags describe."""
    from polysense.inference.ensemble.ensemble import Ensemble

    if isinstance(args.bundle, str):
        return load_pipeline(args, args.bundle)
    if len(args.bundle) == 1:
        return load_pipeline(args, args.bundle[0])
    return Ensemble.load(args.bundle, **_load_options(args))


def _load_options(args: argparse.Namespace) -> dict:
    """Pipeline.load's (and Ensemble.load's) options as the runtime commands' common flags set them."""
    return {
        "device": args.device,
        "precision": args.precision,
        "intra_op_threads": args.threads,
        "limits": _limits(args),
        "trusted_keys": getattr(args, "trusted_key", None),
    }


def _limits(args: argparse.Namespace) -> Limits:
    """polysense.Limits with what the command's flags change (serve --max-audio-seconds)."""
    seconds = getattr(args, "max_audio_seconds", None)
    if seconds is None:
        return DEFAULT_LIMITS
    if not seconds > 0:  # NaN too
        raise ConfigError(f"--max-audio-seconds must be a positive number of seconds, got {seconds:g}")
    return replace(DEFAULT_LIMITS, max_audio_seconds=seconds)


def load_pipeline(args: argparse.Namespace, bundle: str) -> Pipeline:
    """One bundle's Pipeline, loaded as the runtime commands' common flags say."""
    from polysense.inference.pipeline import Pipeline

    return Pipeline.load(bundle, **_load_options(args))


def _named(args: argparse.Namespace) -> str:
    """The bundle, or the bundles of an ensemble, as the command line named them."""
    return args.bundle if isinstance(args.bundle, str) else " + ".join(args.bundle)


def add_predict(commands: argparse._SubParsersAction) -> None:
    predict = _bundle_command(
        commands,
        "predict",
        "predict one sample, or many with --data (runtime only)",
        "print the prediction as JSON",
    )
    for modality in MODALITIES:
        predict.add_argument(f"--{modality}", action=_Once, help=SPECS[modality].help)
    predict.add_argument("--top", type=positive, default=3, help="labels to show (default 3)")
    _voice_argument(predict, "the speaker's voice profile")
    many = predict.add_argument_group("many samples")
    many.add_argument(
        "--data",
        help="a manifest (.csv/.jsonl; label optional) or a folder of image/audio/.txt files to predict",
    )
    many.add_argument("--out", help="with --data: predictions to .jsonl or .csv (- for JSONL on stdout)")
    many.add_argument("--no-progress", action="store_true")
    predict.set_defaults(run=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    single = [m for m in MODALITIES if getattr(args, m) is not None]
    if args.data is not None or args.out is not None:
        if single:
            raise ConfigError(f"--data predicts many samples; leave out --{single[0]} (or --data)")
        if args.data is None or args.out is None:
            raise ConfigError(
                "--data and --out go together: polysense predict BUNDLE --data DIR --out preds.jsonl"
            )
        return _run_predict_many(args)
    if not single:  # said in flags, before the bundle loads (the Pipeline names its keyword arguments)
        raise ConfigError(
            f"no input given; pass one or more of {', '.join(f'--{m}' for m in MODALITIES)} "
            "(or --data DIR --out FILE for many samples)"
        )
    voice = _voice(args)
    pipeline = load_model(args)
    prediction = pipeline.predict(image=args.image, text=args.text, audio=args.audio, voice=voice)
    if args.json:
        print(json.dumps(prediction.to_dict(), indent=2))
        return 0
    ranked = sorted(prediction.probabilities.items(), key=lambda item: -item[1])[: max(args.top, 1)]
    print(f"{prediction.label}  ({', '.join(f'{k} {v:.3f}' for k, v in ranked)})")
    stages = ", ".join(f"{k} {v:.2f}" for k, v in prediction.timings.items())
    print(f"  modalities: {'+'.join(prediction.embeddings)}; ms: {stages}")
    return 0


def _run_predict_many(args: argparse.Namespace) -> int:
    from polysense.tools.batch_predict import PredictionWriter, predict_to_file

    PredictionWriter(args.out, ())  # checks --out before the bundle loads
    voice = _voice(args)
    result = predict_to_file(
        load_model(args), args.data, args.out, progress=not args.no_progress, voice=voice
    )
    where = "stdout" if args.out == "-" else args.out
    print(
        f"wrote {_count(result.written, 'prediction')} to {where}; "
        f"{_count(len(result.failed), 'sample')} skipped",
        file=sys.stderr,
    )
    return 0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def add_eval(commands: argparse._SubParsersAction) -> None:
    evaluate = _bundle_command(
        commands, "eval", "evaluate a bundle on a data manifest (runtime only)", "print the metrics as JSON"
    )
    evaluate.add_argument("--data", required=True, help="manifest (.csv/.jsonl), e.g. RUN_DIR/manifest.csv")
    evaluate.add_argument("--split", choices=SPLITS, help="only rows of this split")
    evaluate.add_argument(
        "--predictions",
        metavar="OUT",
        help="also write each sample's prediction and true label (.jsonl/.csv)",
    )
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from polysense.tools.evaluate import evaluate_bundle
    from polysense.tools.metrics import format_metrics_table

    if args.predictions is not None:
        from polysense.tools.batch_predict import PredictionWriter

        PredictionWriter(args.predictions, ())  # checks the path before the bundle loads
    metrics = evaluate_bundle(
        load_model(args), args.data, args.split, progress=not args.no_progress, predictions=args.predictions
    )
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{_named(args)} on {args.data}{f' (split {args.split})' if args.split else ''}, runtime only:")
        print(format_metrics_table(metrics))
    return 0


def add_stream(commands: argparse._SubParsersAction) -> None:
    stream = _bundle_command(
        commands,
        "stream",
        "a timeline of predictions over streamed audio/video",
        "one JSON object per line",
        ensemble=False,
    )
    # Only to refuse them with a message that says what to do (argparse would say "unrecognized arguments").
    stream.add_argument("more_bundles", nargs="*", help=argparse.SUPPRESS)
    stream.add_argument(
        "--audio",
        help="audio file, or - for stdin: a 16-bit WAV stream, or raw 16-bit little-endian mono PCM at --sample-rate",
    )
    stream.add_argument("--video", help="video file (or camera index / URL) sampled at --fps")
    stream.add_argument("--text", help="text fused with the stream")
    stream.add_argument("--chunk-ms", type=float, default=100.0, help="audio chunk length (default 100 ms)")
    stream.add_argument(
        "--sample-rate",
        type=int,
        default=16000,
        help="rate of raw PCM on stdin (default 16000; a WAV says its own)",
    )
    stream.add_argument("--fps", type=float, default=5.0, help="video frames encoded per second (default 5)")
    _voice_argument(stream, "the streamed speaker's voice profile")
    stream.set_defaults(run=_run_stream)


def _run_stream(args: argparse.Namespace) -> int:
    from polysense.tools.timeline import stream_timeline

    if args.more_bundles:  # the timeline fuses one bundle's video stream, text and audio (tools/timeline.py)
        bundles = " ".join([args.bundle, *args.more_bundles])
        raise ConfigError(
            f"stream takes one bundle, got {1 + len(args.more_bundles)}; stream with one of them. An ensemble "
            f"predicts a whole recording (polysense predict {bundles} --audio FILE) or live audio over WebSocket "
            f"(polysense serve {bundles}, then /v1/stream)"
        )
    voice = _voice(args)
    pipeline = load_pipeline(args, args.bundle)
    video = int(args.video) if args.video is not None and args.video.isdigit() else args.video
    events = stream_timeline(
        pipeline, args.audio, video, args.text, args.chunk_ms, args.sample_rate, args.fps, voice=voice
    )
    for event in events:
        if args.json:
            print(json.dumps(event), flush=True)
        else:
            final = "  (final)" if event.get("final") else ""
            print(
                f"{event['time']:8.3f} s  {event['label']:<24} p={event['probability']:.3f}  "
                f"{'+'.join(event['modalities'])}{final}",
                flush=True,
            )
    return 0


def _voice_argument(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument(
        "--voice",
        metavar="PROFILE",
        help=f"{what} (what `polysense voice` writes), for bundles trained with --voice-norm",
    )


def _voice(args: argparse.Namespace):
    """The --voice profile, read before the bundle loads (None without --voice)."""
    from polysense.preprocess.voice import VoiceProfile

    return None if args.voice is None else VoiceProfile.load(args.voice)


def add_voice(commands: argparse._SubParsersAction) -> None:
    voice = _bundle_command(
        commands,
        "voice",
        "a speaker's voice profile from a few recordings, for bundles trained with --voice-norm",
        "print the profile's summary as JSON",
        ensemble=False,  # one member's profile serves every member of an ensemble
    )
    voice.add_argument(
        "recordings", nargs="+", metavar="RECORDING", help="audio files of the speaker talking"
    )
    voice.add_argument("--out", required=True, help="profile file to write (.json)")
    voice.set_defaults(run=_run_voice)


def _run_voice(args: argparse.Namespace) -> int:
    profile = load_model(args).voice_profile(args.recordings)
    profile.save(args.out)
    summary = {"out": args.out, "recordings": len(args.recordings), "voiced_frames": profile.frames}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"wrote {args.out}: the voice of {len(args.recordings)} recordings ({profile.frames} voiced frames); "
            f"use it with polysense predict {args.bundle} --voice {args.out} ..."
        )
    return 0
