"""MLGD and MLGD-F over a batch of chains (MLGD-F paper, Alg. 1 + 2), as a generator of per-step states.

Every chain owns its seed, its zeta schedule and its random streams (cdm_dist.chains.rng), and every operation is
per chain, so a chain's result does not depend on which chains share its batch or how the batch is split.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from cdm_dist.chains.config import MLGDConfig, ZetaConfig
from cdm_dist.chains.diffusion import DiffusionSchedule, ddim_step_from_x0
from cdm_dist.chains.losses import Loss, PreparedTarget, log_mean_exp_loss
from cdm_dist.chains.priors import DiffusionPrior, prior_fit
from cdm_dist.chains.rng import ChainStreams, Stream, chain_normal
from cdm_dist.chains.samplers import ConditionalSampler
from cdm_dist.chains.schedules import apply_step_rule, guided_mask, timestep_window, zeta_table
from cdm_dist.chains.targets import Target
from cdm_dist.errors import InputError

DTYPES = {"float64": torch.float64, "float32": torch.float32}
Device = torch.device | str


@dataclass(frozen=True)
class Chains:
    """B chains: one seed, one zeta schedule and one start step each (0: from x_T ~ N(0, I); K > 0: an editing
    chain, from the source noised to step K, SDEdit-style)."""

    seeds: tuple[int, ...]
    zetas: tuple[ZetaConfig, ...]
    starts: tuple[int, ...] = ()  # empty: every chain starts at step 0

    def __post_init__(self) -> None:
        if len(self.seeds) != len(self.zetas) or not self.seeds:
            raise InputError(f"chains: {len(self.seeds)} seeds but {len(self.zetas)} zeta schedules")
        if self.starts and len(self.starts) != len(self.seeds):
            raise InputError(f"chains: {len(self.seeds)} seeds but {len(self.starts)} start steps")

    @classmethod
    def make(
        cls, seeds: Sequence[int], zeta: ZetaConfig | Sequence[ZetaConfig], starts: Sequence[int] | None = None
    ) -> Chains:
        zetas = [zeta] * len(seeds) if isinstance(zeta, ZetaConfig) else list(zeta)
        return cls(tuple(int(s) for s in seeds), tuple(zetas), tuple(int(k) for k in starts or ()))

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: slice) -> Chains:
        return Chains(self.seeds[index], self.zetas[index], self.starts[index])

    @property
    def start_steps(self) -> tuple[int, ...]:
        """Each chain's first reverse step."""
        return self.starts or (0,) * len(self.seeds)

    @property
    def edits(self) -> bool:
        """Whether some chain starts from a source."""
        return any(self.starts)


@dataclass(frozen=True)
class Checkpoint:
    """A batch of chains after `step` reverse steps: all a restart needs, since the noise is a function of
    (seed, step); small, on the CPU, and the same whichever executor made it."""

    step: int
    x: torch.Tensor  # (B, *event)
    failed: torch.Tensor  # (B,) bool

    def tensors(self) -> dict[str, torch.Tensor]:
        """As named tensors (for torch.save / safetensors)."""
        return {"step": torch.tensor(self.step), "x": self.x, "failed": self.failed}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Checkpoint:
        return cls(int(tensors["step"]), tensors["x"], tensors["failed"].bool())


def step_of(checkpoint: Checkpoint | None) -> int:
    """Reverse steps done (0 without a checkpoint)."""
    return 0 if checkpoint is None else checkpoint.step


@dataclass
class ChainState:
    """What the loop knows after `step` reverse steps."""

    step: int  # reverse steps done; x is x_0 when step == num_steps
    x: torch.Tensor  # (B, *event)
    failed: torch.Tensor  # (B,) bool: diverged (NaN/Inf) and frozen at 0
    loss: torch.Tensor  # (B,) smoothed guidance loss of this step (NaN where unguided)
    grad_norm: torch.Tensor  # (B,)
    zeta: torch.Tensor  # (B,) the step size used
    x0_hat: torch.Tensor | None = None  # (B, *event) Tweedie estimate of this step

    def checkpoint(self) -> Checkpoint:
        """The minimal state to resume from."""
        return Checkpoint(self.step, self.x.detach().cpu(), self.failed.cpu())


@dataclass
class Denoised:
    """The prior's half of step `step`: ε̂ and x̂0, the guess radius r_t, and the graph x_t -> x̂0 for the VJP
    when grad is 'full'."""

    step: int
    eps: torch.Tensor  # (B, *event)
    x0: torch.Tensor  # (B, *event), detached
    radius: float  # r_t of the loss-guided-diffusion guesses x̂0 + r_t ξ
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


class ChainNoise:
    """Each chain's own random streams (cdm_dist.chains.rng), on one device and dtype."""

    def __init__(self, chains: Chains, dtype: torch.dtype, device: torch.device) -> None:
        self.seeds = torch.tensor(chains.seeds, dtype=torch.int64, device=device)
        self.dtype = dtype
        self.streams = ChainStreams(self.seeds)

    def precompute(self, streams: Sequence[int], steps: int) -> None:
        """Hash the step keys of these streams for steps 0..steps-1 at once (the loop's per-step streams)."""
        for stream in streams:
            self.streams.precompute(stream, steps)

    def normal(self, stream: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        """(B, *shape) standard normal draws of every chain's stream at this step."""
        return self.streams.normal(stream, step, shape, self.dtype)

    def uniform(self, stream: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self.streams.uniform(stream, step, shape, torch.float64)


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-chain values (B,) shaped to broadcast over like's rows (B, *event)."""
    return values.view(-1, *[1] * (like.dim() - 1))


def _mask_failed(x: torch.Tensor, failed: torch.Tensor) -> torch.Tensor:
    """x with the rows of failed chains set to 0, x (B, *event), failed (B,)."""
    return torch.where(_rows(failed, x), torch.zeros_like(x), x)


@dataclass
class GradRequest:
    """What a guided step asks of the sampler side: the matching loss and dL/dx̂0 at x̂0 for step `step`."""

    step: int
    x0: torch.Tensor  # (B, *event), detached
    radius: float  # r_t of the loss-guided-diffusion guesses x̂0 + r_t ξ


GradAnswer = tuple[torch.Tensor, torch.Tensor]  # the smoothed loss (B,) and dL/dx̂0 (B, *event)
GuidedStep = Generator[GradRequest, GradAnswer, ChainState]


def guided_step(prior: PriorSide, state: ChainState) -> GuidedStep:
    """One reverse step of MLGD-F (Alg. 1, lines 2-4) as a resumable protocol, the only place the step is written.

    Tweedie's x̂0; at a guided step, yield a GradRequest and receive (loss, dL/dx̂0); then the VJP through Tweedie
    and the corrected DDIM step; the new state is the generator's return value. A generator rather than an explicit
    state machine because the half-done step (x_t, ε̂ and the autograd graph x_t -> x̂0) lives in its frame: an
    executor that has the sampler at hand answers at once (`drive_step`), and one whose sampler is elsewhere (the
    split prior actor) keeps the paused generator until the answer comes back (`begin_step`, `finish_step`). A new
    step rule or guidance variant changes this function and the PriorSide methods it calls, nothing else.
    """
    denoised = prior.tweedie(state)
    if not prior.guided[state.step]:
        return prior.advance(state, denoised)
    loss, grad_x0 = yield GradRequest(state.step, denoised.x0, denoised.radius)
    return prior.advance(state, denoised, loss, grad_x0)


def begin_step(step: GuidedStep) -> GradRequest | ChainState:
    """Run a step up to its gradient request (returned), or to its end when it is unguided (the new state)."""
    try:
        return next(step)
    except StopIteration as done:
        return done.value


def finish_step(step: GuidedStep, answer: GradAnswer) -> ChainState:
    """Resume a step paused at its gradient request with (loss, dL/dx̂0); the new state."""
    try:
        step.send(answer)
    except StopIteration as done:
        return done.value
    raise RuntimeError("a guided step asks for one gradient, and asked for a second")


def drive_step(step: GuidedStep, answer: Callable[[GradRequest], GradAnswer]) -> ChainState:
    """Run a step to its end, answering its gradient request (if any) with `answer`."""
    begun = begin_step(step)
    return begun if isinstance(begun, ChainState) else finish_step(step, answer(begun))


def guided_steps(config: MLGDConfig, schedule: DiffusionSchedule) -> list[bool]:
    """Which reverse steps are guided: the step fraction window [guidance_start, guidance_stop) and t >= guidance_min_t;
    a timestep window that leaves no step guided is an input error naming it."""
    steps = len(schedule)
    if not config.guidance:
        return [False] * steps
    by_fraction = guided_mask(steps, config.guidance_start, config.guidance_stop)  # (T,)
    guided = by_fraction & timestep_window(schedule.timesteps, config.guidance_min_t)  # (T,)
    if by_fraction.any() and not guided.any():
        top = max(t for t, on in zip(schedule.timesteps, by_fraction.tolist(), strict=True) if on)
        raise InputError(
            f"method.guidance_min_t: {config.guidance_min_t} leaves no step guided (the guided steps' timesteps are "
            f"at most {top})"
        )
    return guided.tolist()


def reverse_sigmas(
    schedule: DiffusionSchedule, guided: list[bool], eta: float, cleanup_eta: float | None
) -> list[float]:
    """σ_t of each reverse step, (T,): DDIM's at eta, and at cleanup_eta on the unguided steps after the last guided
    one."""
    sigma = schedule.ddim_sigma(eta).tolist()
    if cleanup_eta is None or not any(guided):
        return sigma
    last = max(i for i, on in enumerate(guided) if on)
    cleanup = schedule.ddim_sigma(cleanup_eta).tolist()
    return sigma[: last + 1] + cleanup[last + 1 :]


class PriorSide:
    """The prior's half of the chain loop (MLGD-F Alg. 1): x_T, Tweedie's x̂0, and the guided reverse step."""

    def __init__(
        self,
        prior: DiffusionPrior,
        chains: Chains,
        config: MLGDConfig,
        device: Device = "cpu",
        source: torch.Tensor | None = None,
    ) -> None:
        self.prior, self.chains, self.config = prior, chains, config
        self.device = torch.device(device)
        self.dtype = DTYPES[config.dtype]
        self.noise = ChainNoise(chains, self.dtype, self.device)
        self.schedule: DiffusionSchedule = prior.schedule(config.num_steps)
        sched = self.schedule
        self.noise.precompute([Stream.REVERSE], len(sched))
        self.starts = torch.tensor(chains.start_steps, device=self.device)  # (B,)
        self.last_start = max(chains.start_steps)  # steps before it have chains still waiting for their start
        if chains.edits:
            if source is None:
                raise InputError("chains start from a source (chains.source) but no source was given")
            if self.last_start >= len(sched):
                raise InputError(f"chains.source: start step {self.last_start} is beyond the {len(sched)} steps")
            self.source = source.to(self.device, self.dtype).reshape(1, *prior.event_shape)  # (1, *event)
        cache: dict[ZetaConfig, torch.Tensor] = {}
        for z in chains.zetas:
            if z not in cache:
                cache[z] = zeta_table(z, sched, config.eta)
        to = {"device": self.device, "dtype": self.dtype}
        self.zeta = torch.stack([cache[z] for z in chains.zetas]).to(**to)  # (B, T)
        self.normalize = torch.tensor([z.normalize for z in chains.zetas], device=self.device)
        self.trust = torch.tensor([z.trust_radius or float("inf") for z in chains.zetas], **to)
        self.guided = guided_steps(config, sched)
        if config.guess_radius == "step_beta":
            self.radius = sched.smoothing_radius().tolist()
        else:
            self.radius = (config.guess_scale * torch.sqrt(1 - sched.alpha_bar)).tolist()
        self.sigma = reverse_sigmas(sched, self.guided, config.eta, config.cleanup_eta)

    def initial_state(self) -> ChainState:
        """x_T ~ N(0, I) from each chain's stream (or 0, as the MLGD-F code); an editing chain's x is the source
        noised to its start step K, sqrt(ᾱ_K) x_src + sqrt(1 - ᾱ_K) ε (SDEdit, Meng et al. 2022), and the batch
        starts at its earliest start step."""
        x = self.noise.normal(Stream.INIT, 0, tuple(self.prior.event_shape))
        if self.config.init == "zero":
            x = torch.zeros_like(x)
        if self.chains.edits:
            x = torch.where(_rows(self.starts > 0, x), self.noised_source(), x)
        b = len(self.chains)
        nan = torch.full((b,), float("nan"), dtype=self.dtype, device=self.device)
        failed = torch.zeros(b, dtype=torch.bool, device=self.device)
        return ChainState(min(self.chains.start_steps), x, failed, nan, nan, nan)

    def noised_source(self) -> torch.Tensor:
        """The source noised to each chain's start step with the chain's own ε, (B, *event)."""
        alpha_bar = self.schedule.alpha_bar.to(self.device, self.dtype)[self.starts]  # (B,)
        eps = self.noise.normal(Stream.SOURCE, 0, tuple(self.prior.event_shape))
        a = _rows(alpha_bar, eps)
        return a.sqrt() * self.source + (1 - a).sqrt() * eps

    def resume(self, checkpoint: Checkpoint) -> ChainState:
        """The state a checkpoint holds."""
        state = self.initial_state()
        state.step = checkpoint.step
        state.x = torch.as_tensor(checkpoint.x).to(self.device, self.dtype)
        state.failed = torch.as_tensor(checkpoint.failed).to(self.device)
        return state

    def tweedie(self, state: ChainState) -> Denoised:
        """ε̂ and x̂0 (Tweedie) at x_t, keeping the graph when the step is guided and grad is 'full'."""
        i, x = state.step, state.x
        timestep = self.schedule.timesteps[i]
        if self.guided[i] and self.config.grad == "full":
            x_in = x.detach().requires_grad_(True)
            with torch.enable_grad():
                eps, x0 = self.prior.denoise(x_in, timestep)
            return Denoised(i, eps.detach(), x0.detach(), self.radius[i], x_in, x0)
        with torch.no_grad():
            eps, x0 = self.prior.denoise(x, timestep)
        return Denoised(i, eps, x0, self.radius[i])

    def advance(
        self,
        state: ChainState,
        denoised: Denoised,
        loss: torch.Tensor | None = None,
        grad_x0: torch.Tensor | None = None,
    ) -> ChainState:
        """dL/dx_t (a VJP through Tweedie, or identity), then x_{t-1} = DDIM step - ζ_t dL/dx_t (Alg. 1, line 4)."""
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
        noise = self.noise.normal(Stream.REVERSE, i, tuple(x.shape[1:])) if self.sigma[i] > 0 else None
        x_next = ddim_step_from_x0(denoised.x0, denoised.eps, ab_prev, self.sigma[i], noise) - correction
        if i < self.last_start:  # editing chains whose start step is still ahead keep their x
            waiting = self.starts > i  # (B,)
            x_next = torch.where(_rows(waiting, x_next), x, x_next)
            loss, grad_norm = loss.masked_fill(waiting, float("nan")), grad_norm.masked_fill(waiting, float("nan"))
            zeta = zeta.masked_fill(waiting, 0.0)
        failed = state.failed | ~torch.isfinite(x_next.flatten(1)).all(1)
        return ChainState(i + 1, _mask_failed(x_next, failed).detach(), failed, loss, grad_norm, zeta, denoised.x0)

    def fit_scores(self, x: torch.Tensor, failed: torch.Tensor) -> torch.Tensor:
        """How typical each x* is under the prior, `prior_fit` (NaN where failed), (B,)."""
        x = x.to(self.device, self.dtype)
        return prior_fit(self.prior, x, self.config.eval_seed).masked_fill(failed.to(self.device), float("nan"))


class SamplerSide:
    """The sampler's half (MLGD-F Alg. 2): the smoothed matching loss of conditional samples at x̂0 against the
    target and its gradient; CDMO refinement; the held-out evaluation of x*."""

    def __init__(
        self, sampler: ConditionalSampler, target: Target, chains: Chains, config: MLGDConfig, device: Device = "cpu"
    ) -> None:
        if target.dim != sampler.y_dim:
            raise InputError(
                f"target: samples have dimension {target.dim} but the sampler produces d_y = {sampler.y_dim}"
            )
        self.sampler, self.target, self.chains, self.config = sampler, target, chains, config
        self.device = torch.device(device)
        self.dtype = DTYPES[config.dtype]
        self.noise = ChainNoise(chains, self.dtype, self.device)
        self.noise.precompute([Stream.SAMPLER, Stream.GUESS, Stream.TARGET_BATCH], config.num_steps)
        self.loss_fn: Loss = config.loss.build()
        self.target_samples = target.samples.to(self.device, self.dtype)
        fits = self.target_samples.shape[0] <= config.target_batch
        self.shared_target = config.loss.prepare(self.target_samples) if fits else None  # its block computed once

    def _target_batch(self, step: int, groups: int) -> torch.Tensor | PreparedTarget:
        """Target samples per (chain, group): all of them, prepared once, when they fit, else (B * groups, n_t, d)
        drawn per chain."""
        if self.shared_target is not None:
            return self.shared_target
        m, n_t = self.target_samples.shape[0], self.config.target_batch
        u = self.noise.uniform(Stream.TARGET_BATCH, step, (groups, n_t))  # (B, groups, n_t)
        index = (u * m).long().clamp_max(m - 1).reshape(-1, n_t)
        return self.target_samples[index]

    def sample_loss(self, x0: torch.Tensor, step: int, eta_stream: int) -> torch.Tensor:
        """L̂ per chain and guess: x0 (B, G, *event) -> (B, G), with each chain's own eta and target batch."""
        b, g = x0.shape[:2]
        n_c, noise_shape = self.config.n_c, tuple(self.sampler.noise_shape)
        eta = self.noise.normal(eta_stream, step, (g, n_c, *noise_shape)).reshape(b * g, n_c, *noise_shape)
        y = self.sampler.sample(x0.reshape(b * g, *x0.shape[2:]), eta)  # (B*G, n_c, d_y)
        return self.loss_fn(y, self._target_batch(step, g)).reshape(b, g)

    def matching_grad(self, request: GradRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """The smoothed loss (B,) at x̂0 (B, *event) and dL/dx̂0, over LGD guesses x̂0 + r_t ξ (Song et al. 2023)."""
        cfg = self.config
        x0 = request.x0.detach().to(self.device, self.dtype).requires_grad_(True)
        noise_step = 0 if cfg.common_random_numbers else request.step
        with torch.enable_grad():
            guesses = x0.unsqueeze(1)  # (B, 1, *event)
            if cfg.n_guess > 1:
                xi = self.noise.normal(Stream.GUESS, noise_step, (cfg.n_guess, *x0.shape[1:]))
                guesses = guesses + request.radius * xi
            loss = log_mean_exp_loss(self.sample_loss(guesses, noise_step, Stream.SAMPLER))  # (B,)
            (grad,) = torch.autograd.grad(loss.sum(), x0)
        return loss.detach(), grad

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
        eta = self.noise.normal(stream, 0, (n, *tuple(self.sampler.noise_shape)))
        y = self.sampler.sample(x, eta)
        target = self.target.heldout(n, self.config.eval_seed).to(self.device, self.dtype)
        return self.loss_fn(y, target)

    @torch.no_grad()
    def source_loss(self, source: torch.Tensor) -> float:
        """The held-out loss of an editing campaign's source itself (η from the held-out seed): what an edit improves
        on. source: (1, *event)."""
        n, seed = self.config.heldout_samples, self.config.eval_seed
        seeds = torch.tensor([seed], dtype=torch.int64, device=self.device)
        eta = chain_normal(seeds, Stream.EVAL, 0, (n, *tuple(self.sampler.noise_shape)), self.dtype)
        y = self.sampler.sample(source.to(self.device, self.dtype), eta)  # (1, n, d_y)
        return float(self.loss_fn(y, self.target.heldout(n, seed).to(self.device, self.dtype))[0])

    def evaluate(
        self, state: ChainState | Checkpoint, metrics: MetricsFn | None = None, source_loss: float | None = None
    ) -> ChainResult:
        """Refine (CDMO), then the final x's held-out loss and exact metrics (prior_fit is the prior side's); for an
        editing campaign also source_loss and improvement = (source_loss - final_loss) / source_loss (NaN unless
        source_loss > 0: use a loss that is never negative, e.g. the V-statistic MMD², for the ratio)."""
        x = torch.as_tensor(state.x).to(self.device, self.dtype)
        failed = torch.as_tensor(state.failed).to(self.device)
        x = self.refine(x, failed)
        failed = failed | ~torch.isfinite(x.flatten(1)).all(1)
        x = _mask_failed(x, failed)
        final = self.heldout_loss(x)
        failed = failed | ~torch.isfinite(final)
        scores = metrics(x) if metrics else {}
        if source_loss is not None:
            scores["source_loss"] = torch.full_like(final, source_loss)
            # a ratio needs a positive baseline: an unbiased MMD² estimate at or below 0 has none (NaN)
            scores["improvement"] = (
                (source_loss - final) / source_loss if source_loss > 0 else torch.full_like(final, float("nan"))
            )
        scores = {k: v.masked_fill(failed, float("nan")) for k, v in scores.items()}
        return ChainResult(x, final.masked_fill(failed, float("inf")), failed, scores)


class GuidedChains:
    """MLGD / MLGD-F for one batch of chains in one process: the prior side answered by the sampler side."""

    def __init__(
        self,
        prior: DiffusionPrior,
        sampler: ConditionalSampler,
        target: Target,
        chains: Chains,
        config: MLGDConfig,
        device: Device = "cpu",
        source: torch.Tensor | None = None,
    ) -> None:
        self.sampler_side = SamplerSide(sampler, target, chains, config, device)
        self.prior_side = PriorSide(prior, chains, config, device, source)
        self.noise = self.prior_side.noise
        self.source = source

    def step(self, state: ChainState) -> ChainState:
        """One reverse step for every chain, its gradient request answered here (Alg. 1)."""
        return drive_step(guided_step(self.prior_side, state), self.sampler_side.matching_grad)

    def states(self, start: ChainState | None = None) -> Iterator[ChainState]:
        """Yield the state after every reverse step until x_0 (guided-diffusion style progressive loop)."""
        state = start or self.prior_side.initial_state()
        while state.step < len(self.prior_side.schedule):
            state = self.step(state)
            yield state

    def finish(self, state: ChainState, metrics: MetricsFn | None = None) -> ChainResult:
        """Refine (CDMO), then evaluate the final x: held-out loss, exact metrics and the prior fit."""
        source_loss = None if self.source is None else self.sampler_side.source_loss(self.source)
        result = self.sampler_side.evaluate(state, metrics, source_loss)
        result.metrics["prior_fit"] = self.prior_side.fit_scores(result.x, result.failed)
        return result


MetricsFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def run_chains(
    runner: GuidedChains,
    metrics: MetricsFn | None = None,
    on_step: Callable[[ChainState], None] | None = None,
    start: ChainState | None = None,
) -> ChainResult:
    """Drain the loop (calling on_step for each state), then finish; keeps the loss history."""
    history = []
    last = start or runner.prior_side.initial_state()
    for state in runner.states(last):
        history.append(state.loss)
        if on_step is not None:
            on_step(state)
        last = state
    result = runner.finish(last, metrics)
    if history:
        result.loss_history = torch.stack(history, dim=1)
    return result
