"""`polysense train --nproc N`: start N training processes on this machine through torchrun's own launcher
(torch.distributed.launcher), the same as `torchrun --standalone --nproc-per-node N -m polysense train ...`.

For several machines, run torchrun itself on each (docs/training.md, "Distributed training"): polysense reads only the
RANK, WORLD_SIZE and LOCAL_RANK it sets.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Sequence

from polysense.errors import ConfigError, TrainingError

# What `polysense` exits with after printing a PolysenseError (polysense.cli.main.main).
USER_ERROR_EXIT = 2


def check_devices(device: str, processes: int) -> None:
    """Refuse more processes than GPUs when training on CUDA (each process takes a GPU of its own)."""
    import torch

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda and processes > torch.cuda.device_count():
        raise ConfigError(
            f"--nproc {processes} on CUDA needs a GPU per process; torch sees {torch.cuda.device_count()}. Use "
            "--nproc with at most that many, or --device cpu"
        )


def launch(argv: Sequence[str], processes: int) -> int:
    """Run `polysense train argv` in `processes` processes; 0 when all of them finished.

    Raises TrainingError naming the failed rank when any process fails: torchrun then stops the others, and
    the run continues from its last checkpoint with --resume (with any number of processes).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # One thread per process unless the user chose: N processes with a thread per core each would fight over
    # the cores (torchrun makes the same choice).
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // processes))
    os.environ["OMP_NUM_THREADS"] = threads
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone picks
        max_restarts=0,
        monitor_interval=0.5,
    )
    # torchrun's own log lines (closing signals, exit codes) would repeat what the one error line says.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        # --quiet is the polysense command's own flag (logging set up before `train` is reached): pass it on.
        quiet = ["--quiet"] if logging.getLogger().getEffectiveLevel() > logging.INFO else []
        elastic_launch(config, sys.executable)("-m", "polysense", *quiet, "train", *argv)
    except SignalException:
        raise KeyboardInterrupt from None  # Ctrl-C or a termination: the processes are stopped
    except ChildFailedError as error:
        rank, failure = _cause(error)
        if failure.exitcode == USER_ERROR_EXIT:
            return USER_ERROR_EXIT  # the process printed the polysense error itself (bad data, say)
        raise TrainingError(
            f"training process {rank} of {processes} failed (exit code {failure.exitcode}), so torchrun stopped "
            "the others; its message is above. Fix the cause and continue from the last finished epoch with "
            "--resume (with the same or another --nproc)"
        ) from None
    return 0


def _cause(error: Exception) -> tuple[int, object]:
    """The rank and failure that stopped the run: the first to fail other than those that stopped because a
    peer failed (polysense.models.training.distributed.processes.PEER_FAILED_EXIT)."""
    from polysense.models.training.distributed.processes import PEER_FAILED_EXIT

    failures = sorted(error.failures.items(), key=lambda item: item[1].timestamp)
    causes = [item for item in failures if item[1].exitcode != PEER_FAILED_EXIT]
    return (causes or failures)[0]
