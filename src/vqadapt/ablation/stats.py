"""Statistics for the ablation report: pure functions on numbers, numpy only.

Conventions used throughout:

* epochs are 1-based, as in ``metrics.jsonl``;
* "correctness" arrays hold one value per test question (EM is 0/1, F1 is in 0..1);
* when a study has several seeds, the paired tests are run on the per-question
  correctness of each seed *concatenated* (seed ``k`` of system A is paired with seed
  ``k`` of system B, question by question); see ``comparisons.paired_comparison``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ArrayLike = Sequence[float] | np.ndarray

# Largest number of resampled values drawn at once (bounds memory for big test sets).
_CHUNK_VALUES = 2_000_000


def _as_array(values: ArrayLike, name: str = "values") -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def bootstrap_means(values: ArrayLike, n_boot: int = 10_000, seed: int = 0) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement, same size) of ``values``.

    When the values take few distinct levels (0/1 correctness, paired differences in
    {-1, 0, 1}) each resample is drawn as a multinomial over the levels, which is the
    same distribution as resampling indices but needs no ``n_boot x n`` matrix.
    """
    array = _as_array(values)
    rng = np.random.default_rng(seed)
    n = array.size
    levels, counts = np.unique(array, return_counts=True)
    if levels.size <= 64:
        draws = rng.multinomial(n, counts / n, size=n_boot)
        return draws @ levels / n
    means = np.empty(n_boot)
    rows = max(1, _CHUNK_VALUES // n)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        means[start:stop] = array[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def _clusters(values: np.ndarray, clusters: Sequence | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums and counts of ``values``, clusters in order of first appearance
    (``None``: every value its own cluster)."""
    if clusters is None:
        return values, np.ones(values.size)
    if len(clusters) != values.size:
        raise ValueError(f"{len(clusters)} cluster labels for {values.size} values")
    index: dict = {}
    keys = np.fromiter((index.setdefault(c, len(index)) for c in clusters), int, values.size)
    return np.bincount(keys, weights=values), np.bincount(keys).astype(float)


def cluster_bootstrap_means(
    values: ArrayLike, clusters: Sequence | None = None, n_boot: int = 10_000, seed: int = 0
) -> np.ndarray:
    """Means of ``n_boot`` resamples of ``values`` that draw whole clusters with replacement
    (as many as there are), each resample's mean being its values' sum over their count.

    Values that share a cluster (one test question answered by the models of several seeds)
    are not independent draws; resampling them one by one would take the pooled values for
    more evidence than they are. With one value per cluster (``clusters`` None, or one seed)
    this is ``bootstrap_means`` exactly, the same draws included; with clusters of equal size,
    ``bootstrap_means`` of the cluster means.
    """
    array = _as_array(values)
    sums, counts = _clusters(array, clusters)
    if np.all(counts == counts[0]):
        return bootstrap_means(sums / counts[0], n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed)
    k = sums.size
    means = np.empty(n_boot)
    rows = max(1, _CHUNK_VALUES // k)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        draw = rng.integers(0, k, size=(stop - start, k))
        means[start:stop] = sums[draw].sum(axis=1) / counts[draw].sum(axis=1)
    return means


def cluster_standard_error(values: ArrayLike, clusters: Sequence | None = None) -> float:
    """Standard error of the mean of ``values`` with clusters drawn at random (the
    cluster-robust "sandwich" form of a ratio mean): ``sqrt(k / (k - 1) * sum_c (S_c - m *
    n_c)^2) / N`` over ``k`` clusters with sums ``S_c`` and sizes ``n_c``, ``N`` values of
    mean ``m``. One value per cluster gives ``std(values, ddof=1) / sqrt(N)``; NaN for fewer
    than two clusters."""
    array = _as_array(values)
    sums, counts = _clusters(array, clusters)
    k = sums.size
    if k < 2:
        return math.nan
    mean = float(array.mean())
    spread = float(np.sum((sums - mean * counts) ** 2))
    return math.sqrt(k / (k - 1) * spread) / array.size


def bootstrap_ci(
    values: ArrayLike, n_boot: int = 10_000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap ``1 - alpha`` confidence interval of the mean.

    A single value gives the degenerate interval ``(v, v)``; no values raise ``ValueError``.
    """
    array = _as_array(values)
    if array.size == 1:
        return float(array[0]), float(array[0])
    means = bootstrap_means(array, n_boot=n_boot, seed=seed)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def paired_bootstrap(
    correct_a: ArrayLike,
    correct_b: ArrayLike,
    n_boot: int = 10_000,
    seed: int = 0,
    clusters: Sequence | None = None,
) -> dict:
    """Paired bootstrap comparison of two systems scored on the same questions.

    Let ``d_i = a_i - b_i`` and ``D = mean(d)``. The questions are resampled with
    replacement ``n_boot`` times (pairs stay together), giving bootstrap means ``D*_j``.
    With ``clusters`` (a label per pair: the question, when the pairs of several seeds are
    pooled), whole clusters are resampled (``cluster_bootstrap_means``).

    * ``diff`` is ``D``; ``ci`` is the 95% percentile interval of ``D*``.
    * ``p_value`` is two-sided and uses the "shift" method (Efron & Tibshirani 1993,
      section 16.4): the bootstrap distribution, re-centred on zero (``D*_j - D``),
      stands for the null "no difference", and
      ``p = (1 + #{j : |D*_j - D| >= |D|}) / (n_boot + 1)``.
      The ``+1`` keeps a Monte Carlo p-value above zero. Identical systems give
      ``p = 1``; for ``d = [1, 0]`` the resampled means are 0, 0.5, 1 with probability
      1/4, 1/2, 1/4, so ``p`` is about 1/2.
    """
    a = _as_array(correct_a, "correct_a")
    b = _as_array(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in length: {a.size} vs {b.size}")
    differences = a - b
    observed = float(differences.mean())
    means = cluster_bootstrap_means(differences, clusters, n_boot=n_boot, seed=seed)
    low, high = np.quantile(means, [0.025, 0.975])
    # The tolerance stops float noise from deciding ties such as |0 - 0.5| >= 0.5.
    extreme = np.count_nonzero(np.abs(means - observed) >= abs(observed) - 1e-12)
    p_value = (1 + extreme) / (n_boot + 1)
    return {"diff": observed, "ci": (float(low), float(high)), "p_value": float(p_value)}


def mcnemar(correct_a: ArrayLike, correct_b: ArrayLike) -> dict:
    """Exact two-sided McNemar test on paired right/wrong outcomes.

    Values are read as correct when ``>= 0.5``. ``b`` counts questions A gets right and
    B gets wrong, ``c`` the reverse; under the null each discordant pair is a fair coin,
    so ``p = min(1, 2 * P(X <= min(b, c)))`` with ``X ~ Binomial(b + c, 1/2)``
    (``p = 1`` when there are no discordant pairs).
    """
    a = _as_array(correct_a, "correct_a") >= 0.5
    b_arr = _as_array(correct_b, "correct_b") >= 0.5
    if a.shape != b_arr.shape:
        raise ValueError(f"paired arrays differ in length: {a.size} vs {b_arr.size}")
    b = int(np.count_nonzero(a & ~b_arr))
    c = int(np.count_nonzero(~a & b_arr))
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "p_value": 1.0}
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return {"b": b, "c": c, "p_value": float(min(1.0, 2 * tail))}


def overfitting_onset(
    train_losses: ArrayLike, val_losses: ArrayLike, patience: int = 2
) -> int | None:
    """First epoch after which the model overfits, or ``None``.

    Epoch ``e`` (1-based) is the onset when, for each of the next ``patience`` epochs
    ``e + 1 .. e + patience``, validation loss rises (strictly, against the epoch before)
    while training loss falls (strictly). ``e`` is thus the last epoch before the
    divergence. Runs shorter than ``patience + 1`` epochs never qualify.
    """
    train = np.asarray(train_losses, dtype=float)
    val = np.asarray(val_losses, dtype=float)
    if train.shape != val.shape:
        raise ValueError(f"train and val curves differ in length: {train.size} vs {val.size}")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    val_rises = np.diff(val) > 0
    train_falls = np.diff(train) < 0
    diverging = val_rises & train_falls  # index i: from epoch i+1 to epoch i+2
    for start in range(diverging.size - patience + 1):
        if diverging[start : start + patience].all():
            return start + 1
    return None


def convergence_epoch(val_losses: ArrayLike) -> int:
    """1-based epoch of the lowest validation loss (the first one on ties)."""
    return int(np.argmin(_as_array(val_losses, "val_losses"))) + 1


def epochs_to_within(values: ArrayLike, frac: float = 0.05, lower_is_better: bool = True) -> int:
    """First 1-based epoch whose value is within ``frac`` of the total improvement.

    With ``best`` the best value and ``first`` the first one, this is the first epoch
    ``e`` with ``|v_e - best| <= frac * |first - best|`` (epoch 1 when nothing improves).
    """
    array = _as_array(values)
    best = array.min() if lower_is_better else array.max()
    span = abs(array[0] - best)
    within = np.abs(array - best) <= frac * span + 1e-12
    return int(np.argmax(within)) + 1


def stability(
    train_loss_std_per_epoch: ArrayLike,
    grad_norm_max_per_epoch: ArrayLike,
    grad_norm_mean_per_epoch: ArrayLike,
) -> dict:
    """Two training-stability numbers (lower is more stable for both).

    * ``loss_std``: the mean over epochs of the within-epoch standard deviation of the
      step losses;
    * ``grad_spike``: the mean over epochs of ``max step grad norm / mean grad norm``
      (1.0 means no step stood out; epochs with a zero mean norm are skipped).
    """
    loss_std = _as_array(train_loss_std_per_epoch, "train_loss_std_per_epoch")
    grad_max = _as_array(grad_norm_max_per_epoch, "grad_norm_max_per_epoch")
    grad_mean = _as_array(grad_norm_mean_per_epoch, "grad_norm_mean_per_epoch")
    if grad_max.shape != grad_mean.shape:
        raise ValueError("grad_norm_max and grad_norm_mean differ in length")
    positive = grad_mean > 0
    spike = float(np.mean(grad_max[positive] / grad_mean[positive])) if positive.any() else math.nan
    return {"loss_std": float(loss_std.mean()), "grad_spike": spike}


def combine_seeds(values: ArrayLike, n_boot: int = 10_000, seed: int = 0) -> dict:
    """Mean, sample std (ddof=1; 0 for one value), count and bootstrap CI over seeds.

    No values give NaNs and ``n = 0``. With two or three seeds the percentile CI can only
    take a handful of values: read it as a range, not a calibrated interval.
    """
    array = np.asarray(values, dtype=float).ravel()
    array = array[np.isfinite(array)]
    if array.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0, "ci": (math.nan, math.nan)}
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {
        "mean": float(array.mean()),
        "std": std,
        "n": int(array.size),
        "ci": bootstrap_ci(array, n_boot=n_boot, seed=seed),
    }


# ---------------------------------------------------------------- power


def _z(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


def minimum_detectable_effect(
    standard_error: float, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The smallest true difference a two-sided test at ``alpha`` detects with ``power``,
    for an estimate with this standard error (normal approximation):
    ``(z_{1 - alpha/2} + z_{power}) * se`` (2.80 x se at the defaults)."""
    return (_z(1 - alpha / 2) + _z(power)) * standard_error


def units_needed(units: float, mde: float, effect: float) -> float:
    """How many units (questions, steps) a test whose minimum detectable effect is ``mde`` on
    ``units`` of them needs to detect ``effect`` with the same power: the standard error falls
    with the square root of the sample, so ``units * (mde / effect)^2``; infinite for a zero
    effect. (With clusters, such as a question's pairs over seeds, more units means more
    clusters of the same size.)"""
    if not (math.isfinite(mde) and math.isfinite(effect)) or effect == 0:
        return math.inf
    return units * (mde / abs(effect)) ** 2


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (Lentz's method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value of Student's t statistic with ``df`` degrees of freedom."""
    if not math.isfinite(t):
        return 0.0 if math.isinf(t) else math.nan
    return incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    upper_tail = 1.0 - p if p > 0.5 else p  # one-sided tail beyond |t|
    low, high = 0.0, 1e6
    for _ in range(200):
        middle = (low + high) / 2
        if t_two_sided_p(middle, df) / 2 > upper_tail:
            low = middle
        else:
            high = middle
    value = (low + high) / 2
    return value if p > 0.5 else -value


def paired_t_test(differences: ArrayLike, alpha: float = 0.05) -> dict:
    """Two-sided one-sample t-test of per-seed differences (are they centred on zero?).

    Returns ``n``, ``mean``, ``sd`` (ddof=1), ``t``, ``p_value`` and the ``1 - alpha``
    ``ci``; with fewer than two values ``p_value`` is NaN (no test). Values without any
    spread give p = 0 when they differ from zero (every seed the same difference) and 1 when
    they are all zero.
    """
    array = _as_array(differences, "differences")
    n, mean = int(array.size), float(array.mean())
    if n < 2:
        return {
            "n": n,
            "mean": mean,
            "sd": math.nan,
            "t": math.nan,
            "p_value": math.nan,
            "ci": (math.nan, math.nan),
        }
    sd = float(array.std(ddof=1))
    if sd == 0.0:
        return {
            "n": n,
            "mean": mean,
            "sd": 0.0,
            "t": math.copysign(math.inf, mean),
            "p_value": 0.0 if mean != 0 else 1.0,
            "ci": (mean, mean),
        }
    se = sd / math.sqrt(n)
    t = mean / se
    half = t_quantile(1 - alpha / 2, n - 1) * se
    return {
        "n": n,
        "mean": mean,
        "sd": sd,
        "t": t,
        "p_value": t_two_sided_p(t, n - 1),
        "ci": (mean - half, mean + half),
    }


def seed_mde(sd_per_seed: float, seeds: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable mean difference of a paired t-test over ``seeds`` seeds whose
    per-seed differences have this SD: ``(t_{1-alpha/2} + t_{power}) * sd / sqrt(k)`` with
    ``k - 1`` degrees of freedom (NaN below two seeds)."""
    if seeds < 2 or not math.isfinite(sd_per_seed):
        return math.nan
    df = seeds - 1
    return (t_quantile(1 - alpha / 2, df) + t_quantile(power, df)) * sd_per_seed / math.sqrt(seeds)


def seeds_needed(
    sd_per_seed: float, effect: float, alpha: float = 0.05, power: float = 0.8, limit: int = 1000
) -> int | None:
    """The fewest seeds whose paired t-test detects ``effect`` with ``power`` (``None``
    beyond ``limit`` or for a zero effect)."""
    if not (math.isfinite(sd_per_seed) and math.isfinite(effect)) or effect == 0:
        return None
    if sd_per_seed == 0:
        return 2
    for seeds in range(2, limit + 1):
        if seed_mde(sd_per_seed, seeds, alpha, power) <= abs(effect):
            return seeds
    return None


def _shift_test(resampled: np.ndarray, observed: float) -> dict:
    """A bootstrap difference summed up: ``diff`` (the observed one), the 95% percentile
    ``ci`` of the resampled ones, the two-sided ``p_value`` of the shift method (as in
    ``paired_bootstrap``) and the bootstrap standard error ``se``."""
    low, high = np.quantile(resampled, [0.025, 0.975])
    extreme = np.count_nonzero(np.abs(resampled - observed) >= abs(observed) - 1e-12)
    return {
        "diff": observed,
        "ci": (float(low), float(high)),
        "p_value": float((1 + extreme) / (resampled.size + 1)),
        "se": float(resampled.std(ddof=1)),
    }


def gap_difference_bootstrap(
    held_out_a: ArrayLike,
    held_out_b: ArrayLike,
    train_a: ArrayLike,
    train_b: ArrayLike,
    n_boot: int = 10_000,
    seed: int = 0,
    held_out_clusters: Sequence | None = None,
    train_clusters: Sequence | None = None,
) -> dict:
    """Compare two models' generalisation gaps (held-out minus training loss), question by
    question: ``D = mean(h_a - h_b) - mean(t_a - t_b)``, positive when A's gap is larger.

    Held-out and training questions are resampled independently (each pair kept together,
    and with ``*_clusters`` each question's pairs from several seeds together), ``n_boot``
    times; ``ci`` is the 95% percentile interval, ``p_value`` the two-sided shift
    p-value as in ``paired_bootstrap``, ``se`` the bootstrap standard error.
    """
    held_a, held_b = _as_array(held_out_a, "held_out_a"), _as_array(held_out_b, "held_out_b")
    tr_a, tr_b = _as_array(train_a, "train_a"), _as_array(train_b, "train_b")
    if held_a.shape != held_b.shape or tr_a.shape != tr_b.shape:
        raise ValueError("paired arrays differ in length")
    held, train = held_a - held_b, tr_a - tr_b
    observed = float(held.mean() - train.mean())
    means = cluster_bootstrap_means(
        held, held_out_clusters, n_boot, seed
    ) - cluster_bootstrap_means(train, train_clusters, n_boot, seed + 1)
    return {
        **_shift_test(means, observed),
        "gap_a": float(held_a.mean() - tr_a.mean()),
        "gap_b": float(held_b.mean() - tr_b.mean()),
    }


def step_stability_bootstrap(
    epochs_a: Sequence[ArrayLike],
    epochs_b: Sequence[ArrayLike],
    block: int = 10,
    n_boot: int = 10_000,
    seed: int = 0,
) -> dict | None:
    """Compare two runs' ``loss_std`` (the mean over epochs of the within-epoch standard
    deviation of the step losses, as ``stability``) step by step.

    Runs with the same seed and training data see the same batches in the same order (an
    epoch's batches are a function of seed and epoch), so their step losses pair up by step;
    ``epochs_a[k]`` and ``epochs_b[k]`` are one epoch's step losses of each (NaN: a skipped
    step, dropped from both). Step losses are autocorrelated, so each epoch is resampled in
    blocks: ``ceil(n / block)`` blocks of ``block`` consecutive steps, drawn with replacement,
    the same steps for both runs, ``n_boot`` times; each resample recomputes both runs'
    ``loss_std``. The blocks wrap around the epoch's end (a circular block bootstrap), so every
    step is drawn equally often: with blocks that stop at the end, an epoch's first and last
    steps are drawn less often, and the first epoch's steep start was missing from most
    resamples (its resampled difference then sat beside the observed one). The resampled
    differences are centred on the observed one (what remains of that bias: a resample's std
    runs a little small). ``diff`` is ``loss_std(b) - loss_std(a)``, positive when A is the
    more stable; ``ci``, ``p_value`` (two-sided, shift method) and ``se`` as in
    ``gap_difference_bootstrap``; ``steps`` the paired steps. ``None`` when no epoch pairs
    (different lengths: not the same batches).
    """
    rng = np.random.default_rng(seed)
    stds_a, stds_b, observed_a, observed_b, steps = [], [], [], [], 0
    for a_values, b_values in zip(epochs_a, epochs_b, strict=True):
        a = np.asarray(a_values, dtype=float).ravel()  # NaN allowed: skipped steps
        b = np.asarray(b_values, dtype=float).ravel()
        if a.shape != b.shape:
            return None
        keep = np.isfinite(a) & np.isfinite(b)
        a, b = a[keep], b[keep]
        n = a.size
        if n < 2:
            continue
        size = min(block, n)
        blocks = math.ceil(n / size)
        boot_a, boot_b = np.empty(n_boot), np.empty(n_boot)
        rows = max(1, _CHUNK_VALUES // n)
        for start in range(0, n_boot, rows):
            count = min(rows, n_boot - start)
            starts = rng.integers(0, n, size=(count, blocks))
            index = ((starts[:, :, None] + np.arange(size)) % n).reshape(count, -1)[:, :n]
            boot_a[start : start + count] = a[index].std(axis=1)
            boot_b[start : start + count] = b[index].std(axis=1)
        stds_a.append(boot_a)
        stds_b.append(boot_b)
        observed_a.append(float(a.std()))
        observed_b.append(float(b.std()))
        steps += n
    if not stds_a:
        return None
    observed = float(np.mean(observed_b) - np.mean(observed_a))
    diffs = np.mean(stds_b, axis=0) - np.mean(stds_a, axis=0)
    diffs += observed - diffs.mean()
    return {
        **_shift_test(diffs, observed),
        "loss_std_a": float(np.mean(observed_a)),
        "loss_std_b": float(np.mean(observed_b)),
        "steps": steps,
    }
