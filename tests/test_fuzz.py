"""Seeded, bounded fuzzing in the suite: every input ends in success or a PolysenseError, nothing else.

The long run (100,000+ inputs in worker processes, with crashes, hangs and memory watched) is `make fuzz`;
its counts are in benchmarks/results/fuzz.md.
"""

import collections

import pytest

pytest.importorskip("onnxruntime")

from benchmarks.fuzzing import KINDS, Fuzzer  # noqa: E402  (pytest's pythonpath: the repository root)

INPUTS = 2800  # 400 of each kind, about 15 s


def test_fuzzed_inputs_succeed_or_raise_polysense_errors(bundle, tmp_path):
    fuzzer = Fuzzer(bundle, tmp_path, seed=20261129)
    outcomes = collections.Counter()
    failures = []
    for index in range(INPUTS):
        kind, outcome = fuzzer.run_one(index)
        outcomes[kind, outcome.split(":")[0]] += 1
        if outcome.startswith("failure"):
            failures.append(f"input {index} ({kind}): {outcome}")
    assert failures == []
    for kind in KINDS:  # the fuzzer reaches both the refusals and the success paths
        assert outcomes[kind, "refused"] > 0, kind
        assert outcomes[kind, "ok"] > 0, kind
