"""Personal information in text, replaced by typed placeholders: `<EMAIL>`, `<PHONE>`, `<CARD>`, `<IBAN>`,
`<ACCOUNT>`, `<URL>`, `<IP>`.

Each kind is a pattern that finds candidates and, where the kind has one, a check that confirms them: card
numbers pass the Luhn checksum, IBANs the ISO 13616 mod-97 check, IP addresses parse with `ipaddress`, and
phone numbers are found and validated by `phonenumbers` (the Python port of Google's libphonenumber, the
library presidio's phone recogniser uses; `pip install 'polysense[deid]'`). A number that looks like a card but
fails Luhn is left alone. Names are not found: recognising them needs a language model, and none small enough
ships in a registry package that polysense could depend on (docs/privacy.md).

Every pattern runs in time linear in the text: repetitions are bounded, and no two adjacent repetitions can
match the same characters, so hostile text (a megabyte of digits, spaces or `@`) cannot make one backtrack.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from polysense.errors import ConfigError, DependencyError

# In the order overlapping findings are settled: an e-mail address wins over the URL or phone number inside it.
KINDS = ("EMAIL", "URL", "IBAN", "CARD", "ACCOUNT", "IP", "PHONE")
PHONE_INSTALL = "pip install 'polysense[deid]'  (or: pip install phonenumbers)"

_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}(?![\w-])")
_URL = re.compile(r"(?<![\w@/])(?:https?://|www\.)[^\s<>\"'`{}|\\^\[\]]{1,2048}", re.IGNORECASE)
_URL_TAIL = ".,;:!?)'\""  # sentence punctuation after a URL is not part of it
_IBAN = re.compile(r"(?<![\w])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![\w])", re.IGNORECASE)
# Contiguous 13-19 digits, groups of four (the last one to seven) split by one space or dash, or 4-6-5 (Amex).
_CARD = re.compile(
    r"(?<![\d-])(?:\d{13,19}|\d{4}(?:[ -]\d{4}){2}[ -]\d{1,7}|\d{4}[ -]\d{6}[ -]\d{5})(?![\d])"
)
# An account number is a run of digits right after the word that says so ("account no. 12345678").
_ACCOUNT = re.compile(
    r"\b(?:account|acct|a/c)\.?(?:[ \t]{0,3}(?:no\.?|number|num|nr\.?|#))?[ \t]{0,3}[:#]?[ \t]{0,3}"
    r"(\d(?:[ -]?\d){5,17})(?![\d])",
    re.IGNORECASE,
)
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


@dataclass(frozen=True)
class TextOptions:
    """What `anonymize_text` looks for."""

    kinds: tuple[str, ...] = KINDS  # the kinds of personal information to replace (a subset of KINDS)
    # Phone numbers without a country code are read as numbers of this region (ISO 3166 code, e.g. GB, DE).
    phone_region: str = "US"

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ConfigError(
                f"unknown PII kind {unknown[:1] or '(none given)'}; choose from {', '.join(KINDS)}"
            )
        if not re.fullmatch(r"[A-Z]{2}", self.phone_region):
            raise ConfigError(f"phone region {self.phone_region!r}: give a two-letter country code, e.g. US")


@dataclass(frozen=True)
class Finding:
    """One piece of personal information: its kind and where it was in the original text (characters)."""

    kind: str
    start: int
    end: int


@dataclass(frozen=True)
class TextResult:
    text: str  # the text with each finding replaced by <KIND>
    findings: tuple[Finding, ...]  # in order of position, never overlapping

    def counts(self) -> dict[str, int]:
        """How many of each kind were replaced."""
        return dict(Counter(f.kind for f in self.findings))


def anonymize_text(text: str, options: TextOptions = TextOptions()) -> TextResult:
    """`text` with every finding of `options.kinds` replaced by its placeholder, and the findings."""
    if not isinstance(text, str):
        raise ConfigError(f"anonymize_text takes a str, not {type(text).__name__}")
    findings = find_pii(text, options)
    pieces, at = [], 0
    for finding in findings:
        pieces += [text[at : finding.start], f"<{finding.kind}>"]
        at = finding.end
    pieces.append(text[at:])
    return TextResult("".join(pieces), tuple(findings))


def find_pii(text: str, options: TextOptions = TextOptions()) -> list[Finding]:
    """Every finding of `options.kinds` in `text`, overlaps settled in the order of KINDS, sorted by position."""
    starts: list[int] = []  # the kept findings, sorted by start (they never overlap)
    kept: list[Finding] = []
    for kind in KINDS:  # the first kind to claim characters keeps them
        if kind not in options.kinds:
            continue
        for finding in _FINDERS[kind](text, options):
            at = bisect.bisect_right(starts, finding.start)
            if (at and kept[at - 1].end > finding.start) or (at < len(kept) and kept[at].start < finding.end):
                continue
            starts.insert(at, finding.start)
            kept.insert(at, finding)
    return kept


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of payment card numbers (ISO/IEC 7812): every second digit from the right doubled."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    """ISO 13616: 15-34 characters, and the number read with the first four moved to the end is 1 mod 97."""
    compact = candidate.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _matches(pattern: re.Pattern, kind: str, text: str, check: Callable[[str], bool]) -> Iterator[Finding]:
    for match in pattern.finditer(text):
        if check(match.group(0)):
            yield Finding(kind, match.start(), match.end())


def _emails(text: str, options: TextOptions) -> Iterator[Finding]:
    if "@" in text:
        yield from _matches(_EMAIL, "EMAIL", text, lambda _: True)


def _urls(text: str, options: TextOptions) -> Iterator[Finding]:
    for match in _URL.finditer(text):
        end = match.end()
        while end > match.start() and text[end - 1] in _URL_TAIL:
            end -= 1
        if end - match.start() > len("www."):
            yield Finding("URL", match.start(), end)


def _cards(text: str, options: TextOptions) -> Iterator[Finding]:
    yield from _matches(_CARD, "CARD", text, lambda s: luhn_valid(re.sub(r"[ -]", "", s)))


def _accounts(text: str, options: TextOptions) -> Iterator[Finding]:
    for match in _ACCOUNT.finditer(text):
        yield Finding("ACCOUNT", match.start(1), match.end(1))


def _ips(text: str, options: TextOptions) -> Iterator[Finding]:
    yield from _matches(_IPV4, "IP", text, _parses_as_ip)
    if "::" in text or text.count(":") >= 5:
        yield from _matches(_IPV6, "IP", text, lambda s: any(c not in ":" for c in s) and _parses_as_ip(s))


def _parses_as_ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _phones(text: str, options: TextOptions) -> Iterator[Finding]:
    try:
        import phonenumbers
    except ImportError as error:
        raise DependencyError(
            f"finding phone numbers needs the phonenumbers package: {PHONE_INSTALL}"
        ) from error
    matcher = phonenumbers.PhoneNumberMatcher(
        text, options.phone_region, leniency=phonenumbers.Leniency.VALID
    )
    for match in matcher:
        yield Finding("PHONE", match.start, match.end)


_FINDERS: dict[str, Callable[[str, TextOptions], Iterator[Finding]]] = {
    "EMAIL": _emails,
    "URL": _urls,
    "IBAN": lambda text, options: _matches(_IBAN, "IBAN", text, iban_valid),
    "CARD": _cards,
    "ACCOUNT": _accounts,
    "IP": _ips,
    "PHONE": _phones,
}
