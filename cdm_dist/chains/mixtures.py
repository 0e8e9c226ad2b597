"""Gaussian mixtures in closed form: densities, noised scores, conditionals, 1-D CDFs, L2 distances."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_LOG_2PI = math.log(2 * math.pi)


def gaussian_log_density(
    x: torch.Tensor, means: torch.Tensor, precisions: torch.Tensor, logdets: torch.Tensor
) -> torch.Tensor:
    """log N(x; m_k, C_k) for every component: x (..., d), means (..., K, d) or (K, d) -> (..., K)."""
    diff = x.unsqueeze(-2) - means  # (..., K, d)
    quad = torch.einsum("...kd,kde,...ke->...k", diff, precisions, diff)
    return -0.5 * (quad + logdets + x.shape[-1] * _LOG_2PI)


def mixture_score(
    x: torch.Tensor, log_weights: torch.Tensor, means: torch.Tensor, precisions: torch.Tensor, logdets: torch.Tensor
) -> torch.Tensor:
    """∇_x log Σ_k w_k N(x; m_k, C_k): x (..., d), log_weights (..., K), means (..., K, d) -> (..., d)."""
    log_joint = log_weights + gaussian_log_density(x, means, precisions, logdets)  # (..., K)
    responsibilities = torch.softmax(log_joint, dim=-1)
    component_scores = -torch.einsum("kde,...ke->...kd", precisions, x.unsqueeze(-2) - means)  # (..., K, d)
    return torch.einsum("...k,...kd->...d", responsibilities, component_scores)


@dataclass(frozen=True)
class GaussianMixture:
    """Σ_k w_k N(m_k, C_k) with weights (K,), means (K, d), covariances (K, d, d)."""

    weights: torch.Tensor
    means: torch.Tensor
    covs: torch.Tensor

    def __post_init__(self) -> None:
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.covs.shape != (k, d, d):
            raise ValueError(
                f"mixture: weights {tuple(self.weights.shape)}, means {tuple(self.means.shape)} and "
                f"covariances {tuple(self.covs.shape)} disagree; expected ({k},), ({k}, {d}), ({k}, {d}, {d})"
            )

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> GaussianMixture:
        return GaussianMixture(*(t.to(dtype=dtype, device=device) for t in (self.weights, self.means, self.covs)))

    def noised(self, alpha_bar: float) -> GaussianMixture:
        """The law of x_t = sqrt(ᾱ) x_0 + sqrt(1-ᾱ) ε when x_0 follows this mixture."""
        eye = torch.eye(self.dim, dtype=self.covs.dtype, device=self.covs.device)
        return GaussianMixture(self.weights, alpha_bar**0.5 * self.means, alpha_bar * self.covs + (1 - alpha_bar) * eye)

    def precisions_and_logdets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """C_k^{-1} (K, d, d) and log det C_k (K,), via Cholesky."""
        chol = torch.linalg.cholesky(self.covs)
        return torch.cholesky_inverse(chol), 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log density, x (..., d) -> (...)."""
        precisions, logdets = self.precisions_and_logdets()
        return torch.logsumexp(torch.log(self.weights) + gaussian_log_density(x, self.means, precisions, logdets), -1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """∇_x log p(x), x (..., d) -> (..., d)."""
        precisions, logdets = self.precisions_and_logdets()
        return mixture_score(x, torch.log(self.weights), self.means, precisions, logdets)

    def marginal(self, coords: list[int]) -> GaussianMixture:
        """The marginal over the given coordinates."""
        idx = torch.tensor(coords, device=self.means.device)
        return GaussianMixture(self.weights, self.means[:, idx], self.covs[:, idx][:, :, idx])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws (n, d)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype, device=self.means.device)
        chol = torch.linalg.cholesky(self.covs)
        return self.means[comp] + torch.einsum("nde,ne->nd", chol[comp], z)

    def condition(self, x_coords: list[int], y_coords: list[int]) -> ConditionalMixture:
        """P(Y | X = x) as a mixture whose weights and means depend on x (Gaussian conditioning per component)."""
        xi = torch.tensor(x_coords, device=self.means.device)
        yi = torch.tensor(y_coords, device=self.means.device)
        c_xx = self.covs[:, xi][:, :, xi]
        c_yx = self.covs[:, yi][:, :, xi]
        c_yy = self.covs[:, yi][:, :, yi]
        gain = c_yx @ torch.linalg.inv(c_xx)  # (K, dy, dx)
        marginal_x = GaussianMixture(self.weights, self.means[:, xi], c_xx)
        precisions, logdets = marginal_x.precisions_and_logdets()
        return ConditionalMixture(
            log_weights=torch.log(self.weights),
            means_x=self.means[:, xi],
            means_y=self.means[:, yi],
            gain=gain,
            covs_y=c_yy - gain @ c_yx.transpose(1, 2),
            precisions_x=precisions,
            logdets_x=logdets,
        )


@dataclass(frozen=True)
class ConditionalMixture:
    """The map x -> P(Y | X = x) of a Gaussian-mixture joint; weights and means differ per x, covariances do not."""

    log_weights: torch.Tensor  # (K,)
    means_x: torch.Tensor  # (K, dx)
    means_y: torch.Tensor  # (K, dy)
    gain: torch.Tensor  # (K, dy, dx) = C_yx C_xx^{-1}
    covs_y: torch.Tensor  # (K, dy, dy), the conditional covariances
    precisions_x: torch.Tensor  # (K, dx, dx)
    logdets_x: torch.Tensor  # (K,)

    @property
    def x_dim(self) -> int:
        return self.means_x.shape[1]

    @property
    def y_dim(self) -> int:
        return self.means_y.shape[1]

    def at(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-weights (..., K) and means (..., K, dy) of P(Y | X = x), x (..., dx); differentiable in x."""
        log_w = self.log_weights + gaussian_log_density(x, self.means_x, self.precisions_x, self.logdets_x)
        log_w = torch.log_softmax(log_w, dim=-1)
        means = self.means_y + torch.einsum("kyx,...kx->...ky", self.gain, x.unsqueeze(-2) - self.means_x)
        return log_w, means

    def mixture_at(self, x: torch.Tensor) -> GaussianMixture:
        """P(Y | X = x) for one point x (dx,)."""
        log_w, means = self.at(x)
        return GaussianMixture(log_w.exp(), means, self.covs_y)


def l2_squared(p: GaussianMixture, q: GaussianMixture) -> torch.Tensor:
    """∫ (p - q)^2 in closed form via ∫ N(a, A) N(b, B) = N(a; b, A + B) (the benchmark's l2_gmm)."""

    def inner(a: GaussianMixture, b: GaussianMixture) -> torch.Tensor:
        covs = a.covs[:, None] + b.covs[None, :]  # (Ka, Kb, d, d)
        diff = a.means[:, None] - b.means[None, :]  # (Ka, Kb, d)
        chol = torch.linalg.cholesky(covs)
        z = torch.linalg.solve_triangular(chol, diff.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        log_n = -0.5 * ((z**2).sum(-1) + logdet + a.dim * _LOG_2PI)
        return (a.weights[:, None] * b.weights[None, :] * log_n.exp()).sum()

    return inner(p, p) - 2 * inner(p, q) + inner(q, q)


def mixture_cdf_1d(y: torch.Tensor, log_weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> torch.Tensor:
    """F(y) of a 1-D mixture: y (..., N), log_weights (..., K), means (..., K), stds (K,) -> (..., N)."""
    z = (y.unsqueeze(-1) - means.unsqueeze(-2)) / stds  # (..., N, K)
    return (log_weights.exp().unsqueeze(-2) * torch.special.ndtr(z)).sum(-1)


def mixture_pdf_1d(y: torch.Tensor, log_weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> torch.Tensor:
    """f(y) of a 1-D mixture, same shapes as mixture_cdf_1d."""
    z = (y.unsqueeze(-1) - means.unsqueeze(-2)) / stds
    log_f = log_weights.unsqueeze(-2) - 0.5 * z**2 - torch.log(stds) - 0.5 * _LOG_2PI
    return log_f.exp().sum(-1)


@torch.no_grad()
def mixture_icdf_1d(
    u: torch.Tensor,
    log_weights: torch.Tensor,
    means: torch.Tensor,
    stds: torch.Tensor,
    tol: float = 1e-12,
    max_iter: int = 200,
) -> torch.Tensor:
    """Solve F(y) = u by bracketed Newton (bisection fallback), u (..., N) in (0, 1) -> y (..., N); no gradient.

    A point stops once |F(y) - u| <= tol (or two ulps of the dtype), or once its step moves y by no more than two ulps:
    in float32, F's rounding error is far above 1e-12, so the residual test alone would run to max_iter."""
    shape = u.shape
    eps = torch.finfo(u.dtype).eps
    tol = max(tol, 2 * eps)  # float32 cannot reach 1e-12
    n_comp = log_weights.shape[-1]
    # One row per point: (P,) values with (P, K) parameters.
    log_w = log_weights.unsqueeze(-2).expand(*shape, n_comp).reshape(-1, n_comp)
    mu = means.unsqueeze(-2).expand(*shape, n_comp).reshape(-1, n_comp)
    u = u.reshape(-1)
    # The root lies between the smallest and largest component quantile at level u.
    quantiles = mu + stds * torch.special.ndtri(u)[:, None]  # (P, K)
    lo, hi = quantiles.min(-1).values, quantiles.max(-1).values
    # Start inside the component u falls into, at that component's own quantile: exact when modes are apart.
    weights = log_w.exp()
    cum = torch.cumsum(weights, -1)
    comp = torch.searchsorted(cum, u[:, None]).clamp_max(n_comp - 1)  # (P, 1)
    below = torch.gather(cum - weights, -1, comp)[:, 0]
    local = ((u - below) / torch.gather(weights, -1, comp)[:, 0].clamp_min(1e-300)).clamp(1e-12, 1 - 1e-12)
    y = (torch.gather(mu, -1, comp)[:, 0] + stds[comp[:, 0]] * torch.special.ndtri(local)).clamp(lo, hi)
    active = torch.arange(u.shape[0], device=u.device)
    for _ in range(max_iter):
        ya, lwa, mua, ua = y[active], log_w[active], mu[active], u[active]
        residual = mixture_cdf_1d(ya[:, None], lwa, mua, stds)[:, 0] - ua
        done = residual.abs() <= tol
        if bool(done.all()):
            break
        lo_a = torch.where(residual < 0, ya, lo[active])
        hi_a = torch.where(residual > 0, ya, hi[active])
        newton = ya - residual / mixture_pdf_1d(ya[:, None], lwa, mua, stds)[:, 0]
        step = torch.where((newton > lo_a) & (newton < hi_a), newton, 0.5 * (lo_a + hi_a))
        step = torch.where(done, ya, step)
        y[active], lo[active], hi[active] = step, lo_a, hi_a
        scale = 2 * eps * ya.abs().clamp_min(1e-3)  # two ulps of y (of 1e-3 near 0)
        keep = ~done & ((step - ya).abs() > scale) & (hi_a - lo_a > scale)
        active = active[keep]
        if active.numel() == 0:
            break
    return y.reshape(shape)


def mixture_icdf_1d_reparam(
    u: torch.Tensor, log_weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor
) -> torch.Tensor:
    """Differentiable inverse CDF: the value solves F(y) = u, the gradient is the implicit one -∂F/∂θ / f(y)."""
    y = mixture_icdf_1d(u, log_weights.detach(), means.detach(), stds.detach())
    density = mixture_pdf_1d(y, log_weights.detach(), means.detach(), stds.detach()).clamp_min(1e-300)
    # One Newton correction with a frozen denominator: value unchanged at the root, gradient = implicit function theorem
    # (implicit reparameterisation, Figurnov et al. 2018).
    return y - (mixture_cdf_1d(y, log_weights, means, stds) - u) / density
