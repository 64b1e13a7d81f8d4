"""The cheap part of the check that `polysense train` runs on every manifest before preprocessing it: missing
cells, class balance, and samples of val and test that repeat a training sample exactly (every cell the same
bytes or text). It reads each file's bytes once to hash them and decodes nothing.

What counts as leakage to refuse (`refusal`): any test sample that is also a training sample, since the test
metrics a run reports would then measure memory; or more than MAX_VAL_SHARE of the val samples, since model
selection and early stopping would then follow memory. A few stock phrases repeated between train and val (SST-2
has three: "too bad", "i like it", "what 's next ?", 0.4 % of its val split) are reported, not refused."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from polysense.modalities import MODALITIES
from polysense.tools.data_check.duplicates import Leakage, exact_groups, leakage
from polysense.tools.data_check.fingerprints import digest, text_digest
from polysense.tools.data_check.quality import balance
from polysense.tools.manifest import Row

MAX_VAL_SHARE = 0.01  # val samples that may repeat training samples before a run is refused


@dataclass(frozen=True)
class QuickCheck:
    rows: int
    missing: dict[str, int]  # modality -> rows without a cell
    balance: dict[str, dict[str, int]]  # split -> label -> rows
    leakage: Leakage

    def summary(self) -> str:
        """One line for the training log."""
        missing = ", ".join(f"{m} {n}" for m, n in self.missing.items())
        sizes = {split: sum(counts.values()) for split, counts in self.balance.items()}
        train = [n for n in self.balance.get("train", {}).values()]
        leak = self.leakage
        return (
            f"data check: {self.rows} rows ({', '.join(f'{s} {n}' for s, n in sizes.items())}); rows without "
            f"{missing}; train rows per label {min(train, default=0)} to {max(train, default=0)}; samples "
            f"repeating a training sample: val {leak.val_in_train}/{leak.val_rows}, test "
            f"{leak.test_in_train}/{leak.test_rows} (polysense data check MANIFEST: the full report)"
        )

    def refusal(self) -> str | None:
        """Why training on these splits should not go on (obvious leakage), or None."""
        leak = self.leakage
        if leak.test_in_train == 0 and leak.val_share <= MAX_VAL_SHARE:
            return None
        shown = ", ".join(str(n) for n in leak.lines[:10]) + (", ..." if len(leak.lines) > 10 else "")
        return (
            f"{leak.test_in_train} of {leak.test_rows} test and {leak.val_in_train} of {leak.val_rows} val rows "
            f"repeat a training sample exactly (lines {shown}): the test metrics would measure memory "
            f"(a run is refused for any test row, or more than {MAX_VAL_SHARE:.0%} of val); remove the "
            "copies from the manifest"
        )


def _key(row: Row, modalities: Sequence[str]) -> bytes | None:
    parts = []
    for modality in modalities:
        value = getattr(row, modality)
        if value is None:
            parts.append(b"-")
        elif modality == "text":
            parts.append(text_digest(value))
        elif Path(value).is_file():
            parts.append(digest(Path(value).read_bytes()))
        else:
            return None  # a missing file: the row is skipped, as training skips it
    return b"|".join(parts)


def quick_check(rows: Sequence[Row], modalities: Sequence[str] = MODALITIES) -> QuickCheck:
    """The cheap checks on `rows` (split already set) over the cells of `modalities`."""
    keys = {i: key for i, row in enumerate(rows) if (key := _key(row, modalities)) is not None}
    groups = exact_groups("sample", keys, rows)
    missing = {m: sum(1 for r in rows if getattr(r, m) is None) for m in modalities}
    return QuickCheck(len(rows), missing, balance(rows), leakage(groups, rows))
