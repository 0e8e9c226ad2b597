"""Problem specs resolved where the models live: the registry of named problems, user factories, and the lazy
per-part build that lets each worker construct only what its role needs.

- Registered names: the built-in benchmarks plus every entry point in the group `cdm_dist.problems` (a package
  declares `[project.entry-points."cdm_dist.problems"] myproblem = "my_pkg.problems:make"`).
- A registered function or a problem factory is called with its `args` (and `device=` when it takes one); it returns
  a CDMProblem, or a ProblemConfig of parts, which is then resolved part by part as well.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

import torch

from cdm_dist.errors import InputError
from cdm_dist.factories import call_factory, call_with_args, check_args, expect_type, load_object
from cdm_dist.mlgd import MetricsFn
from cdm_dist.priors import DiffusionPrior
from cdm_dist.samplers import ConditionalSampler
from cdm_dist.spec import (
    CDMProblem,
    DiffusersPriorSpec,
    FactorySpec,
    FlowSamplerSpec,
    PriorSpec,
    ProblemConfig,
    SamplerSpec,
    TargetFileSpec,
    TargetSpec,
)
from cdm_dist.targets import Target

ENTRY_POINT_GROUP = "cdm_dist.problems"
BUILTIN_PROBLEMS = {
    "gmm2d": "cdm_dist.problems:gmm2d",
    "gmm5d": "cdm_dist.problems:gmm5d",
    "gmm10d": "cdm_dist.problems:gmm10d",
    "digits": "cdm_dist.problems:digits",
}


def registered_problems() -> dict[str, str]:
    """Every registered problem name -> "module:function": the built-ins, then installed entry points."""
    names = dict(BUILTIN_PROBLEMS)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        names.setdefault(entry.name, entry.value)
    return names


def registered_problem(name: str, field: str = "problem.name") -> Callable[..., Any]:
    """The function registered under `name`, or one line listing the names there are."""
    names = registered_problems()
    if name not in names:
        raise InputError(
            f"{field}: no problem {name!r} is registered; available: {sorted(names)} (packages add names through "
            f"the {ENTRY_POINT_GROUP!r} entry-point group)"
        )
    function = load_object(names[name], field)
    if not callable(function):
        raise InputError(f"{field}: {names[name]} registered as {name!r} is not callable")
    return function


# -- driver-side validation -----------------------------------------------------------------------------------


def validate_spec(spec: ProblemConfig, importable: bool = True) -> None:
    """What the driver can check without building a model: registered names exist, factories import and accept
    their args. With importable=False (user code reaches the actors through a runtime_env) only the shape is
    checked here (spec.py); the actors check the rest when they start."""
    if not importable:
        return
    if spec.kind == "name":
        function = registered_problem(spec.name)
        check_args(function, spec.args, "problem")
        if spec.name in BUILTIN_PROBLEMS:  # the built-in recipes only describe parts: cheap to call here
            call_with_args(function, spec.args, f"problem (name {spec.name!r})")
    elif spec.kind == "factory":
        check_args(load_object(spec.factory, "problem.factory"), spec.args, "problem")
    for part in ("prior", "sampler", "full_sampler", "target", "metrics"):
        value = getattr(spec, part)
        if isinstance(value, FactorySpec):
            check_args(load_object(value.factory, f"problem.{part}.factory"), value.args, f"problem.{part}")


# -- lazy resolution ------------------------------------------------------------------------------------------


class ProblemSource:
    """A problem spec, resolved part by part on first use: a worker that only touches `prior` builds only the
    prior. A name or factory that returns a whole CDMProblem is called once and serves every part."""

    def __init__(self, spec: ProblemConfig, device: torch.device | str = "cpu") -> None:
        self.spec, self.device = spec, torch.device(device)
        self.built: Counter[str] = Counter()  # part -> constructions (tests count them)
        self.load_seconds: dict[str, float] = {}
        self._parts: dict[str, Any] = {}
        self._whole: CDMProblem | None = None
        self._recipe: ProblemConfig | None = spec if spec.kind == "parts" else None
        self._flows: dict[tuple[str, str], Any] = {}  # one model per flow folder and dtype (fast + full chain)

    # -- the recipe ---------------------------------------------------------------------------------------
    def _resolve_recipe(self) -> None:
        """Call a name or factory once: it gives a whole problem or a parts spec."""
        if self._recipe is not None or self._whole is not None:
            return
        if self.spec.kind == "name":
            function, field = registered_problem(self.spec.name), f"problem (name {self.spec.name!r})"
        else:
            function, field = load_object(self.spec.factory, "problem.factory"), "problem.factory"
        tic = time.perf_counter()
        made = call_with_args(function, self.spec.args, field, self.device)
        if isinstance(made, dict):
            made = ProblemConfig.model_validate(made)
        if isinstance(made, ProblemConfig):
            if made.kind != "parts":
                raise InputError(f"{field}: returned a {made.kind} spec; a recipe returns parts or a CDMProblem")
            self._recipe = made
            return
        self._whole = expect_type(made, CDMProblem, field, "a CDMProblem (or a ProblemConfig of parts)")
        self.built["problem"] += 1
        self.load_seconds["problem"] = time.perf_counter() - tic

    def _part(self, part: str, build: Callable[[], Any]) -> Any:
        if part not in self._parts:
            tic = time.perf_counter()
            self._parts[part] = build()
            self.load_seconds[part] = time.perf_counter() - tic
            self.built[part] += 1
        return self._parts[part]

    # -- the parts ----------------------------------------------------------------------------------------
    @property
    def prior(self) -> DiffusionPrior:
        self._resolve_recipe()
        if self._whole is not None:
            return self._whole.prior
        return self._part("prior", lambda: self._build_prior(self._recipe.prior))

    @property
    def fast_sampler(self) -> ConditionalSampler:
        self._resolve_recipe()
        if self._whole is not None:
            return self._whole.fast_sampler
        return self._part("sampler", lambda: self._build_sampler(self._recipe.sampler, "problem.sampler"))

    @property
    def full_sampler(self) -> ConditionalSampler | None:
        self._resolve_recipe()
        if self._whole is not None:
            return self._whole.full_sampler
        spec = self._recipe.full_sampler
        if spec is None:
            return None
        return self._part("full_sampler", lambda: self._build_sampler(spec, "problem.full_sampler"))

    @property
    def target(self) -> Target:
        override = self.spec.target_override
        if override is not None:
            return self._part("target", lambda: self._build_target(override, "problem.target"))
        self._resolve_recipe()
        if self._whole is not None:
            return self._whole.target
        recipe_target = self._recipe.target_override
        return self._part("target", lambda: self._build_target(recipe_target, "problem.target"))

    @property
    def metrics(self) -> MetricsFn | None:
        if self.spec.target_override is not None and self.spec.kind != "parts":
            return None  # exact metrics describe the problem's own target, not the user's
        self._resolve_recipe()
        if self._whole is not None:
            return self._whole.metrics
        spec = self._recipe.metrics
        if spec is None:
            return None
        return self._part("metrics", lambda: self._build_metrics(spec))

    @property
    def params(self) -> dict[str, Any]:
        """What the problem says about itself (saved next to results); empty for parts."""
        return dict(self._whole.params) if self._whole is not None else {}

    def sampler(self, method: str) -> ConditionalSampler:
        """The inner sampler a method uses: 'mlgd' the full chain, every other the fast one."""
        if method != "mlgd":
            return self.fast_sampler
        full = self.full_sampler
        if full is None:
            raise InputError(
                f"problem {self.spec.label()}: no full-chain sampler (problem.full_sampler), so method 'mlgd' "
                "is unavailable"
            )
        return full

    def build(self) -> CDMProblem:
        """Every part at once, as a CDMProblem."""
        self._resolve_recipe()
        if self._whole is not None and self.spec.target_override is None:
            return self._whole
        base = self._whole
        return CDMProblem(
            name=self.spec.label(),
            prior=self.prior,
            fast_sampler=self.fast_sampler,
            full_sampler=self.full_sampler,
            target=self.target,
            metrics=self.metrics,
            x_star=base.x_star if base is not None and self.metrics is not None else None,
            x_star_unique=bool(base.x_star_unique) if base is not None and self.metrics is not None else False,
            params=self.params,
        )

    # -- builders -----------------------------------------------------------------------------------------
    def _build_prior(self, spec: PriorSpec) -> DiffusionPrior:
        if isinstance(spec, DiffusersPriorSpec):
            from cdm_dist.models.adapters import load_diffusers_prior

            return load_diffusers_prior(spec, self.device, "problem.prior")
        return expect_type(call_factory(spec, "problem.prior", self.device), DiffusionPrior, "problem.prior",
                       "a DiffusionPrior")  # fmt: skip

    def _build_sampler(self, spec: SamplerSpec, field: str) -> ConditionalSampler:
        if isinstance(spec, FlowSamplerSpec):
            from cdm_dist.models.learned import FlowSampler, load_flow_model

            key = (spec.flow, spec.dtype)
            if key not in self._flows:
                self._flows[key] = load_flow_model(spec.flow, spec.dtype, self.device, f"{field}.flow")
            sampler: ConditionalSampler = FlowSampler(self._flows[key], spec.steps)
        else:
            sampler = expect_type(call_factory(spec, field, self.device), ConditionalSampler, field,
                              "a ConditionalSampler")  # fmt: skip
        prior = self._recipe.prior if self._recipe is not None else None
        if isinstance(prior, DiffusersPriorSpec) and prior.vae_subfolder is not None:
            from cdm_dist.models.adapters import DecodedSampler, load_latent_decoder

            decoder = self._part("decoder", lambda: load_latent_decoder(prior, self.device, "problem.prior"))
            sampler = DecodedSampler(decoder, sampler)
        return sampler

    @property
    def decoder(self) -> Any | None:
        """The latent prior's VAE decoder (the sampler role loads it), or None for a prior over x itself."""
        self._resolve_recipe()
        prior = self._recipe.prior if self._recipe is not None else None
        if not isinstance(prior, DiffusersPriorSpec) or prior.vae_subfolder is None:
            return None
        from cdm_dist.models.adapters import load_latent_decoder

        return self._part("decoder", lambda: load_latent_decoder(prior, self.device, "problem.prior"))

    def _build_target(self, spec: TargetSpec, field: str) -> Target:
        if isinstance(spec, TargetFileSpec):
            return Target.from_file(spec.file)
        made = call_factory(spec, field, self.device)
        if isinstance(made, Target):
            return made
        if isinstance(made, torch.Tensor) or hasattr(made, "__array__"):
            return Target(torch.as_tensor(made).to(torch.float64).cpu(), None, spec.factory)
        raise InputError(f"{field}: the factory returned {type(made).__name__}, not a Target or an (m, d_y) array")

    def _build_metrics(self, spec: FactorySpec) -> MetricsFn:
        made = call_factory(spec, "problem.metrics", self.device)
        if not callable(made):
            raise InputError(f"problem.metrics: the factory returned {type(made).__name__}, not a function of x")
        return made


def resolve_problem(spec: ProblemConfig, device: torch.device | str = "cpu") -> ProblemSource:
    """The problem a spec describes, built lazily part by part."""
    return ProblemSource(spec, device)
