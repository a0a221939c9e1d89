"""Trivial baselines that every reward-model table is read against, and the linear Bradley-Terry fit.

A reward model has learned something only if it beats, on the same held-out pairs,

* the **length** rules: "the shorter reply wins" and "the longer reply wins" (length in
  characters; Singhal et al. 2023, "A Long Way to Go: Investigating Length Correlations in
  RLHF", show that length alone explains much of what reward models learn), and
* a **bag-of-words** reward model: TF-IDF of the reply (1-2-grams, sublinear tf) with a linear
  Bradley-Terry head trained on the same training pairs (scikit-learn).

:func:`fit_pairwise_logistic` fits the linear Bradley-Terry model ``P(chosen > rejected) =
sigmoid(w . (x_chosen - x_rejected))`` by L2-regularised logistic regression (scikit-learn's
``LogisticRegression``, C chosen by 5-fold cross-validated log-loss). It serves the TF-IDF baseline
and the ``probe`` reward models of stage 3 (a head on frozen backbone features).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_validate
from threadpoolctl import threadpool_limits

#: Regularisation strengths tried by cross-validation (inverse L2 strength C of scikit-learn).
DEFAULT_CS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0)


def fit_pairwise_logistic(diff, seed: int = 0, cs=DEFAULT_CS, folds: int = 5, patience: int = 2) -> dict:
    """Linear Bradley-Terry weights from feature differences ``x_chosen - x_rejected``.

    Each pair's difference is given a random sign (``numpy.random.default_rng(seed)``) with the
    label "first is chosen" accordingly, so the problem is balanced and the fit needs no intercept.
    Dense features are standardised by their standard deviation (the weights returned apply to
    the raw features); sparse ones are used as they are; BLAS runs on one thread during the fit. C is walked from
    the smallest value up and the
    walk stops once the CV loss has risen ``patience`` times in a row past its minimum (the loss of an
    L2-regularised fit is in practice unimodal in C; the large C are the slow fits, docs/measurements.md).

    Args:
        diff: ``float[N, D]`` (NumPy or SciPy sparse), one row per training pair.
    Returns:
        ``{"weight": float[D] for raw features, "C": chosen C, "cv_log_loss": mean CV log-loss,
        "cv_accuracy": mean CV pairwise accuracy at that C (the same folds), "cv_curve": [[C, CV log-loss], ...]
        of the values tried}``.
    Raises:
        ValueError: fewer than ``2 * folds`` pairs.
    """
    n = diff.shape[0]
    if n < 2 * folds:
        raise ValueError(f"fit_pairwise_logistic needs at least {2 * folds} pairs, got {n}")
    rng = np.random.default_rng(seed)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    if sp.issparse(diff):
        x, scale = sp.diags(sign) @ diff, None
    else:
        diff = np.asarray(diff, float)
        scale = diff.std(axis=0)
        scale[scale == 0] = 1.0
        x = diff / scale * sign[:, None]
    labels = (sign > 0).astype(int)
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)

    def make(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, fit_intercept=False, max_iter=5000)

    losses: list[float] = []
    accuracies: list[float] = []
    with threadpool_limits(1):  # matrix-vector products this size run slower when BLAS hands them to threads
        for c in sorted(cs):  # weakest fit first; stop once the loss has risen `patience` times past its minimum
            scores = cross_validate(make(c), x, labels, cv=cv, scoring=("neg_log_loss", "accuracy"))
            losses.append(-scores["test_neg_log_loss"].mean())
            accuracies.append(scores["test_accuracy"].mean())
            if len(losses) - 1 - int(np.argmin(losses)) >= patience:
                break
        cs, best = sorted(cs), int(np.argmin(losses))
        model = make(cs[best]).fit(x, labels)
    weight = model.coef_[0] if scale is None else model.coef_[0] / scale
    return {"weight": weight, "C": float(cs[best]), "cv_log_loss": float(losses[best]),
            "cv_accuracy": float(accuracies[best]), "cv_curve": [[float(c), float(loss)] for c, loss in zip(cs, losses)]}


def length_scores(chosen: list[str], rejected: list[str], prefer: str = "shorter") -> tuple[np.ndarray, np.ndarray]:
    """Scores of the length rule: ``-len`` (``prefer="shorter"``) or ``+len`` (``"longer"``), in characters.

    Raises:
        ValueError: ``prefer`` is neither ``shorter`` nor ``longer``.
    """
    if prefer not in ("shorter", "longer"):
        raise ValueError(f"prefer must be 'shorter' or 'longer', got {prefer!r}")
    sign = -1.0 if prefer == "shorter" else 1.0
    return (sign * np.array([len(t) for t in chosen], float), sign * np.array([len(t) for t in rejected], float))


class TfidfReward:
    """Bag-of-words reward model: TF-IDF of the reply (1-2-grams, sublinear tf, terms in >= 2 replies)
    with a linear Bradley-Terry head (:func:`fit_pairwise_logistic`).

    Saved as a folder (:meth:`save`): ``tfidf.json`` (settings, C, the vocabulary in column order) and
    ``tfidf.safetensors`` (``idf`` and ``weight``, ``float64[V]``); no pickle.
    """

    SETTINGS = {"ngram_range": [1, 2], "sublinear_tf": True, "min_df": 2}

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.vectorizer = TfidfVectorizer(ngram_range=tuple(self.SETTINGS["ngram_range"]),
                                          sublinear_tf=self.SETTINGS["sublinear_tf"], min_df=self.SETTINGS["min_df"])
        self.weight: np.ndarray | None = None
        self.C: float | None = None

    def fit(self, chosen: list[str], rejected: list[str]) -> "TfidfReward":
        """Fit the vocabulary on all training replies and the head on the training pairs."""
        self.vectorizer.fit(list(chosen) + list(rejected))
        diff = self.vectorizer.transform(chosen) - self.vectorizer.transform(rejected)
        fit = fit_pairwise_logistic(diff.tocsr(), seed=self.seed)
        self.weight, self.C = fit["weight"], fit["C"]
        return self

    def score(self, replies: list[str]) -> np.ndarray:
        """``float[N]`` rewards of ``replies``.

        Raises:
            RuntimeError: called before :meth:`fit`.
        """
        if self.weight is None:
            raise RuntimeError("TfidfReward.score called before fit")
        return np.asarray(self.vectorizer.transform(replies) @ self.weight, float)

    def save(self, folder: str | Path) -> None:
        """Write ``tfidf.json`` and ``tfidf.safetensors`` into ``folder`` (which must exist).

        Raises:
            RuntimeError: called before :meth:`fit`.
        """
        from safetensors.numpy import save_file

        if self.weight is None:
            raise RuntimeError("TfidfReward.save called before fit")
        folder = Path(folder)
        vocabulary = sorted(self.vectorizer.vocabulary_, key=self.vectorizer.vocabulary_.get)
        (folder / "tfidf.json").write_text(json.dumps(
            {"settings": self.SETTINGS, "C": self.C, "seed": self.seed, "vocabulary": vocabulary}) + "\n")
        save_file({"idf": np.ascontiguousarray(self.vectorizer.idf_, np.float64),
                   "weight": np.ascontiguousarray(self.weight, np.float64)}, str(folder / "tfidf.safetensors"))

    @classmethod
    def load(cls, folder: str | Path) -> "TfidfReward":
        """Read a model :meth:`save` wrote; it scores exactly as the saved one.

        Raises:
            FileNotFoundError: ``tfidf.json`` or ``tfidf.safetensors`` is missing.
            ValueError: other settings than :attr:`SETTINGS`, or arrays whose length is not the vocabulary's,
                or non-finite values (the message names the file).
        """
        from safetensors.numpy import load_file

        folder = Path(folder)
        meta_path, arrays_path = folder / "tfidf.json", folder / "tfidf.safetensors"
        for path in (meta_path, arrays_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; {folder} is not a saved TF-IDF reward model")
        meta, arrays = json.loads(meta_path.read_text()), load_file(str(arrays_path))
        if meta.get("settings") != cls.SETTINGS:
            raise ValueError(f"{meta_path}: field 'settings' is {meta.get('settings')}, expected {cls.SETTINGS}")
        n = len(meta["vocabulary"])
        for name in ("idf", "weight"):
            if name not in arrays or arrays[name].shape != (n,) or not np.all(np.isfinite(arrays[name])):
                raise ValueError(f"{arrays_path}: '{name}' must be {n} finite values (one per vocabulary term)")
        model = cls(int(meta["seed"]))
        model.vectorizer.set_params(vocabulary={term: i for i, term in enumerate(meta["vocabulary"])})
        model.vectorizer.idf_ = arrays["idf"]
        model.weight, model.C = arrays["weight"], float(meta["C"])
        return model


def baseline_scores(train_rows: list[dict], test_rows: list[dict], seed: int = 0) -> dict[str, dict]:
    """Scores of every baseline on ``test_rows`` (rows with ``chosen``/``rejected`` reply strings).

    Returns ``{name: {"scores_chosen": [...], "scores_rejected": [...], "description": str}}`` for
    ``shorter wins``, ``longer wins`` and ``tf-idf`` (trained on ``train_rows``).
    """
    chosen, rejected = [r["chosen"] for r in test_rows], [r["rejected"] for r in test_rows]
    out = {}
    for prefer in ("shorter", "longer"):
        c, r = length_scores(chosen, rejected, prefer)
        out[f"{prefer} wins"] = {"scores_chosen": c.tolist(), "scores_rejected": r.tolist(),
                                 "description": f"the {prefer} reply (in characters) is preferred"}
    tfidf = TfidfReward(seed).fit([r["chosen"] for r in train_rows], [r["rejected"] for r in train_rows])
    out["tf-idf"] = {"scores_chosen": tfidf.score(chosen).tolist(), "scores_rejected": tfidf.score(rejected).tolist(),
                     "description": f"TF-IDF 1-2-grams + linear Bradley-Terry head (C = {tfidf.C:g}) trained on "
                                    f"the same {len(train_rows):,} training pairs"}
    return out
