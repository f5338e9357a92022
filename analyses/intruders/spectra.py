"""Intruder dimensions: the numerics of one matrix pair (METHODS.md section 3).

Shuttleworth et al. 2024 ("LoRA vs Full Fine-tuning: An Illusion of Equivalence", arXiv 2410.21228):
for a base matrix W0 = U0 S0 V0^T and its tuned (merged) version Wt = Ut St Vt^T, both in the (out, in)
orientation, the i-th tuned left singular vector is an *intruder dimension* when
sim_i = max_j |cos(Ut[:, i], U0[:, j])| < epsilon, for i among the top k (k = 10, epsilon = 0.5 by default).
The max runs over all min(out, in) columns of the thin U0, i.e. over an orthonormal basis of W0's column space.

Everything here is per matrix, with one thin SVD of W0 and one of Wt, reused for every epsilon.
`iter_reports` walks matrices one at a time and yields small CPU results, so two whole models' spectra and
singular vectors are never held at once.
"""

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp.errors import BadOption, IncompatibleModels

K = 10
EPSILON = 0.5
EPSILONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class SVD(NamedTuple):
    """Thin SVD W = U diag(S) Vh, r = min(out, in); S descending."""

    U: Float[Tensor, "out r"]
    S: Float[Tensor, " r"]
    Vh: Float[Tensor, "r in"]


def _cast(W: Float[Tensor, "out in"], dtype: torch.dtype) -> Float[Tensor, "out in"]:
    if dtype not in (torch.float32, torch.float64):
        raise BadOption(f"SVDs are computed in float32 or float64, got dtype={dtype}")
    return W.to(dtype)


def svd(W: Float[Tensor, "out in"], dtype: torch.dtype = torch.float32) -> SVD:
    """Thin SVD of W computed in `dtype` (float32 or float64, whatever W's dtype), on W's device.

    A wide W is decomposed as W^T = V S U^T, since LAPACK is about twice as fast on tall matrices.
    """
    W = _cast(W, dtype)
    if W.shape[0] < W.shape[1]:
        V, S, Uh = torch.linalg.svd(W.mT, full_matrices=False)
        return SVD(Uh.mT, S, V.mT)
    return SVD(*torch.linalg.svd(W, full_matrices=False))


def svdvals(W: Float[Tensor, "out in"], dtype: torch.dtype = torch.float32) -> Float[Tensor, " r"]:
    """Singular values of W in `dtype`, descending; like `svd`, computed on the tall orientation."""
    W = _cast(W, dtype)
    return torch.linalg.svdvals(W.mT if W.shape[0] < W.shape[1] else W)


def intruder_similarity(U0: Float[Tensor, "out r0"], Ut: Float[Tensor, "out rt"], k: int = K) -> Float[Tensor, " k"]:
    """sim_i = max_j |cos(Ut[:, i], U0[:, j])| for the top-k tuned left singular vectors, j over all of U0.

    Columns are unit vectors, so the cosine is a dot product. k is clipped to rt.
    """
    return (Ut[:, :k].mT @ U0).abs().amax(dim=1)


def effective_rank(S: Float[Tensor, " r"]) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): exp(-sum_i p_i log p_i), p_i = s_i / sum_j s_j.

    In [1, number of non-zero s_i]: 1 for a rank-1 matrix, r for r equal singular values; 0 for a zero matrix.
    """
    total = S.sum()
    if total == 0:
        return 0.0
    p = S[S > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


@dataclass
class MatrixReport:
    """Intruder analysis of one (out, in) matrix; all tensors on the CPU.

    base_s, tuned_s, delta_s: singular values of W0, Wt and delta W = Wt - W0 (descending, r = min(out, in)).
    sims: `intruder_similarity` of the top k tuned directions; intruders: sims < epsilon.
    counts[e]: number of intruders among the top k at epsilons[e].
    delta_erank: `effective_rank` of delta W.
    intruder_energy: ||P delta W||_F^2 / ||delta W||_F^2 with P the orthogonal projector on the intruder left
    singular vectors of Wt (0 when there is no intruder or delta W = 0).
    """

    name: str
    base_s: Float[Tensor, " r"]
    tuned_s: Float[Tensor, " r"]
    sims: Float[Tensor, " k"]
    epsilon: float
    intruders: Bool[Tensor, " k"]
    epsilons: Float[Tensor, " e"]
    counts: Int[Tensor, " e"]
    delta_s: Float[Tensor, " r"]
    delta_erank: float
    intruder_energy: float


def matrix_report(
    W0: Float[Tensor, "out in"],
    Wt: Float[Tensor, "out in"],
    *,
    name: str = "",
    k: int = K,
    epsilon: float = EPSILON,
    epsilons: Sequence[float] = EPSILONS,
    dtype: torch.dtype = torch.float32,
) -> MatrixReport:
    """Intruder analysis of one base/tuned pair of (out, in) matrices: one SVD each, plus delta W's spectrum."""
    if W0.shape != Wt.shape:
        raise IncompatibleModels(
            f"{name or 'matrix'}: base has shape {tuple(W0.shape)}, tuned {tuple(Wt.shape)}; "
            "pass a tuned model fine-tuned from this base"
        )
    W0, Wt = _cast(W0, dtype), _cast(Wt, dtype)
    base, tuned = svd(W0, dtype), svd(Wt, dtype)
    sims = intruder_similarity(base.U, tuned.U, k)
    eps = torch.tensor(epsilons, dtype=sims.dtype, device=sims.device)
    intruders = sims < epsilon
    delta = Wt - W0
    delta_s = svdvals(delta, dtype)
    energy = delta_s.square().sum()
    in_intruders = (tuned.U[:, : len(sims)][:, intruders].mT @ delta).square().sum()
    return MatrixReport(
        name=name,
        base_s=base.S.cpu(),
        tuned_s=tuned.S.cpu(),
        sims=sims.cpu(),
        epsilon=epsilon,
        intruders=intruders.cpu(),
        epsilons=eps.cpu(),
        counts=(sims < eps[:, None]).sum(dim=1).cpu(),
        delta_s=delta_s.cpu(),
        delta_erank=effective_rank(delta_s),
        intruder_energy=float(in_intruders / energy) if energy > 0 else 0.0,
    )


def iter_reports(
    matrices: Iterable[tuple[str, Float[Tensor, "out in"], Float[Tensor, "out in"]]], **kwargs
) -> Iterator[MatrixReport]:
    """`matrix_report` for each (name, W0, Wt) in order; pass a lazy iterable to keep one pair in memory at a time."""
    for name, W0, Wt in matrices:
        yield matrix_report(W0, Wt, name=name, **kwargs)


def intruder_directions(W0: Float[Tensor, "out in"], Wt: Float[Tensor, "out in"], epsilon: float = EPSILON,
                        k: int = K, dtype: torch.dtype = torch.float32) -> SVD:
    """The part of Wt's SVD on its intruders among the top k at `epsilon`: U [out, n], S [n], Vh [n, in]."""
    base, tuned = svd(W0, dtype), svd(Wt, dtype)
    keep = intruder_similarity(base.U, tuned.U, k) < epsilon
    n = len(keep)
    return SVD(tuned.U[:, :n][:, keep], tuned.S[:n][keep], tuned.Vh[:n][keep])


def intruder_update(W0: Float[Tensor, "out in"], Wt: Float[Tensor, "out in"], epsilon: float = EPSILON, k: int = K,
                    dtype: torch.dtype = torch.float32) -> Float[Tensor, "out in"]:
    """sum_{i in intruders} s_i u_i v_i^T over the intruders among Wt's top k at `epsilon`, in `dtype`."""
    U, S, Vh = intruder_directions(W0, Wt, epsilon, k, dtype)
    return (U * S) @ Vh


def scale_intruders(W0: Float[Tensor, "out in"], Wt: Float[Tensor, "out in"], lam: float, epsilon: float = EPSILON,
                    k: int = K, dtype: torch.dtype = torch.float32) -> Float[Tensor, "out in"]:
    """W' = Wt - (1 - lam) * `intruder_update`, in Wt's dtype: lam = 1 gives Wt exactly, lam = 0 removes them.

    W0, Wt in the (out, in) orientation (`matrices.analysis_matrices`); transpose W' back for a Conv1D.
    For a sweep over lam, compute `intruder_update` once and apply this formula yourself.
    """
    return Wt - ((1 - lam) * intruder_update(W0, Wt, epsilon, k, dtype)).to(Wt.dtype)
