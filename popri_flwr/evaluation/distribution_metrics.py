"""Distribution metrics between two sets of text embeddings (rows = samples).

* :func:`fid`: Fréchet distance between Gaussian fits, the per-round metric of the paper.
* :func:`fid_bootstrap`: FIDs of sample sets on shared prompts under joint resamples of them.
* :func:`fid_change_bootstrap`: a change of FID between two sample sets on the same prompts,
  with its standard error from resampling the prompts.
* :func:`precision_recall`: k-NN manifold precision/recall (Kynkäänniemi et al., 2019).

numpy/scipy only, so the server can compute them without torch.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from scipy import linalg
from scipy.spatial.distance import cdist

logger = logging.getLogger(__name__)

# Rows of the query set processed at once in k-NN distance computations (memory ~ chunk * n * 8 B).
_CHUNK = 1024


def _as_2d(x: np.ndarray, name: str, fn: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{fn}: {name} must be a 2-d array (samples x dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{fn}: {name} contains NaN or inf")
    return x


def _check_pair(a, b, names: tuple[str, str], fn: str, min_rows: int) -> tuple:
    a, b = _as_2d(a, names[0], fn), _as_2d(b, names[1], fn)
    if len(a) < min_rows or len(b) < min_rows:
        raise ValueError(
            f"{fn}: needs at least {min_rows} samples in each set, got {len(a)} and {len(b)}"
        )
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{fn}: embeddings must have the same dimension, got {a.shape[1]} and {b.shape[1]}"
        )
    return a, b


def fid(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussian fits of two embedding sets.

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` with sample covariances.

    Parameters
    ----------
    a, b
        Embeddings, shape ``(n_a, d)`` and ``(n_b, d)``, ``n_a, n_b >= 2``.
    eps
        Added to both covariance diagonals when ``S_a S_b`` has no usable square root (singular
        covariances, e.g. fewer samples than dimensions).

    Returns
    -------
    float
        The distance (>= 0, up to round-off; clipped at 0).

    Raises
    ------
    ValueError
        Fewer than 2 rows in a set, different dimensions, non-finite values.
    """
    a, b = _check_pair(a, b, ("a", "b"), "fid", min_rows=2)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    covmean = _sqrtm(s_a @ s_b)
    if covmean is None:
        # Singular product: regularize as pytorch-fid does.
        offset = np.eye(len(s_a)) * eps
        logger.debug("fid: singular covariance product, adding %g to the diagonals", eps)
        covmean = _sqrtm((s_a + offset) @ (s_b + offset))
        if covmean is None:
            raise ValueError("fid: could not compute the covariance square root (try a larger eps)")
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def _sqrtm(m: np.ndarray) -> np.ndarray | None:
    """Real part of the principal square root, or None when it is unusable."""
    with warnings.catch_warnings():
        # scipy warns on (near-)singular input; we check the result ourselves.
        warnings.simplefilter("ignore")
        root = linalg.sqrtm(m)
    if not np.isfinite(root).all():
        return None
    if np.iscomplexobj(root):
        # Round-off gives tiny imaginary parts; large ones mean the root is meaningless.
        if np.abs(root.imag).max() > 1e-3 * max(np.abs(root.real).max(), 1e-12):
            return None
        root = root.real
    return root


def _fid_to(a: np.ndarray, a_root: np.ndarray, mu_r: np.ndarray, tr_r: float) -> float:
    """FID of ``a`` to a fixed reference (mean ``mu_r``, covariance trace ``tr_r``).

    With ``R = S_r^{1/2}`` and ``A`` the centred rows of ``a``, ``Tr((S_a S_r)^{1/2})`` is the
    sum of square roots of the eigenvalues of ``R S_a R = (A R)^T (A R) / (n - 1)``, which
    are also those of the n x n Gram matrix ``(A R)(A R)^T / (n - 1)``: one symmetric
    ``eigh`` of the smaller side instead of a general ``sqrtm``. ``a_root`` is ``a @ R``.
    """
    n = len(a)
    mean = a.mean(axis=0)
    centred = a - mean
    m = a_root - a_root.mean(axis=0)
    gram = m @ m.T if n < m.shape[1] else m.T @ m
    eig = np.linalg.eigvalsh(gram) / (n - 1)
    diff = mean - mu_r
    tr_a = float(np.einsum("ij,ij->", centred, centred)) / (n - 1)
    value = diff @ diff + tr_a + tr_r - 2.0 * np.sqrt(eig.clip(min=0)).sum()
    return float(max(value, 0.0))


def _reference_terms(reference: np.ndarray, fn: str) -> tuple:
    """Mean, ``S_r^{1/2}`` and ``Tr(S_r)`` of a fixed reference set (for :func:`_fid_to`)."""
    ref = _as_2d(reference, "reference", fn)
    s_r = np.atleast_2d(np.cov(ref, rowvar=False))
    w, v = np.linalg.eigh(s_r)
    return ref.mean(axis=0), (v * np.sqrt(w.clip(min=0))) @ v.T, float(np.trace(s_r))


def fid_bootstrap(
    sets: list[np.ndarray],
    groups: list[np.ndarray],
    reference: np.ndarray,
    draws: int = 200,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """FIDs to ``reference`` of several sample sets under joint cluster resamples of the prompts.

    ``groups[c][i]`` is the prompt of row ``i`` of ``sets[c]``; the sets share their prompts
    (the same labels), not necessarily their rows. Each draw resamples the prompts with
    replacement and takes every row of a drawn prompt from *every* set, so a difference of two
    columns is a paired bootstrap of a change, with the prompts' share of the noise cancelled;
    the reference is held fixed. FID to the fixed reference is computed by :func:`_fid_to`.

    Parameters
    ----------
    sets
        Embeddings ``(n_c, d)`` of each sample set.
    groups
        ``(n_c,)`` prompt labels of each set's rows; every set has the same label set.
    reference
        Embeddings ``(m, d)`` to measure against (held-out text).
    draws
        Bootstrap resamples.
    rng
        Randomness of the resampling (a diagnostic; any seed will do).

    Returns
    -------
    numpy.ndarray
        ``(draws, len(sets))`` FIDs, one row per resample.
    """
    fn = "fid_bootstrap"
    sets = [_as_2d(e, f"sets[{c}]", fn) for c, e in enumerate(sets)]
    groups = [np.asarray(g) for g in groups]
    if not sets or len(groups) != len(sets):
        raise ValueError(
            f"{fn}: expected one groups array per set, got {len(groups)} for {len(sets)} sets"
        )
    labels = np.unique(groups[0])
    for c, (e, g) in enumerate(zip(sets, groups, strict=True)):
        if g.shape != (len(e),):
            raise ValueError(
                f"{fn}: sets[{c}] and groups[{c}] must have the same rows, "
                f"got {e.shape} and {g.shape}"
            )
        if not np.array_equal(np.unique(g), labels):
            raise ValueError(f"{fn}: groups[{c}] has other prompts than groups[0]")
    terms = _reference_terms(reference, fn)
    return _resampled_fids(sets, groups, labels, terms, draws, rng)


def _resampled_fids(sets, groups, labels, terms, draws, rng) -> np.ndarray:
    """:func:`fid_bootstrap` on validated input and precomputed reference terms."""
    mu_r, root_r, tr_r = terms
    roots = [e @ root_r for e in sets]  # once, not per draw
    rows = [[np.flatnonzero(g == k) for k in labels] for g in groups]
    rng = rng if rng is not None else np.random.default_rng()
    out = np.empty((draws, len(sets)))
    for b in range(draws):
        pick = rng.integers(len(labels), size=len(labels))
        for c, (e, r) in enumerate(zip(sets, roots, strict=True)):
            idx = np.concatenate([rows[c][k] for k in pick])
            out[b, c] = _fid_to(e[idx], r[idx], mu_r, tr_r)
    return out


def fid_change_bootstrap(
    before: np.ndarray,
    after: np.ndarray,
    reference: np.ndarray,
    groups: np.ndarray,
    draws: int = 200,
    rng: np.random.Generator | None = None,
) -> dict[str, float]:
    """``FID(after) - FID(before)`` against ``reference``, with a paired cluster bootstrap.

    Row ``i`` of ``before`` and of ``after`` come from the same prompt ``groups[i]`` (e.g. two
    generators sampling the same prompts with the same seeds). Each draw resamples the prompts
    with replacement and takes all of a drawn prompt's rows from *both* sets
    (:func:`fid_bootstrap`), so the prompts' share of FID's noise cancels in the change; the
    reference is held fixed. The standard error is the draws' standard deviation.

    Parameters
    ----------
    before, after
        Embeddings ``(n, d)`` of the two sample sets, rows aligned.
    reference
        Embeddings ``(m, d)`` to measure against (held-out text).
    groups
        ``(n,)`` integer prompt index of each row.
    draws
        Bootstrap resamples.
    rng
        Randomness of the resampling (a diagnostic; any seed will do).

    Returns
    -------
    dict
        ``{"change": FID(after) - FID(before), "se": its bootstrap standard error}``.
    """
    before, after = _check_pair(before, after, ("before", "after"), "fid_change_bootstrap", 2)
    groups = np.asarray(groups)
    if before.shape != after.shape or groups.shape != (len(before),):
        raise ValueError(
            "fid_change_bootstrap: before, after and groups must have the same rows, got "
            f"{before.shape}, {after.shape} and {groups.shape}"
        )
    terms = _reference_terms(reference, "fid_change_bootstrap")
    mu_r, root_r, tr_r = terms
    change = _fid_to(after, after @ root_r, mu_r, tr_r) - _fid_to(
        before, before @ root_r, mu_r, tr_r
    )
    if draws < 2:
        return {"change": change, "se": float("nan")}
    labels = np.unique(groups)
    boot = _resampled_fids([before, after], [groups, groups], labels, terms, draws, rng)
    return {"change": change, "se": float((boot[:, 1] - boot[:, 0]).std(ddof=1))}


def _kth_nn_radius(x: np.ndarray, k: int) -> np.ndarray:
    """Euclidean distance of each row to its k-th nearest *other* row."""
    radii = np.empty(len(x))
    for start in range(0, len(x), _CHUNK):
        d = cdist(x[start : start + _CHUNK], x)
        # Column k of the sorted row is the k-th neighbour (column 0 is the point itself;
        # with duplicates a zero distance to a twin is a legitimate neighbour).
        radii[start : start + _CHUNK] = np.partition(d, k, axis=1)[:, k]
    return radii


def _inside_fraction(query: np.ndarray, ref: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of query rows inside at least one ball B(ref_i, radii_i)."""
    inside = 0
    for start in range(0, len(query), _CHUNK):
        d = cdist(query[start : start + _CHUNK], ref)
        inside += int((d <= radii[None, :]).any(axis=1).sum())
    return inside / len(query)


def precision_recall(real: np.ndarray, synthetic: np.ndarray, k: int = 3) -> dict[str, float]:
    """k-NN manifold precision and recall (Kynkäänniemi et al., 2019) in embedding space.

    Each sample of a set spans a ball whose radius is the Euclidean distance to its k-th nearest
    neighbour within the same set; the union of the balls estimates that set's manifold.

    Parameters
    ----------
    real, synthetic
        Embeddings, shape ``(n, d)`` and ``(m, d)``, at least 2 rows each. For unit-norm
        embeddings Euclidean distance orders neighbours exactly as cosine distance does.
    k
        Neighbour rank for the radii. A set with ``n <= k`` rows uses ``k = n - 1`` (logged).

    Returns
    -------
    dict
        ``{"precision": fraction of synthetic samples inside the real manifold,
        "recall": fraction of real samples inside the synthetic manifold,
        "k_real": k used for the real radii, "k_synthetic": k used for the synthetic radii}``.

    Raises
    ------
    ValueError
        ``k < 1``, fewer than 2 rows in a set, different dimensions, non-finite values.
    """
    if k < 1:
        raise ValueError(f"precision_recall: k must be >= 1, got {k}")
    real, synthetic = _check_pair(
        real, synthetic, ("real", "synthetic"), "precision_recall", min_rows=2
    )
    k_real, k_syn = min(k, len(real) - 1), min(k, len(synthetic) - 1)
    if (k_real, k_syn) != (k, k):
        logger.info(
            "precision_recall: small sets (%d real, %d synthetic): k lowered to %d / %d",
            len(real),
            len(synthetic),
            k_real,
            k_syn,
        )
    precision = _inside_fraction(synthetic, real, _kth_nn_radius(real, k_real))
    recall = _inside_fraction(real, synthetic, _kth_nn_radius(synthetic, k_syn))
    return {
        "precision": precision,
        "recall": recall,
        "k_real": float(k_real),
        "k_synthetic": float(k_syn),
    }
