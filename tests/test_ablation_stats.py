"""Hand-checkable cases for the ablation statistics."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from vqadapt.ablation.stats import (
    bootstrap_ci,
    bootstrap_means,
    combine_seeds,
    convergence_epoch,
    epochs_to_within,
    mcnemar,
    overfitting_onset,
    paired_bootstrap,
    stability,
)


def test_bootstrap_ci_constant_values_is_degenerate() -> None:
    assert bootstrap_ci([0.7] * 10) == pytest.approx((0.7, 0.7))


def test_bootstrap_ci_single_value_and_empty() -> None:
    assert bootstrap_ci([0.42]) == (0.42, 0.42)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])


def test_bootstrap_ci_of_half_correct_matches_normal_approximation() -> None:
    # 100 questions, 50 right: the mean's standard error is 0.05, so the 95% interval
    # is about 0.5 +- 1.96 * 0.05 = (0.40, 0.60).
    low, high = bootstrap_ci([1.0] * 50 + [0.0] * 50)
    assert low == pytest.approx(0.40, abs=0.015)
    assert high == pytest.approx(0.60, abs=0.015)


def test_bootstrap_means_many_levels_uses_index_resampling() -> None:
    values = np.linspace(0.0, 1.0, 200)  # 200 distinct levels
    means = bootstrap_means(values, n_boot=2_000, seed=1)
    assert means.shape == (2_000,)
    assert means.mean() == pytest.approx(0.5, abs=0.01)
    assert means.std() == pytest.approx(values.std() / math.sqrt(200), rel=0.1)


def test_paired_bootstrap_identical_systems() -> None:
    correct = [1, 0, 1, 1, 0, 0, 1, 0] * 5
    result = paired_bootstrap(correct, correct)
    assert result["diff"] == 0.0
    assert result["ci"] == (0.0, 0.0)
    assert result["p_value"] == 1.0


def test_paired_bootstrap_two_questions_by_hand() -> None:
    # d = [1, 0]: resampled means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4;
    # |D* - 0.5| >= 0.5 for D* in {0, 1}: p is about 1/2.
    result = paired_bootstrap([1, 0], [0, 0], n_boot=20_000)
    assert result["diff"] == 0.5
    assert result["p_value"] == pytest.approx(0.5, abs=0.02)


def test_paired_bootstrap_clearly_better_system() -> None:
    rng = np.random.default_rng(3)
    better = (rng.random(200) < 0.8).astype(float)
    worse = (rng.random(200) < 0.4).astype(float)
    result = paired_bootstrap(better, worse)
    assert result["diff"] > 0.25
    assert result["ci"][0] > 0
    assert result["p_value"] < 0.01


def test_paired_bootstrap_rejects_unpaired_lengths() -> None:
    with pytest.raises(ValueError, match="length"):
        paired_bootstrap([1, 0], [1, 0, 1])


def test_mcnemar_exact_values() -> None:
    # b = 0, c = 6: p = 2 * 0.5**6.
    result = mcnemar([0] * 6 + [1] * 4, [1] * 6 + [1] * 4)
    assert (result["b"], result["c"]) == (0, 6)
    assert result["p_value"] == pytest.approx(0.03125)
    # b = 1, c = 5: p = 2 * (1 + 6) / 64.
    result = mcnemar([1] + [0] * 5, [0] + [1] * 5)
    assert result["p_value"] == pytest.approx(14 / 64)


def test_mcnemar_balanced_and_concordant() -> None:
    assert mcnemar([1, 0, 1, 0], [0, 1, 0, 1])["p_value"] == 1.0
    assert mcnemar([1, 1, 0], [1, 1, 0]) == {"b": 0, "c": 0, "p_value": 1.0}


def test_overfitting_onset_on_synthetic_curves() -> None:
    train = [3.0, 2.5, 2.1, 1.8, 1.6, 1.4, 1.3]
    val = [3.1, 2.7, 2.4, 2.3, 2.4, 2.6, 2.9]
    assert overfitting_onset(train, val) == 4
    assert overfitting_onset(train, val, patience=3) == 4
    assert overfitting_onset(train, val, patience=4) is None


def test_overfitting_onset_needs_train_loss_falling() -> None:
    # Validation rises but so does training loss: divergence, not overfitting.
    assert overfitting_onset([3.0, 2.5, 2.6, 2.7], [3.1, 2.7, 2.8, 2.9]) is None


def test_overfitting_onset_one_blip_is_not_enough() -> None:
    train = [3.0, 2.5, 2.1, 1.8, 1.6]
    val = [3.1, 2.7, 2.8, 2.5, 2.4]
    assert overfitting_onset(train, val) is None


def test_convergence_and_epochs_to_within() -> None:
    val = [3.0, 2.0, 1.55, 1.5, 1.6]
    assert convergence_epoch(val) == 4
    assert convergence_epoch([2.0, 1.0, 1.0]) == 2
    # total improvement 1.5; within 10% (0.15) of the best from epoch 3 on.
    assert epochs_to_within(val, frac=0.1) == 3
    assert epochs_to_within([0.2, 0.5, 0.6], frac=0.0, lower_is_better=False) == 3
    assert epochs_to_within([1.0, 1.0]) == 1


def test_stability_definition() -> None:
    result = stability([0.2, 0.4], [3.0, 2.0], [1.0, 1.0])
    assert result == {"loss_std": pytest.approx(0.3), "grad_spike": pytest.approx(2.5)}
    assert math.isnan(stability([0.1], [0.0], [0.0])["grad_spike"])


def test_combine_seeds() -> None:
    result = combine_seeds([0.5, 0.7])
    assert result["mean"] == pytest.approx(0.6)
    assert result["std"] == pytest.approx(math.sqrt(0.02))
    assert result["n"] == 2
    assert 0.5 <= result["ci"][0] <= result["ci"][1] <= 0.7
    single = combine_seeds([0.4])
    assert (single["std"], single["ci"]) == (0.0, (0.4, 0.4))
    assert combine_seeds([])["n"] == 0


# ---------------------------------------------------------------- power (issue 17)


def test_student_t_against_table_values() -> None:
    """Quantiles and p-values of Student's t match printed tables (no scipy here)."""
    from vqadapt.ablation.stats import t_quantile, t_two_sided_p

    for df, quantile in ((1, 12.7062), (2, 4.30265), (9, 2.26216), (30, 2.04227)):
        assert t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-4)
        assert t_two_sided_p(quantile, df) == pytest.approx(0.05, abs=1e-5)
    assert t_quantile(0.8, 2) == pytest.approx(1.06066, abs=1e-4)
    assert t_quantile(0.025, 9) == pytest.approx(-2.26216, abs=1e-4)
    assert t_two_sided_p(0.0, 5) == pytest.approx(1.0)


def test_minimum_detectable_effect_and_questions_needed() -> None:
    """MDE = (z_0.975 + z_0.8) x SE = 2.8016 x SE; the questions needed for an effect of
    exactly that size are the questions the SE came from."""
    from vqadapt.ablation.stats import minimum_detectable_effect, units_needed

    assert minimum_detectable_effect(1.0) == pytest.approx(2.8016, abs=1e-4)
    sd, n = 0.4, 800
    mde = minimum_detectable_effect(sd / math.sqrt(n))
    assert units_needed(n, mde, mde) == pytest.approx(n)
    assert units_needed(n, mde, -mde / 2) == pytest.approx(4 * n)
    # the textbook form, ((z + z) sd / effect)^2, for any effect
    assert units_needed(n, mde, 0.05) == pytest.approx((2.8016 * sd / 0.05) ** 2, rel=1e-4)
    assert units_needed(n, mde, 0.0) == math.inf


def test_paired_t_test_by_hand_and_edge_cases() -> None:
    from vqadapt.ablation.stats import paired_t_test

    result = paired_t_test([1.0, 2.0, 3.0])  # mean 2, sd 1, t = 2 sqrt(3), df 2
    assert result["t"] == pytest.approx(2 * math.sqrt(3))
    assert result["p_value"] == pytest.approx(0.0742, abs=1e-3)
    low, high = result["ci"]
    assert low == pytest.approx(2 - 4.30265 / math.sqrt(3), abs=1e-3) and high > 2
    assert math.isnan(paired_t_test([0.5])["p_value"])  # one seed: no test
    assert paired_t_test([0.5, 0.5, 0.5])["p_value"] == 0.0  # no spread, not zero
    assert paired_t_test([0.0, 0.0])["p_value"] == 1.0


def test_seed_mde_falls_with_seeds_and_seeds_needed_inverts_it() -> None:
    from vqadapt.ablation.stats import seed_mde, seeds_needed

    mdes = [seed_mde(1.0, k) for k in (2, 3, 5, 10, 30)]
    assert all(a > b for a, b in itertools.pairwise(mdes))
    assert math.isnan(seed_mde(1.0, 1))
    needed = seeds_needed(1.0, mdes[2])
    assert needed == 5
    assert seeds_needed(1.0, 0.0) is None


def test_a_question_answered_by_several_seeds_is_resampled_as_one_cluster() -> None:
    """Pairs pooled over seeds: one question's pairs are not independent draws. With every
    value in its own cluster the cluster bootstrap is ``bootstrap_means`` draw for draw; six
    copies of the same differences, clustered by question, carry the evidence of one copy
    (the same resampled means), where resampling the pairs one by one would narrow the
    spread by sqrt(6); the standard error follows the same rule, and by hand for clusters
    of unequal size."""
    from vqadapt.ablation.stats import (
        cluster_bootstrap_means,
        cluster_standard_error,
        paired_bootstrap,
    )

    rng = np.random.default_rng(3)
    d = rng.choice([-1.0, 0.0, 1.0], size=300, p=[0.25, 0.5, 0.25]) + 0.0
    plain = bootstrap_means(d, n_boot=4000, seed=5)
    assert np.array_equal(cluster_bootstrap_means(d, None, 4000, 5), plain)
    labels = [f"q{i}" for i in range(300)]
    assert np.array_equal(cluster_bootstrap_means(d, labels, 4000, 5), plain)
    pooled, pooled_labels = np.tile(d, 6), labels * 6
    assert np.allclose(cluster_bootstrap_means(pooled, pooled_labels, 4000, 5), plain)
    naive = bootstrap_means(pooled, n_boot=4000, seed=5)
    assert naive.std() == pytest.approx(plain.std() / math.sqrt(6), rel=0.1)
    se = cluster_standard_error(d)
    assert se == pytest.approx(d.std(ddof=1) / math.sqrt(300))
    assert cluster_standard_error(d, labels) == pytest.approx(se)
    assert cluster_standard_error(pooled, pooled_labels) == pytest.approx(se)
    # unequal clusters: m = 0.75, cluster sums 1 (2 values), 1, 1:
    # sqrt(3/2 * (0.5^2 + 0.25^2 + 0.25^2)) / 4 = 0.1875
    assert cluster_standard_error([1, 0, 1, 1], ["a", "a", "b", "c"]) == pytest.approx(0.1875)
    assert math.isnan(cluster_standard_error([1, 0], ["a", "a"]))
    sizes = rng.integers(1, 5, size=400)
    values = rng.normal(0.1, 1.0, sizes.sum())
    groups = np.repeat(np.arange(400), sizes).tolist()
    means = cluster_bootstrap_means(values, groups, 4000, 0)
    assert means.std() == pytest.approx(cluster_standard_error(values, groups), rel=0.1)
    with pytest.raises(ValueError, match="3 cluster labels for 4 values"):
        cluster_bootstrap_means([1, 0, 1, 1], ["a", "b", "c"])
    # the paired test: six seeds that repeat one seed's answers add no evidence
    a = (rng.random(200) < 0.6).astype(float)
    b = (rng.random(200) < 0.5).astype(float)
    one = paired_bootstrap(a, b, n_boot=4000)
    six = paired_bootstrap(np.tile(a, 6), np.tile(b, 6), n_boot=4000, clusters=list(range(200)) * 6)
    assert six["ci"] == pytest.approx(one["ci"]) and six["p_value"] == one["p_value"]


def test_gap_difference_bootstrap_finds_a_larger_gap() -> None:
    """A overfits more: same held-out losses as B, lower training losses."""
    from vqadapt.ablation.stats import gap_difference_bootstrap

    rng = np.random.default_rng(0)
    held = rng.normal(1.0, 0.2, 400)
    train_b = rng.normal(0.8, 0.2, 300)
    result = gap_difference_bootstrap(held, held, train_b - 0.2, train_b, n_boot=2000)
    assert result["diff"] == pytest.approx(0.2)
    assert result["p_value"] < 0.01 and result["ci"][0] > 0.1
    same = gap_difference_bootstrap(held, held, train_b, train_b, n_boot=2000)
    assert same["diff"] == 0.0 and same["p_value"] == 1.0


def test_step_stability_bootstrap_pairs_runs_step_by_step() -> None:
    """Two runs on the same batches: the one whose losses swing less around each epoch's mean
    is the more stable, decided by a block bootstrap over steps; the observed loss_stds are
    ``stability``'s (mean over epochs of the within-epoch std); a run against itself differs
    by nothing; skipped steps drop out of both; epochs of other lengths do not pair."""
    from vqadapt.ablation.stats import stability, step_stability_bootstrap

    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(120) for _ in range(3)]  # shared batch difficulty
    calm = [1.0 + 0.10 * b + 0.02 * rng.standard_normal(120) for b in batches]
    rough = [1.0 + 0.12 * b + 0.02 * rng.standard_normal(120) for b in batches]
    result = step_stability_bootstrap(calm, rough, n_boot=2000)
    expected_a = stability([np.std(e) for e in calm], [1.0] * 3, [1.0] * 3)["loss_std"]
    assert result["loss_std_a"] == pytest.approx(expected_a)
    assert result["diff"] == pytest.approx(result["loss_std_b"] - result["loss_std_a"])
    assert result["diff"] > 0 and result["ci"][0] > 0 and result["p_value"] < 0.01
    assert result["steps"] == 360 and result["se"] > 0
    same = step_stability_bootstrap(calm, calm, n_boot=500)
    assert same["diff"] == 0 and same["p_value"] == 1.0
    holed = [list(e) for e in rough]
    holed[0][5] = math.nan
    assert step_stability_bootstrap(calm, holed, n_boot=200)["steps"] == 359
    assert step_stability_bootstrap(calm, [e[:-1] for e in rough], n_boot=200) is None


def test_step_stability_interval_is_centred_on_a_steep_first_epoch() -> None:
    """A first epoch whose loss falls steeply over its first steps: its std rests on those few
    steps. Blocks that stop at the epoch's end drew them less often than the rest, so the
    resampled difference sat well below the observed one and the interval beside it; wrapped
    blocks draw every step equally often, and the interval is centred on the observation."""
    from vqadapt.ablation.stats import step_stability_bootstrap

    rng = np.random.default_rng(1)
    steps = np.arange(125)
    a = 2 * np.exp(-steps / 8) + 0.3 + 0.1 * rng.standard_normal(125)
    b = 1.03 * a + 0.005 * rng.standard_normal(125)
    result = step_stability_bootstrap([a], [b], n_boot=4000)
    low, high = result["ci"]
    assert low < result["diff"] < high
    assert abs((low + high) / 2 - result["diff"]) < 0.1 * (high - low)
