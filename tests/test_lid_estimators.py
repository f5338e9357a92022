"""Tests for analyses.lid.knn and analyses.lid.estimators: exactness against brute force, recovery of
known dimensions, and agreement with scikit-dimension (the reference code's estimator)."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from analyses.lid.estimators import (
    levina_bickel_global,
    levina_bickel_local,
    neighbourhood_twonn,
    twonn_global,
    twonn_local,
    twonn_plan,
)
from analyses.lid.knn import KnnPlan, deduplicate, distinct_rows, knn, knn_plan

EMBEDDING_DIM = 384


def embed(latent: torch.Tensor, generator: torch.Generator, noise: float = 1e-4) -> torch.Tensor:
    """(n, d) latent points mapped isometrically into 384-D by a random orthonormal basis."""
    basis, _ = torch.linalg.qr(
        torch.randn(EMBEDDING_DIM, latent.shape[1], generator=generator, dtype=torch.float64)
    )
    jitter = torch.randn(len(latent), EMBEDDING_DIM, generator=generator, dtype=torch.float64)
    return latent @ basis.T + noise * jitter


def subspace(n: int, d: int, seed: int, noise: float = 1e-4) -> torch.Tensor:
    """n Gaussian points on a random d-dimensional linear subspace of 384-D, float64."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return embed(latent, generator, noise)


def swiss_roll(n: int, seed: int) -> torch.Tensor:
    """n points on the 2-D swiss roll (a 3-D curve times a height), embedded in 384-D, float64."""
    generator = torch.Generator().manual_seed(seed)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))
    height = 21 * torch.rand(n, generator=generator, dtype=torch.float64)
    latent = torch.stack([t * torch.cos(t), height, t * torch.sin(t)], dim=1)
    return embed(latent, generator)


def offset_cloud(n: int, seed: int) -> np.ndarray:
    """A 5-D subspace with noise, shifted far from the origin (stresses float32 cancellation)."""
    return (subspace(n, 5, seed, noise=1e-3) + 5.0).numpy()


# Textbook references: full distance matrix, sort, one point at a time, float64 numpy.


def distance_matrix(points: np.ndarray) -> np.ndarray:
    """All pairwise distances by direct differences, with inf on the diagonal."""
    distances = cdist(points, points)
    np.fill_diagonal(distances, np.inf)
    return distances


def reference_twonn_fit(mu: np.ndarray, discard_fraction: float, method: str) -> float:
    mu = np.sort(mu[np.isfinite(mu)])
    n = len(mu)
    n_keep = int(n * (1 - discard_fraction))
    log_mu = np.log(mu[:n_keep])
    if method == "linear":
        y = -np.log(1 - np.arange(1, n_keep + 1) / n)
        return float(log_mu @ y / (log_mu @ log_mu))
    return (n_keep - 1) / (log_mu.sum() + (n - n_keep) * log_mu[-1])


def reference_twonn_local(
    points: np.ndarray, k: int, discard_fraction: float, method: str
) -> np.ndarray:
    hoods = np.argsort(distance_matrix(points), axis=1)[:, :k]
    return reference_twonn_of_hoods(points, hoods, discard_fraction, method)


def reference_twonn_of_hoods(
    points: np.ndarray, hoods: np.ndarray, discard_fraction: float, method: str
) -> np.ndarray:
    """TwoNN of each neighbourhood (a row of indices into points) from its own distance matrix."""
    distances = distance_matrix(points)
    estimates = []
    for hood in hoods:
        nearest = np.sort(distances[np.ix_(hood, hood)], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            mu = nearest[:, 1] / nearest[:, 0]
        estimates.append(reference_twonn_fit(mu, discard_fraction, method))
    return np.array(estimates)


def reference_levina_bickel_local(points: np.ndarray, k: int) -> np.ndarray:
    t = np.sort(distance_matrix(points), axis=1)[:, :k]
    return (k - 1) / np.log(t[:, -1:] / t[:, :-1]).sum(axis=1)


# k nearest neighbours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunking", [{"chunk_size": 17}, {"memory_budget": 5_000}, {}])
def test_knn_matches_brute_force(dtype, chunking):
    points = subspace(203, 6, seed=1, noise=1e-2)  # 17 and the budget's 3 rows do not divide 203
    distances, indices = knn(points, 9, dtype=dtype, **chunking)
    brute = distance_matrix(points.numpy())
    assert distances.dtype == dtype and indices.shape == (203, 9)
    np.testing.assert_array_equal(indices.numpy(), np.argsort(brute, axis=1)[:, :9])
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(distances.double().numpy(), np.sort(brute, axis=1)[:, :9], rtol=rtol)


def test_knn_finds_exact_duplicates_at_distance_zero():
    points = subspace(50, 3, seed=2, noise=1e-2) + 100.0  # far from the origin
    points[10] = points[20]
    distances, indices = knn(points, 3)
    assert distances[10, 0] == 0 and distances[20, 0] == 0
    assert indices[10, 0] == 20 and indices[20, 0] == 10
    assert (distances[:, 0] > 0).sum() == 48


def test_deduplicate_keeps_first_occurrences_in_order():
    a, b, c = torch.eye(3)
    unique = deduplicate(torch.stack([b, a, b, c, a]))
    torch.testing.assert_close(unique, torch.stack([b, a, c]))


def test_knn_of_query_points_matches_brute_force():
    points, queries = swiss_roll(300, seed=13), swiss_roll(40, seed=14)
    distances, indices = knn(points, 7, queries=queries, dtype=torch.float64, chunk_size=9)
    brute = cdist(queries.numpy(), points.numpy())
    np.testing.assert_array_equal(indices.numpy(), np.argsort(brute, axis=1)[:, :7])
    np.testing.assert_allclose(distances.numpy(), np.sort(brute, axis=1)[:, :7], rtol=1e-12)
    itself, at = knn(points, 3, queries=points[:5])  # a query equal to a point finds it, at 0
    assert (itself[:, 0] == 0).all() and at[:, 0].tolist() == list(range(5))
    assert knn(points[:10], 10, queries=queries)[1].shape == (40, 10)  # every point may be a neighbour


def test_distinct_rows_are_first_occurrences():
    a, b = torch.eye(2)
    assert distinct_rows(torch.stack([b, a, b, b, a])).tolist() == [0, 1]


# TwoNN on given neighbourhoods: members' nearest fellow members read from their own neighbour lists


@pytest.mark.parametrize(("width", "memory_budget"), [(2, 2**30), (12, 200_000), (20, 200_000), (40, 2**30)])
def test_neighbourhood_twonn_with_any_list_width_matches_reference(width, memory_budget):
    """Lists shorter than the neighbourhood send most members to the direct fallback (width 2), some
    past the first 16 entries (20), or none (40): every path gives the reference numbers, in chunks
    of about 100 neighbourhoods with the small budget."""
    points = swiss_roll(300, seed=12)
    _, hoods = knn(points, 40, dtype=torch.float64)
    distances, neighbours = knn(points, width, dtype=torch.float64)
    ours = neighbourhood_twonn(points, distances, neighbours, hoods, 0.1, memory_budget=memory_budget)
    expected = reference_twonn_of_hoods(points.numpy(), hoods.numpy(), 0.1, "linear")
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6)


def test_neighbourhood_twonn_at_query_points_matches_reference():
    points, queries = swiss_roll(300, seed=15), swiss_roll(30, seed=16)
    _, hoods = knn(points, 40, queries=queries, dtype=torch.float64)
    distances, neighbours = knn(points, 40, dtype=torch.float64)
    ours = neighbourhood_twonn(points, distances, neighbours, hoods, 0.1, method="mle")
    expected = reference_twonn_of_hoods(points.numpy(), hoods.numpy(), 0.1, "mle")
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6)


def test_knn_refuses_too_many_neighbours():
    with pytest.raises(ValueError, match="lower k"):
        knn(torch.randn(10, 4), 10)


# Chunk plans: everything a pass holds at once fits the budget


def test_knn_plan_counts_every_buffer_on_known_numbers():
    """1000 points of 16 float32 coordinates, k = 10, 1 MiB. Held throughout: points 64,000 B + indices 80,000 B.
    Ranking: + centred points 64,000, squared norms 4,000, top-k queue 16,000 = 228,000 B, then 4,040 B a block
    row (1,010 floats), at most 2**20 // (4 (2000 + 10)) = 130 rows. Measuring: + distances 40,000 = 184,000 B,
    then 840 B a row (a 10 x 16 neighbourhood, 10 sorted distances and 20 indices) in half the budget: 624 rows."""
    assert knn_plan(1000, 16, 10, torch.float32, 2**20) == KnnPlan(130, 624, 228_000 + 130 * 4_040)
    # float64, 300 queries: + query copies 2 x 38,400 B; 80 B a block row over 2**20 // 16,080 = 65 rows
    assert knn_plan(1000, 16, 10, torch.float64, 2**20, queries=300) == KnnPlan(65, 300, 380_800 + 65 * 8_080)
    # a budget below what the points and results take: one row at a time, and the plan says it is over
    assert knn_plan(1000, 16, 10, torch.float32, 100_000) == KnnPlan(1, 1, 228_000 + 4_040)


def test_twonn_plan_counts_every_buffer_on_known_numbers():
    """As above, each point's 10 neighbours its neighbourhood: held 268,000 B (points, lists, r1 and r2, the
    estimates), the lists' heads 120,000 B, then 3,688 B a neighbourhood (1,000 marks, 8 B of offset, 268 B a
    member) in half the budget: 142 neighbourhoods; their heads' 31,240 B a row make room for 1,201 members'
    whole lists (260 B each) or 213 members measured (1,464 B each); the fit takes 520 B a neighbourhood."""
    plan = twonn_plan(1000, 16, 10, 10, torch.float32, 2**20)
    assert (plan.hood_rows, plan.list_members, plan.measured_members, plan.fit_rows) == (142, 1201, 213, 1000)
    assert plan.peak == 388_000 + 142 * 3_688 <= 2**20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plans_for_the_benchmarks_clouds_fit_their_budget(dtype):
    """60,000 points of 128 coordinates, k = 128: every budget that holds the points, lists and results is kept,
    with chunks that grow with it; one that does not runs a row at a time and says it is over."""
    n, d, k, budgets = 60_000, 128, 128, (2**29, 2**30, 2**32)
    for plan_of in (lambda b: knn_plan(n, d, k, dtype, b), lambda b: twonn_plan(n, d, k, k, dtype, b)):
        plans = [plan_of(budget) for budget in budgets]
        assert all(plan.peak <= budget for plan, budget in zip(plans, budgets))
        assert 1 < plans[0].hood_rows < plans[1].hood_rows < plans[2].hood_rows
        assert plan_of(2**20).hood_rows == 1 and plan_of(2**20).peak > 2**20
    assert knn_plan(n, d, k, torch.float32, 2**30).block_rows == 2**30 // (4 * (2 * n + k))  # the rows they had


def test_a_budget_changes_chunks_not_results():
    """Any chunking gives the same bits, from one chunk (the default budget) to a row or member at a time."""
    points = swiss_roll(400, seed=3).float()
    _, hoods = knn(points, 30)
    distances, neighbours = knn(points, 2)  # lists of 2: nearly every member is measured directly
    for budget in (5_000, 300_000):
        assert all(torch.equal(a, b) for a, b in zip(knn(points, 20, memory_budget=budget), knn(points, 20)))
        assert torch.equal(twonn_local(points, 20, memory_budget=budget), twonn_local(points, 20))
        assert torch.equal(levina_bickel_local(points, 20, memory_budget=budget), levina_bickel_local(points, 20))
        assert torch.equal(neighbourhood_twonn(points, distances, neighbours, hoods, memory_budget=budget),
                           neighbourhood_twonn(points, distances, neighbours, hoods))


# Recovery of known dimensions


@pytest.mark.parametrize(("d", "n"), [(2, 1000), (5, 1000), (10, 2000)])
def test_twonn_recovers_subspace_dimension(d, n):
    points = subspace(n, d, seed=d)
    local = twonn_local(points)
    assert local.shape == (n,) and local.dtype == torch.float32
    # k=128 neighbourhoods underestimate d=10 by about 11% (scikit-dimension too): 15% tolerance
    assert abs(local.mean().item() - d) < 0.15 * d
    assert abs(twonn_global(points) - d) < 0.1 * d


def test_twonn_recovers_swiss_roll_dimension():
    local = twonn_local(swiss_roll(2000, seed=3))
    assert abs(local.mean().item() - 2) < 0.15 * 2


@pytest.mark.parametrize("d", [2, 5, 10])
def test_levina_bickel_recovers_subspace_dimension(d):
    points = subspace(1000, d, seed=d)
    assert abs(levina_bickel_global(points) - d) < 0.15 * d
    assert abs(levina_bickel_local(points).mean().item() - d) < 0.15 * d


# float64 mode against the textbook references


@pytest.mark.parametrize("method", ["linear", "mle"])
@pytest.mark.parametrize("memory_budget", [7 * 8 * (40 * EMBEDDING_DIM + 2 * 40 * 40) + 100, 2**30])
def test_twonn_local_float64_matches_reference(method, memory_budget):
    points = swiss_roll(300, seed=4)  # the small budget gives chunks of 7 rows, not dividing 300
    ours = twonn_local(
        points, 40, 0.1, method=method, dtype=torch.float64, memory_budget=memory_budget
    )
    assert ours.dtype == torch.float64
    expected = reference_twonn_local(points.numpy(), 40, 0.1, method)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6)


def test_twonn_mle_without_discarding_is_the_unbiased_mle():
    points = subspace(300, 4, seed=5)
    ours = twonn_local(points, 30, 0.0, method="mle", dtype=torch.float64)
    expected = reference_twonn_local(points.numpy(), 30, 0.0, "mle")
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="method='mle'"):
        twonn_local(points, 30, 0.0)


@pytest.mark.parametrize("method", ["linear", "mle"])
def test_twonn_global_float64_matches_reference(method):
    points = swiss_roll(400, seed=6).numpy()
    nearest = np.sort(distance_matrix(points), axis=1)
    expected = reference_twonn_fit(nearest[:, 1] / nearest[:, 0], 0.1, method)
    ours = twonn_global(torch.from_numpy(points), method=method, dtype=torch.float64)
    assert ours == pytest.approx(expected, rel=1e-6)


def test_levina_bickel_float64_matches_reference():
    points = subspace(300, 4, seed=7)
    expected = reference_levina_bickel_local(points.numpy(), 20)
    ours = levina_bickel_local(points, 20, dtype=torch.float64)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6)
    harmonic = 1 / np.mean(1 / expected)
    ours_global = levina_bickel_global(points, 20, dtype=torch.float64)
    assert ours_global == pytest.approx(harmonic, rel=1e-6)
    mean = levina_bickel_global(points, 20, average="mean", dtype=torch.float64)
    assert mean == pytest.approx(expected.mean(), rel=1e-6)


def test_duplicates_warn_and_their_ratios_are_dropped():
    points = subspace(200, 3, seed=8, noise=1e-2)
    points[[5, 6, 7]] = points[[105, 106, 107]]
    with pytest.warns(UserWarning, match="deduplicate"):
        ours = twonn_local(points, 30, dtype=torch.float64)
    expected = reference_twonn_local(points.numpy(), 30, 0.1, "linear")
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6)
    with pytest.warns(UserWarning, match="6 points dropped"):
        twonn_global(points)
    assert twonn_local(deduplicate(points), 30).isfinite().all()


def test_float32_near_duplicates_behave_as_in_float64():
    points = subspace(300, 3, seed=11, noise=1e-2) + 10.0
    generator = torch.Generator().manual_seed(0)
    jitter = torch.randn(4, EMBEDDING_DIM, generator=generator, dtype=torch.float64)
    points[:4] = points[100:104] + 1e-6 * jitter  # closer than float32 resolves in the Gram
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # near duplicates are not duplicates: no warning
        ours = twonn_local(points, 64)
    exact = twonn_local(points, 64, dtype=torch.float64)
    np.testing.assert_allclose(ours.double().numpy(), exact.numpy(), rtol=1e-4)


# Agreement with scikit-dimension, as the reference code calls it (k=128, 10% discarded)


@pytest.fixture(scope="module")
def skdim_pointwise():
    skdim = pytest.importorskip("skdim")
    points = offset_cloud(500, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimator = skdim.id.TwoNN(discard_fraction=0.1).fit_pw(points, n_neighbors=128)
    return points, estimator.dimension_pw_


def test_twonn_local_float32_matches_scikit_dimension(skdim_pointwise):
    points, theirs = skdim_pointwise
    ours = twonn_local(torch.from_numpy(points), 128, 0.1).double().numpy()
    assert ours.mean() == pytest.approx(theirs.mean(), rel=0.02)
    relative = np.abs(ours / theirs - 1)  # pointwise, too; a float32 near-tie at the k-th
    assert np.quantile(relative, 0.99) < 1e-4  # neighbour can swap one member of a neighbourhood
    assert relative.max() < 0.01


def test_twonn_local_float64_equals_scikit_dimension(skdim_pointwise):
    points, theirs = skdim_pointwise
    ours = twonn_local(torch.from_numpy(points), 128, 0.1, dtype=torch.float64).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-8)


def test_other_estimators_match_scikit_dimension():
    skdim = pytest.importorskip("skdim")
    points = offset_cloud(300, seed=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mle_pointwise = skdim.id.TwoNN(method="mle").fit_pw(points, n_neighbors=64).dimension_pw_
        twonn = skdim.id.TwoNN().fit(points).dimension_
        levina_bickel = skdim.id.MLE().fit(points, n_neighbors=20)
    x = torch.from_numpy(points)
    ours = twonn_local(x, 64, method="mle", dtype=torch.float64).numpy()
    np.testing.assert_allclose(ours, mle_pointwise, rtol=1e-8)
    assert twonn_global(x, dtype=torch.float64) == pytest.approx(twonn, rel=1e-8)
    ours = levina_bickel_local(x, 20, dtype=torch.float64).numpy()
    np.testing.assert_allclose(ours, levina_bickel.dimension_pw_, rtol=1e-8)
    ours_global = levina_bickel_global(x, 20, dtype=torch.float64)
    assert ours_global == pytest.approx(levina_bickel.dimension_, rel=1e-8)
