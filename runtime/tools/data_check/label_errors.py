"""Likely label errors: a quick model on cheap features (12 x 12 image pixels; log-mel means, deviations and
means per quarter of the recording; the words and word pairs seen in two texts or more), its out-of-sample probabilities from k-fold cross-validation (scikit-learn), and
cleanlab's confident learning on them (`cleanlab.filter.find_label_issues`): a row is flagged when the model,
never having seen it, confidently puts it in another class, and more rows of its class were so placed than the
class's estimated noise rate leaves room for. Both packages are the optional extra `polysense[check]`."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from tqdm import tqdm

from polysense.errors import DependencyError
from polysense.tools.data_check.fingerprints import normalise_text
from polysense.tools.data_check.scan import Scan

log = logging.getLogger("polysense")

INSTALL = "pip install 'polysense[check]'"


@dataclass(frozen=True)
class LabelIssue:
    line: int
    split: str
    given: str  # the label in the manifest
    suggested: str  # the class the model puts it in
    given_probability: float  # the model's out-of-sample probability of the given label


@dataclass(frozen=True)
class LabelIssues:
    ran: bool
    note: str  # why it did not run, or how it ran
    rows_used: int = 0
    folds: int = 0
    cv_accuracy: float = 0.0  # of the quick model's out-of-sample predictions (how much to trust it)
    issues: tuple[LabelIssue, ...] = ()  # most likely first


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise DependencyError(
            f"{name.split('.')[0]} is not installed ({error}); finding label errors needs it: {INSTALL}"
        ) from error


def dependencies_missing() -> str | None:
    """Why the label-error finder cannot run here, or None."""
    for name in ("sklearn", "cleanlab"):
        try:
            found = importlib.util.find_spec(name) is not None
        except ValueError:  # in sys.modules as None: imports of it fail
            found = False
        if not found:
            return f"{name} is not installed; {INSTALL} to find likely label errors"
    return None


def features(scan: Scan, indices: Sequence[int]):  # -> scipy.sparse.csr_matrix
    """The quick model's inputs for `indices`: each modality's features standardised (zeros where missing) with a
    column saying it is present, and the hashed words of the texts."""
    sparse = _import("scipy.sparse")
    text = _import("sklearn.feature_extraction.text")
    blocks = []
    for modality in ("image", "audio"):
        found = scan.modalities[modality].features
        if not found:
            continue
        width = len(next(iter(found.values())))
        dense = np.zeros((len(indices), width + 1), np.float32)
        for position, index in enumerate(indices):
            if index in found:
                dense[position, :width], dense[position, width] = found[index], 1.0
        values = dense[:, :width]
        present = dense[:, width] == 1
        mean, std = values[present].mean(axis=0), values[present].std(axis=0) + 1e-6
        values[present] = (values[present] - mean) / std
        blocks.append(sparse.csr_matrix(dense))
    if scan.modalities["text"].exact:
        texts = [normalise_text(scan.rows[i].text or "") for i in indices]
        # Words and word pairs seen in two texts or more (no label is looked at), present or not, l2-normalised.
        vectorizer = text.CountVectorizer(ngram_range=(1, 2), min_df=2, binary=True, dtype=np.float32)
        try:
            counts = vectorizer.fit_transform(texts)
        except ValueError:  # no word occurs twice
            counts = sparse.csr_matrix((len(indices), 0), dtype=np.float32)
        norms = np.sqrt(np.asarray(counts.multiply(counts).sum(axis=1))).ravel()
        blocks.append(sparse.diags(1 / np.maximum(norms, 1e-9)) @ counts)
    return sparse.hstack(blocks).tocsr()


def find_label_issues(scan: Scan, folds: int = 5, seed: int = 0, progress: bool = True) -> LabelIssues:
    """Likely label errors among the rows with a label and a readable cell; raises DependencyError without
    scikit-learn or cleanlab."""
    filters = _import("cleanlab.filter")
    linear = _import("sklearn.linear_model")
    selection = _import("sklearn.model_selection")
    threadpools = _import("threadpoolctl")
    readable = {i for cells in scan.modalities.values() for i in cells.exact}
    indices = [i for i in sorted(readable) if scan.rows[i].label is not None]
    labels = sorted({str(scan.rows[i].label) for i in indices})
    if len(labels) < 2:
        return LabelIssues(False, "needs rows of at least two labels")
    given = np.array([labels.index(str(scan.rows[i].label)) for i in indices])
    smallest = int(np.bincount(given, minlength=len(labels)).min())
    folds = min(folds, smallest)
    if folds < 2:
        return LabelIssues(False, f"a label has {smallest} row; cross-validation needs 2 or more of each")
    inputs = features(scan, indices)
    probabilities = np.zeros((len(indices), len(labels)))
    splitter = selection.StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    parts = splitter.split(np.zeros(len(given)), given)
    # One thread: on a busy machine, scikit-learn's thread pools spinning against each other made a fit 10x slower.
    with threadpools.threadpool_limits(1), warnings.catch_warnings():
        # lbfgs stopping at max_iter short of its tolerance still ranks the rows; the warning would only alarm
        warnings.simplefilter("ignore", _import("sklearn.exceptions").ConvergenceWarning)
        for fit, held in tqdm(
            parts, total=folds, desc="label model", unit="fold", disable=not progress, leave=False
        ):
            model = linear.LogisticRegression(C=1.0, max_iter=300)
            model.fit(inputs[fit], given[fit])
            probabilities[np.ix_(held, model.classes_)] = model.predict_proba(inputs[held])
    ranked = filters.find_label_issues(given, probabilities, return_indices_ranked_by="self_confidence")
    issues = tuple(
        LabelIssue(
            scan.rows[indices[k]].line,
            scan.rows[indices[k]].split or "",
            labels[given[k]],
            labels[int(probabilities[k].argmax())],
            round(float(probabilities[k, given[k]]), 4),
        )
        for k in ranked
    )
    accuracy = float((probabilities.argmax(axis=1) == given).mean())
    note = f"logistic regression on cheap features, {folds}-fold out-of-sample probabilities, cleanlab"
    return LabelIssues(True, note, len(indices), folds, round(accuracy, 4), issues)


def label_issues(scan: Scan, wanted: bool | None, folds: int, seed: int, progress: bool) -> LabelIssues:
    """find_label_issues as asked: False skips it, None runs it where its packages are installed (else a note
    says how to get them), True runs it or raises DependencyError."""
    if wanted is False:
        return LabelIssues(False, "turned off")
    missing = dependencies_missing()
    if missing is not None and wanted is None:
        log.info("likely label errors skipped: %s", missing)
        return LabelIssues(False, missing)
    return find_label_issues(scan, folds, seed, progress)
