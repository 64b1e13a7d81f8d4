"""`polysense serve BUNDLE`: the bundle behind HTTP/WebSocket (uvicorn), or as a Ray Serve deployment."""

from __future__ import annotations

import argparse
import math
import os

from polysense.bundle.schema import PRECISIONS
from polysense.cli.predict import DEVICE_HELP, add_trusted_key
from polysense.inference.sessions import DEVICES
from polysense.serving.handler import ServeOptions

API_KEY_ENV = "POLYSENSE_API_KEY"


def add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a bundle over HTTP and WebSocket with dynamic batching (needs the serve extra)",
        description="POST /v1/predict, /v1/predict_batch; GET /v1/info, /healthz, /readyz, /metrics; "
        "WS /v1/stream. See docs/serving.md and docs/reference/http-api.md.",
    )
    serve.add_argument(
        "bundle", nargs="+", help="a bundle; several bundles are served as one ensemble (polysense.Ensemble)"
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=int, default=8000, help="(default 8000)")
    serve.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    serve.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto", help="(default auto)")
    serve.add_argument(
        "--threads",
        type=int,
        help="onnxruntime threads per model run (default: half the cores, so HTTP work and model runs overlap; "
        "0: one per core)",
    )
    serve.add_argument(
        "--max-audio-seconds",
        type=float,
        help="refuse (413) audio longer than this, before decoding (default: polysense.Limits' 600 s); lower it "
        "for a bundle whose audio front end is costly per second (speech-embedding: about 20 ms per second)",
    )
    add_trusted_key(serve)
    defaults = ServeOptions()
    _add_queue_options(serve, defaults)
    _add_connection_options(serve, defaults)
    _add_ray_options(serve)
    serve.set_defaults(run=_run_serve)


def _add_queue_options(serve: argparse.ArgumentParser, defaults: ServeOptions) -> None:
    """Batching, the queue, request limits and access."""
    serve.add_argument("--max-batch", type=int, default=defaults.max_batch, help="requests per model run")
    serve.add_argument(
        "--max-wait-ms",
        type=float,
        default=defaults.max_wait_ms,
        help="how long a batch may wait to fill, only while requests arrive concurrently",
    )
    serve.add_argument(
        "--max-queue", type=int, default=defaults.max_queue, help="requests in flight at most; beyond: 503"
    )
    serve.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=defaults.max_queue_delay_ms,
        help="while requests arrive faster than they are answered, refuse (503) one whose expected wait "
        "(in-flight samples x the measured seconds per sample) is over this; 0: off (default %(default)g)",
    )
    serve.add_argument(
        "--max-batch-samples",
        type=int,
        default=defaults.max_batch_samples,
        help="samples in one /v1/predict_batch request at most (<= --max-queue); beyond: 413",
    )
    serve.add_argument(
        "--max-streams", type=int, default=defaults.max_streams, help="open /v1/stream connections at most"
    )
    serve.add_argument("--timeout-s", type=float, default=defaults.timeout_s, help="per request; beyond: 504")
    serve.add_argument(
        "--max-body-mb",
        type=float,
        default=defaults.max_body_bytes / (1 << 20),
        help="per request body; beyond: 413",
    )
    serve.add_argument(
        "--api-key",
        help=f"bearer token every /v1 and /metrics request must send (or set {API_KEY_ENV}); at least 16 characters",
    )
    serve.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")


def _add_connection_options(serve: argparse.ArgumentParser, defaults: ServeOptions) -> None:
    group = serve.add_argument_group(
        "per-connection limits, against slow or silent clients (docs/serving.md)"
    )
    group.add_argument(
        "--header-timeout-s",
        type=float,
        default=defaults.header_timeout_s,
        help="a request's headers must arrive within this; beyond: 408, closed",
    )
    group.add_argument(
        "--max-header-kb",
        type=int,
        default=defaults.max_header_bytes >> 10,
        help="request line and headers at most; beyond: 431, closed",
    )
    group.add_argument(
        "--body-timeout-s",
        type=float,
        default=defaults.body_timeout_s,
        help="a request's body must arrive within this; beyond: 408",
    )
    group.add_argument(
        "--idle-timeout-s",
        type=float,
        default=defaults.idle_timeout_s,
        help="a kept-alive connection without a request is closed after this",
    )
    group.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        help="open connections at most (streams included); beyond: closed at once. Keep under `ulimit -n`",
    )
    group.add_argument(
        "--ws-start-timeout-s",
        type=float,
        default=defaults.ws_start_timeout_s,
        help="a /v1/stream must send its start message within this; beyond: closed (1008)",
    )


def _add_ray_options(serve: argparse.ArgumentParser) -> None:
    ray = serve.add_argument_group("Ray Serve (scale-out; needs pip install 'ray[serve]')")
    ray.add_argument(
        "--ray", action="store_true", help="run as a Ray Serve deployment (RAY_ADDRESS or a local Ray)"
    )
    ray.add_argument("--replicas", type=int, default=1, help="replicas (default 1)")
    ray.add_argument("--min-replicas", type=int, help="autoscale from this many (with --max-replicas)")
    ray.add_argument("--max-replicas", type=int, help="autoscale up to this many")
    ray.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=8.0,
        help="autoscaling target per replica (default 8)",
    )
    ray.add_argument(
        "--cpus-per-replica",
        type=float,
        default=1.0,
        help="(default 1; also the onnxruntime threads per replica unless --threads is given)",
    )
    ray.add_argument("--gpus-per-replica", type=float, default=0.0, help="(default 0)")
    ray.add_argument(
        "--write-config",
        metavar="FILE.yaml",
        help="write a Ray Serve config file for `serve deploy` on a cluster and exit (the bundle path must "
        "exist on every node)",
    )


def _run_serve(args: argparse.Namespace) -> int:
    from polysense.errors import ConfigError

    if not (math.isfinite(args.max_body_mb) and args.max_body_mb > 0):
        raise ConfigError(f"--max-body-mb must be a positive number, got {args.max_body_mb}")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be 1-65535, got {args.port}")
    threads_given = args.threads is not None
    if args.threads is None:
        # A server overlaps request handling with model runs: on 2 cores, 1 onnxruntime thread served 2,175
        # text requests/s at 32 clients against 1,382 with one per core (docs/results/speed.md, "Serving under load", the command there).
        args.threads = max(1, (os.cpu_count() or 2) // 2)
    if args.threads < 0:
        raise ConfigError("--threads cannot be negative (0 = one per core)")
    options = ServeOptions(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_queue_delay_ms=args.max_queue_delay_ms,
        timeout_s=args.timeout_s,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_batch_samples=args.max_batch_samples,
        max_streams=args.max_streams,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        header_timeout_s=args.header_timeout_s,
        max_header_bytes=args.max_header_kb << 10,
        body_timeout_s=args.body_timeout_s,
        idle_timeout_s=args.idle_timeout_s,
        max_connections=args.max_connections,
        ws_start_timeout_s=args.ws_start_timeout_s,
    )
    if args.ray or args.write_config:
        if len(args.bundle) > 1:
            raise ConfigError("Ray Serve deploys one bundle; serve an ensemble without --ray/--write-config")
        if args.max_audio_seconds is not None:
            raise ConfigError(
                "--max-audio-seconds is not passed to Ray Serve replicas yet; serve without --ray"
            )
        if args.trusted_key:
            raise ConfigError(
                "--trusted-key is not checked by Ray Serve replicas yet; serve without --ray/--write-config, "
                "or check the signature before deploying (polysense info BUNDLE --trusted-key KEY.pub)"
            )
        return _run_ray(args, options, threads_given)
    from polysense.cli.predict import load_model
    from polysense.serving.server import serve

    serve(load_model(args), options, host=args.host, port=args.port, access_log=args.access_log)
    return 0


def _run_ray(args: argparse.Namespace, options: ServeOptions, threads_given: bool) -> int:
    from polysense.serving.ray_app import RayOptions, deploy, write_config

    ray_options = RayOptions(
        bundle=os.path.abspath(args.bundle[0]),
        device=args.device,
        precision=args.precision,
        # a replica runs on another machine, maybe: one onnxruntime thread per CPU Ray reserves for it
        threads=args.threads if threads_given else max(1, math.ceil(args.cpus_per_replica)),
        replicas=args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica,
        host=args.host,
        port=args.port,
    )
    if args.write_config:
        write_config(ray_options, options, args.write_config)
        print(f"wrote {args.write_config}; deploy it with: serve deploy {args.write_config}")
        return 0
    deploy(ray_options, options, block=True)
    return 0
