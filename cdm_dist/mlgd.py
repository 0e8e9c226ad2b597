"""MLGD and MLGD-F over a batch of chains (MLGD-F paper, Alg. 1 + 2), as a generator of per-step states.

Every chain owns its seed, its zeta schedule and its random streams (cdm_dist.rng), and every operation is
per chain, so a chain's result does not depend on which chains share its batch or how the batch is split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from cdm_dist.config import MLGDConfig, ZetaConfig
from cdm_dist.diffusion import DiffusionSchedule, ddim_step, tweedie_x0
from cdm_dist.errors import InputError
from cdm_dist.losses import Loss, log_mean_exp_loss, make_loss
from cdm_dist.priors import DiffusionPrior, prior_fit
from cdm_dist.rng import Stream, chain_normal, chain_uniform
from cdm_dist.samplers import ConditionalSampler
from cdm_dist.schedules import apply_step_rule, guided_mask, zeta_table
from cdm_dist.targets import Target

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class Chains:
    """B chains: one seed and one zeta schedule each."""

    seeds: tuple[int, ...]
    zetas: tuple[ZetaConfig, ...]

    def __post_init__(self) -> None:
        if len(self.seeds) != len(self.zetas) or not self.seeds:
            raise InputError(f"chains: {len(self.seeds)} seeds but {len(self.zetas)} zeta schedules")

    @classmethod
    def make(cls, seeds: Sequence[int], zeta: ZetaConfig | Sequence[ZetaConfig]) -> Chains:
        zetas = [zeta] * len(seeds) if isinstance(zeta, ZetaConfig) else list(zeta)
        return cls(tuple(int(s) for s in seeds), tuple(zetas))

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: slice) -> Chains:
        return Chains(self.seeds[index], self.zetas[index])


@dataclass
class ChainState:
    """What the loop knows after `step` reverse steps; small and serialisable (a checkpoint)."""

    step: int  # reverse steps done; x is x_0 when step == num_steps
    x: torch.Tensor  # (B, *event)
    failed: torch.Tensor  # (B,) bool: diverged (NaN/Inf) and frozen at 0
    loss: torch.Tensor  # (B,) smoothed guidance loss of this step (NaN where unguided)
    grad_norm: torch.Tensor  # (B,)
    zeta: torch.Tensor  # (B,) the step size used
    x0_hat: torch.Tensor | None = None  # (B, *event) Tweedie estimate of this step

    def checkpoint(self) -> dict[str, torch.Tensor | int]:
        """The minimal state to resume from: the noise streams are functions of (seed, step)."""
        return {"step": self.step, "x": self.x.detach().cpu(), "failed": self.failed.cpu()}


@dataclass
class Denoised:
    """The prior's half of step `step`: ε̂ and x̂0, plus the graph x_t -> x̂0 for the VJP when grad is 'full'."""

    step: int
    eps: torch.Tensor  # (B, *event)
    x0: torch.Tensor  # (B, *event), detached
    x_in: torch.Tensor | None = None  # x_t as a leaf of the graph
    x0_graph: torch.Tensor | None = None  # x̂0 still attached to x_in


@dataclass
class ChainResult:
    """Final x* per chain with its held-out loss and exact metrics."""

    x: torch.Tensor  # (B, *event)
    final_loss: torch.Tensor  # (B,) held-out loss (inf where failed)
    failed: torch.Tensor  # (B,) bool
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,): exact metrics and prior_fit
    loss_history: torch.Tensor | None = None  # (B, T)


class GuidedChains:
    """MLGD / MLGD-F for one batch of chains: the prior, a conditional sampler, a target and a config."""

    def __init__(
        self,
        prior: DiffusionPrior,
        sampler: ConditionalSampler,
        target: Target,
        chains: Chains,
        config: MLGDConfig,
        device: torch.device | str = "cpu",
    ) -> None:
        if target.dim != sampler.y_dim:
            raise InputError(
                f"target: samples have dimension {target.dim} but the sampler produces d_y = {sampler.y_dim}"
            )
        self.prior, self.sampler, self.target, self.chains, self.config = prior, sampler, target, chains, config
        self.device = torch.device(device)
        self.dtype = DTYPES[config.dtype]
        self.schedule: DiffusionSchedule = prior.schedule(config.num_steps)
        self.loss_fn: Loss = make_loss(**config.loss.model_dump())
        self.seeds = torch.tensor(chains.seeds, dtype=torch.int64, device=self.device)
        self.target_samples = target.samples.to(self.device, self.dtype)
        self._tables()

    def _tables(self) -> None:
        cfg, sched = self.config, self.schedule
        cache: dict[ZetaConfig, torch.Tensor] = {}
        for z in self.chains.zetas:
            if z not in cache:
                cache[z] = zeta_table(z, sched, cfg.eta)
        to = {"device": self.device, "dtype": self.dtype}
        self.zeta = torch.stack([cache[z] for z in self.chains.zetas]).to(**to)  # (B, T)
        self.normalize = torch.tensor([z.normalize for z in self.chains.zetas], device=self.device)
        self.trust = torch.tensor([z.trust_radius or float("inf") for z in self.chains.zetas], **to)
        self.guided = guided_mask(len(sched), cfg.guidance_start, cfg.guidance_stop).tolist()
        if cfg.guess_radius == "step_beta":
            self.radius = sched.smoothing_radius().tolist()
        else:
            self.radius = (cfg.guess_scale * torch.sqrt(1 - sched.alpha_bar)).tolist()
        self.sigma = sched.ddim_sigma(cfg.eta).tolist()

    # -- noise, all per chain -------------------------------------------------------------------------
    def _normal(self, stream: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        return chain_normal(self.seeds, stream, step, shape, self.dtype)

    def _target_batch(self, step: int, groups: int) -> torch.Tensor:
        """Target samples per (chain, group): (m, d) shared when all fit, else (B * groups, n_t, d) drawn per chain."""
        m, n_t = self.target_samples.shape[0], self.config.target_batch
        if m <= n_t:
            return self.target_samples
        u = chain_uniform(self.seeds, Stream.TARGET_BATCH, step, (groups, n_t))  # (B, groups, n_t)
        index = (u * m).long().clamp_max(m - 1).reshape(-1, n_t)
        return self.target_samples[index]

    def initial_state(self) -> ChainState:
        """x_T ~ N(0, I) from each chain's stream (or 0, as the MLGD-F code)."""
        shape = tuple(self.prior.event_shape)
        x = self._normal(Stream.INIT, 0, shape)
        if self.config.init == "zero":
            x = torch.zeros_like(x)
        nan = torch.full((len(self.chains),), float("nan"), dtype=self.dtype, device=self.device)
        return ChainState(0, x, torch.zeros(len(self.chains), dtype=torch.bool, device=self.device), nan, nan, nan)

    def resume(self, checkpoint: dict[str, torch.Tensor | int]) -> ChainState:
        """A state from ChainState.checkpoint()."""
        state = self.initial_state()
        state.step = int(checkpoint["step"])
        state.x = torch.as_tensor(checkpoint["x"]).to(self.device, self.dtype)
        state.failed = torch.as_tensor(checkpoint["failed"]).to(self.device)
        return state

    # -- the matching loss (Alg. 2) -------------------------------------------------------------------
    def sample_loss(self, x0: torch.Tensor, step: int, eta_stream: int) -> torch.Tensor:
        """L̂ per chain and guess: x0 (B, G, *event) -> (B, G), with each chain's own eta and target batch."""
        b, g = x0.shape[:2]
        n_c, noise_shape = self.config.n_c, tuple(self.sampler.noise_shape)
        eta = self._normal(eta_stream, step, (g, n_c, *noise_shape)).reshape(b * g, n_c, *noise_shape)
        y = self.sampler.sample(x0.reshape(b * g, *x0.shape[2:]), eta)  # (B*G, n_c, d_y)
        return self.loss_fn(y, self._target_batch(step, g)).reshape(b, g)

    def denoise(self, state: ChainState) -> Denoised:
        """The prior's half of a step: ε̂ and x̂0 (Tweedie) at x_t, keeping the graph when grad is 'full'."""
        i, x = state.step, state.x
        ab = self.schedule.alpha_bar[i].item()
        if self.guided[i] and self.config.grad == "full":
            x_in = x.detach().requires_grad_(True)
            with torch.enable_grad():
                eps = self.prior.predict_noise(x_in, self.schedule.timesteps[i])
                x0 = tweedie_x0(x_in, eps, ab)
            return Denoised(i, eps.detach(), x0.detach(), x_in, x0)
        with torch.no_grad():
            eps = self.prior.predict_noise(x, self.schedule.timesteps[i])
        return Denoised(i, eps, tweedie_x0(x, eps, ab))

    def matching_grad(self, x0: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampler's half: the smoothed loss (B,) at x̂0 (B, *event) and dL/dx̂0 (Alg. 2 with LGD guesses)."""
        cfg = self.config
        x0 = x0.detach().to(self.device, self.dtype).requires_grad_(True)
        noise_step = 0 if cfg.common_random_numbers else i
        with torch.enable_grad():
            guesses = x0.unsqueeze(1)  # (B, 1, *event)
            if cfg.n_guess > 1:  # loss-guided diffusion: guesses x̂0 + r_t ξ (Song et al. 2023)
                xi = self._normal(Stream.GUESS, noise_step, (cfg.n_guess, *x0.shape[1:]))
                guesses = guesses + self.radius[i] * xi
            loss = log_mean_exp_loss(self.sample_loss(guesses, noise_step, Stream.SAMPLER))  # (B,)
            (grad,) = torch.autograd.grad(loss.sum(), x0)
        return loss.detach(), grad

    def advance(
        self,
        state: ChainState,
        denoised: Denoised,
        loss: torch.Tensor | None = None,
        grad_x0: torch.Tensor | None = None,
    ) -> ChainState:
        """The prior's second half: dL/dx_t (a VJP through Tweedie, or identity), then x_{t-1} (Alg. 1, line 4)."""
        i, x = state.step, state.x
        if denoised.step != i:
            raise ValueError(f"denoised step {denoised.step} does not match state step {i}")
        ab, ab_prev = self.schedule.alpha_bar[i].item(), self.schedule.alpha_bar_prev[i].item()
        nan = torch.full_like(state.loss, float("nan"))
        if self.guided[i]:
            if loss is None or grad_x0 is None:
                raise ValueError(f"step {i} is guided: advance needs the loss and dL/dx0")
            grad = grad_x0.to(self.device, self.dtype)
            if denoised.x0_graph is not None:  # full gradient: through Tweedie and the prior's noise model
                (grad,) = torch.autograd.grad(denoised.x0_graph, denoised.x_in, grad)
            trust = self.trust * (1 - ab) ** 0.5
            correction = apply_step_rule(grad, self.zeta[:, i], self.normalize, trust)
            loss, grad_norm, zeta = loss.to(self.device, self.dtype), grad.flatten(1).norm(dim=1), self.zeta[:, i]
        else:
            loss, grad_norm, zeta, correction = nan, nan, torch.zeros_like(nan), 0.0
        noise = self._normal(Stream.REVERSE, i, tuple(x.shape[1:])) if self.sigma[i] > 0 else None
        x_next = ddim_step(x, denoised.eps, ab, ab_prev, self.sigma[i], noise) - correction
        failed = state.failed | ~torch.isfinite(x_next.flatten(1)).all(1)
        x_next = torch.where(failed.view(-1, *[1] * (x.dim() - 1)), torch.zeros_like(x_next), x_next)
        return ChainState(i + 1, x_next.detach(), failed, loss, grad_norm, zeta, denoised.x0)

    def step(self, state: ChainState) -> ChainState:
        """One reverse step for every chain: denoise, then correct by -zeta_t ∇L (Alg. 1)."""
        denoised = self.denoise(state)
        if not self.guided[state.step]:
            return self.advance(state, denoised)
        loss, grad_x0 = self.matching_grad(denoised.x0, state.step)
        return self.advance(state, denoised, loss, grad_x0)

    def states(self, start: ChainState | None = None) -> Iterator[ChainState]:
        """Yield the state after every reverse step until x_0 (guided-diffusion style progressive loop)."""
        state = start or self.initial_state()
        while state.step < len(self.schedule):
            state = self.step(state)
            yield state

    # -- CDMO refinement and held-out evaluation ------------------------------------------------------
    def refine(self, x: torch.Tensor, failed: torch.Tensor) -> torch.Tensor:
        """CDMO (beta -> infinity): Adam on L(x) through the fast sampler, fresh eta each step."""
        if self.config.refine_steps == 0:
            return x
        param = x.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([param], lr=self.config.refine_lr)
        for k in range(self.config.refine_steps):
            opt.zero_grad()
            with torch.enable_grad():
                loss = self.sample_loss(param.unsqueeze(1), k, Stream.REFINE)[:, 0]
                loss.masked_fill(failed, 0.0).sum().backward()
            param.grad = torch.nan_to_num(param.grad, nan=0.0, posinf=0.0, neginf=0.0)
            opt.step()
        return param.detach()

    @torch.no_grad()
    def heldout_loss(self, x: torch.Tensor, stream: int = Stream.EVAL) -> torch.Tensor:
        """The loss on fresh conditional samples against a fresh target sample shared by all chains, (B,)."""
        n = self.config.heldout_samples
        noise_shape = tuple(self.sampler.noise_shape)
        eta = self._normal(stream, 0, (n, *noise_shape))
        y = self.sampler.sample(x, eta)
        target = self.target.heldout(n, self.config.eval_seed).to(self.device, self.dtype)
        return self.loss_fn(y, target)

    def finish(self, state: ChainState, metrics: MetricsFn | None = None) -> ChainResult:
        """Refine (CDMO), then evaluate the final x: held-out loss, exact metrics and the prior fit."""
        x = self.refine(state.x, state.failed)
        failed = state.failed | ~torch.isfinite(x.flatten(1)).all(1)
        x = torch.where(failed.view(-1, *[1] * (x.dim() - 1)), torch.zeros_like(x), x)
        final = self.heldout_loss(x)
        failed = failed | ~torch.isfinite(final)
        final = final.masked_fill(failed, float("inf"))
        scores = (metrics(x) if metrics else {}) | {"prior_fit": prior_fit(self.prior, x, self.config.eval_seed)}
        scores = {k: v.masked_fill(failed, float("nan")) for k, v in scores.items()}
        return ChainResult(x, final, failed, scores)


MetricsFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def run_chains(
    runner: GuidedChains,
    metrics: MetricsFn | None = None,
    on_step: Callable[[ChainState], None] | None = None,
    start: ChainState | None = None,
) -> ChainResult:
    """Drain the loop (calling on_step for each state), then finish; keeps the loss history."""
    history = []
    last = start or runner.initial_state()
    for state in runner.states(last):
        history.append(state.loss)
        if on_step is not None:
            on_step(state)
        last = state
    result = runner.finish(last, metrics)
    if history:
        result.loss_history = torch.stack(history, dim=1)
    return result
