"""`polysense serve BUNDLE --ray`: the uvicorn server's whole API, HTTP and WebSocket, on Ray Serve.

Ray Serve's ingress deployment runs the same Starlette app as `polysense serve` (polysense.serving.http): each
replica (polysense.serving.ray_replica) loads the bundle once, warms it up and builds the app before Ray routes
requests to it, so every endpoint answers as on uvicorn, with the same statuses, JSON bodies and limits:

    POST /v1/predict  /v1/predict_batch     GET /v1/info  /healthz  /readyz  /metrics     WS /v1/stream

Model runs are batched in each replica by its own dynamic batcher (max_batch, max_wait_ms); /metrics are the
answering replica's (Ray exports its own Serve metrics too). Every answer names its replica in the
X-Polysense-Replica header. Ray's proxy sets no timeout of its own: each prediction gets timeout_s (504) from
the app, as on uvicorn, and a stream lasts as long as its client sends.

Locally: `polysense serve BUNDLE --ray --replicas 2` (RAY_ADDRESS set: joins that cluster instead).
On a multi-node cluster: `ray start --head` on one node, `ray start --address HEAD:6379` on the others, the
bundle at the same path on every node (or on shared storage), polysense installed everywhere; then
`polysense serve BUNDLE --host 0.0.0.0 --write-config serve.yaml` and `serve deploy serve.yaml --address
http://HEAD:8265` (or RAY_DASHBOARD_ADDRESS). The config's `deployments:` section tunes scaling; its
`args:` are app_builder's. An API key is never written to the file: replicas read it from $POLYSENSE_API_KEY.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from dataclasses import asdict, dataclass, fields
from typing import Any

from polysense.bundle.reader import open_bundle
from polysense.errors import ConfigError, DependencyError, PolysenseError
from polysense.serving.handler import ServeOptions
from polysense.serving.ray_replica import ReplicaApp

APP_NAME = "polysense"
DEPLOYMENT_NAME = "Polysense"
API_KEY_ENV = "POLYSENSE_API_KEY"
IMPORT_PATH = "polysense.serving.ray_app:app_builder"
SERVE_FIELDS = (
    "max_batch",
    "max_wait_ms",
    "max_queue",
    "max_queue_delay_ms",
    "timeout_s",
    "max_body_bytes",
    "max_batch_samples",
    "max_streams",
)
INTS = {"threads", "replicas", "min_replicas", "max_replicas", "max_batch", "max_queue", "max_body_bytes"}
INTS |= {"max_batch_samples", "max_streams"}
FLOATS = {"target_ongoing_requests", "cpus_per_replica", "gpus_per_replica", "max_wait_ms", "timeout_s"}
FLOATS |= {"max_queue_delay_ms"}


class DeploymentError(PolysenseError):
    """Ray Serve could not start the deployment (a replica failed to load the bundle, too few resources)."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how many: the bundle's absolute path (the same on every node), replicas (fixed, or
    autoscaled between min_replicas and max_replicas towards target_ongoing_requests each), the CPUs and
    GPUs Ray reserves per replica, and where Serve's HTTP proxy listens."""

    bundle: str
    device: str = "auto"
    precision: str = "auto"
    threads: int = 1
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ConfigError("autoscaling needs both --min-replicas and --max-replicas")
        low, high = self.min_replicas, self.max_replicas
        if low is not None and high is not None:  # autoscaled
            if self.replicas != 1:
                raise ConfigError("give --replicas (fixed) or --min/--max-replicas (autoscaled), not both")
            if not 0 <= low <= high or high < 1:
                raise ConfigError(
                    f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got "
                    f"{self.min_replicas} and {self.max_replicas}"
                )
        if not self.target_ongoing_requests > 0:
            raise ConfigError(
                f"--target-ongoing-requests must be positive, got {self.target_ongoing_requests}"
            )
        if self.cpus_per_replica < 0 or self.gpus_per_replica < 0:
            raise ConfigError("--cpus-per-replica and --gpus-per-replica cannot be negative")
        if self.threads < 0:
            raise ConfigError("--threads cannot be negative (0 = one per core)")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be 1-65535, got {self.port}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None

    def deployment_options(self, options: ServeOptions) -> dict[str, Any]:
        """Ray Serve's options for the deployment (also the config file's `deployments:` entry)."""
        scaling: dict[str, Any] = {"num_replicas": self.replicas}
        if self.autoscaling:
            scaling = {
                "autoscaling_config": {
                    "min_replicas": self.min_replicas,
                    "max_replicas": self.max_replicas,
                    "target_ongoing_requests": self.target_ongoing_requests,
                }
            }
        actor = {"num_cpus": self.cpus_per_replica}
        if self.gpus_per_replica:
            actor["num_gpus"] = self.gpus_per_replica
        # Ray hands a replica as many requests at once as its app admits (max_queue predictions, waiting for a
        # batch included, and max_streams open streams); the app answers what is beyond them as on uvicorn.
        # With every replica busy, Ray queues requests at the proxy, up to max_queue more, then answers 503.
        return {
            **scaling,
            "max_ongoing_requests": options.max_queue + options.max_streams,
            "max_queued_requests": options.max_queue,
            "ray_actor_options": actor,
        }


def _import_ray() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError as error:
        raise DependencyError(
            f"Ray Serve is not installed ({error}); pip install 'polysense[ray]'"
        ) from error
    return ray, serve


def build_app(ray_options: RayOptions, options: ServeOptions, api_key_env: str | None = None) -> Any:
    """The Ray Serve application (`serve.run(build_app(...))`): one ingress deployment whose replicas each
    build and run polysense's ASGI app (Ray's `serve.ingress` with a standalone app)."""
    _, serve = _import_ray()
    kept: dict[str, Any] = {name: getattr(options, name) for name in SERVE_FIELDS}
    if api_key_env is None and options.api_key is not None:
        kept["api_key"] = options.api_key
    app = ReplicaApp(
        ray_options.bundle, ray_options.device, ray_options.precision, ray_options.threads, kept, api_key_env
    )
    ingress = serve.ingress(app)()  # a deployment class with no methods of its own: the app answers all
    deployment = serve.deployment(ingress, name=DEPLOYMENT_NAME, **ray_options.deployment_options(options))
    return deployment.bind()


def app_builder(args: dict[str, Any]) -> Any:
    """For a Ray Serve config (`import_path: polysense.serving.ray_app:app_builder`) or `serve run`: args
    are RayOptions' and ServeOptions' fields by name (not host, port, api_key), plus api_key_env."""
    args = dict(args)
    api_key_env = args.pop("api_key_env", None)
    ray_names = {f.name for f in fields(RayOptions)} - {"host", "port"}
    unknown = sorted(set(args) - ray_names - set(SERVE_FIELDS))
    if unknown:
        raise ConfigError(
            f"unknown argument {unknown[0]!r}; the arguments are {', '.join(sorted(ray_names))}, "
            f"{', '.join(SERVE_FIELDS)}, api_key_env"
        )
    if "bundle" not in args:
        raise ConfigError("the argument bundle (the bundle's path on every node) is required")
    typed = {name: _typed(name, value) for name, value in args.items()}
    ray_options = RayOptions(**{k: v for k, v in typed.items() if k in ray_names})
    options = ServeOptions(**{k: v for k, v in typed.items() if k in SERVE_FIELDS})
    return build_app(ray_options, options, api_key_env)


def _typed(name: str, value: Any) -> Any:
    """A value from YAML or from `serve run ... key=value` (a string there) as the field's type."""
    try:
        if name in INTS and value is not None:
            return int(value)
        if name in FLOATS:
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    return value


def deploy(ray_options: RayOptions, options: ServeOptions, block: bool = True) -> str:
    """Run the deployment on RAY_ADDRESS's cluster or a new local Ray; returns the URL. With block=True,
    serve until SIGINT/SIGTERM, then delete the application (and stop the local Ray this started)."""
    open_bundle(ray_options.bundle, verify=False)  # a wrong path fails here, not in every replica
    ray, serve = _import_ray()
    started_here = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address)
        started_here = address is None
    try:
        url = _start(serve, ray_options, options)
        if block:
            _wait_for_signal()
    except BaseException:
        block = True  # a failed start is cleaned up as a stop is
        raise
    finally:
        if block:
            _stop(ray, serve, started_here)
    return url


def _start(serve: Any, ray_options: RayOptions, options: ServeOptions) -> str:
    http = {"host": ray_options.host, "port": ray_options.port}
    serve.start(http_options=http)  # where Serve runs already, its HTTP options stay as they are
    try:
        serve.run(build_app(ray_options, options), name=APP_NAME, route_prefix="/")
    except RuntimeError as error:  # the replicas' own errors are in Ray's log above
        raise DeploymentError(f"{str(error).rstrip('.')}; the replicas' errors are logged above") from None
    url = f"http://{ray_options.host}:{ray_options.port}"
    scale = (
        f"{ray_options.min_replicas}-{ray_options.max_replicas} replicas (autoscaled)"
        if ray_options.autoscaling
        else f"{ray_options.replicas} replica(s)"
    )
    print(f"polysense on Ray Serve at {url}/v1/predict with {scale}; Ctrl-C stops it", flush=True)
    return url


def _stop(ray: Any, serve: Any, started_here: bool) -> None:
    """Delete the application; stop Serve and Ray too when this process started them."""
    if started_here:
        serve.shutdown()
        ray.shutdown()
    else:
        serve.delete(APP_NAME)


def _wait_for_signal() -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def config_dict(ray_options: RayOptions, options: ServeOptions) -> dict[str, Any]:
    """A Ray Serve config (the `serve deploy` format) for this deployment."""
    args = {k: v for k, v in asdict(ray_options).items() if k in ("bundle", "device", "precision", "threads")}
    args.update({name: getattr(options, name) for name in SERVE_FIELDS})
    if options.api_key is not None:
        args["api_key_env"] = API_KEY_ENV
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": ray_options.host, "port": ray_options.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": args,
                "deployments": [{"name": DEPLOYMENT_NAME, **ray_options.deployment_options(options)}],
            }
        ],
    }


def write_config(ray_options: RayOptions, options: ServeOptions, path: str) -> None:
    """Write the config for `serve deploy PATH` (YAML; JSON, which YAML reads too, without PyYAML)."""
    config = config_dict(ray_options, options)
    try:
        import yaml  # type: ignore[import-untyped]  # PyYAML ships no annotations (types-PyYAML would)

        body = yaml.safe_dump(config, sort_keys=False)
    except ImportError:
        body = json.dumps(config, indent=2) + "\n"
    notes = [
        "# polysense on Ray Serve. Deploy: serve deploy THIS_FILE --address http://HEAD:8265",
        "# The bundle must be at args.bundle on every node; tune scaling under deployments:.",
    ]
    if ray_options.host in ("127.0.0.1", "localhost", "::1"):
        notes.append("# http_options.host is loopback: only each node itself can connect; 0.0.0.0 for all.")
    if options.api_key is not None:
        notes.append(
            f"# The API key is not written here: every node needs ${API_KEY_ENV} set for `ray start`."
        )
    try:
        with open(path, "w", encoding="utf-8") as file:
            file.write("\n".join(notes) + "\n" + body)
    except OSError as error:
        raise ConfigError(f"cannot write {path}: {error.strerror}") from None
