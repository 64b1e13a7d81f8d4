"""`polysense train` with every parameter, buffer and batch in float64, run as a script:

    python tests/float64_training.py --data ... --out ...                                     # one process
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/float64_training.py ...   # two

tests/test_distributed.py compares one process with two this way. In float32 the default built-in run is
chaotic in its first epochs: one process with one thread and with two (sums in another order, nothing else)
end 3 epochs 9 validation points apart, so float32 cannot tell a real difference between one process and two
from rounding. In float64 rounding is 1e-16 instead of 1e-7, and the two agree to 1e-14 while any real
difference (a loss scaled per shard, BatchNorm over the shard, a mask drawn per process) still shows in full.

Only the dtype changes: the default dtype makes the model's parameters and buffers float64, and each batch's
floating tensors are cast as they are collated, so the training code itself runs unchanged.
"""

import sys

import torch

from polysense.models.training import dataset

_collate = dataset.FeatureSet.collate


def _collate_float64(self: dataset.FeatureSet, *args, **kwargs) -> dict[str, torch.Tensor]:
    batch = _collate(self, *args, **kwargs)
    return {key: value.double() if value.is_floating_point() else value for key, value in batch.items()}


if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    dataset.FeatureSet.collate = _collate_float64
    from polysense.cli.main import main

    sys.exit(main(["train", *sys.argv[1:]]))
