"""Every error polysense raises on purpose. Each message names the problem and the fix."""

from __future__ import annotations


class PolysenseError(Exception):
    """Base class: catch this to handle any polysense failure caused by input or environment."""


class InputError(PolysenseError, ValueError):
    """An input (image, text, audio, array) cannot be used as given."""


class LimitError(InputError):
    """An input is beyond one of the pipeline's Limits (`too_large`: over a maximum, not under a minimum)."""

    def __init__(self, message: str, too_large: bool = True) -> None:
        super().__init__(message)
        self.too_large = too_large


class ConfigError(PolysenseError, ValueError):
    """An option or a combination of options is invalid."""


class DependencyError(PolysenseError, ImportError):
    """An optional dependency is missing or installed in a conflicting way."""


class ManifestError(PolysenseError):
    """A data manifest has bad rows. `problems` lists every one, not only the first."""

    def __init__(self, path: str, problems: list) -> None:
        self.path = path
        self.problems = list(problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(
            f"{path}: {len(self.problems)} problem(s) found; fix these rows and run again:\n{shown}{more}"
        )


class BundleError(PolysenseError):
    """A bundle is missing, damaged, tampered with, or of a schema this runtime does not read."""


class OverloadedError(PolysenseError):
    """A server's queue is full: the request was not accepted; retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(PolysenseError, TimeoutError):
    """A request waited longer than its timeout and was dropped unanswered."""


class TrainingError(PolysenseError):
    """A training run stopped part-way (a process of a distributed run failed); --resume continues it."""
