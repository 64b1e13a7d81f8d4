"""`polysense train --nproc N`: start N training processes on this machine through torchrun's own launcher
(torch.distributed.launcher), the same as `torchrun --standalone --nproc-per-node N -m polysense train ...`.

For several machines, run torchrun itself on each (README "Distributed training"): polysense reads only the
RANK, WORLD_SIZE and LOCAL_RANK it sets.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Sequence

from polysense.errors import ConfigError, TrainingError

# What `polysense` exits with after printing a PolysenseError (polysense.cli.main).
USER_ERROR_EXIT = 2


def launch(argv: Sequence[str], processes: int) -> int:
    """Run `polysense train argv` in `processes` processes; 0 when all of them finished.

    Raises TrainingError naming the failed rank when any process fails: torchrun then stops the others, and
    the run continues from its last checkpoint with --resume (with any number of processes).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if processes < 1:
        raise ConfigError(f"--nproc must be at least 1, got {processes}")
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
    try:
        elastic_launch(config, sys.executable)("-m", "polysense", "train", *argv)
    except SignalException:
        raise KeyboardInterrupt from None  # Ctrl-C or a termination: the processes are stopped
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        if failure.exitcode == USER_ERROR_EXIT:
            return USER_ERROR_EXIT  # the process printed the polysense error itself (bad data, say)
        raise TrainingError(
            f"training process {rank} of {processes} failed (exit code {failure.exitcode}), so torchrun stopped "
            "the others; its message is above. Fix the cause and continue from the last finished epoch with "
            "--resume (with the same or another --nproc)"
        ) from None
    return 0
