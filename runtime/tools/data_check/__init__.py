"""Checking a data manifest before training on it (`polysense data check`): missing and unreadable cells, exact
and near duplicates and those across splits (leakage), class balance, audio and text quality, likely label
errors. `quick_check` is the cheap part `polysense train` runs on every manifest."""

from polysense.tools.data_check.check import CheckOptions, check_manifest
from polysense.tools.data_check.quick import QuickCheck, quick_check
from polysense.tools.data_check.report import CheckReport, format_report

__all__ = ["CheckOptions", "CheckReport", "QuickCheck", "check_manifest", "format_report", "quick_check"]
