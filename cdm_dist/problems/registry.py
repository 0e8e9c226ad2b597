"""Problem specs resolved where the models live: the registry of named problems, user factories, and the lazy
per-part build that lets each worker construct only what its role needs.

- Registered names: the built-in benchmarks (cdm_dist.problems.builtins registers its functions when imported, on
  the first look-up) plus every entry point in the group `cdm_dist.problems` (a package declares
  `[project.entry-points."cdm_dist.problems"] myproblem = "my_pkg.problems:make"`).
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

from cdm_dist.chains.mlgd import MetricsFn
from cdm_dist.chains.priors import DiffusionPrior
from cdm_dist.chains.samplers import ConditionalSampler
from cdm_dist.chains.targets import Target
from cdm_dist.errors import InputError
from cdm_dist.models.factories import (
    call_factory,
    call_with_args,
    check_args,
    expect_type,
    factory_function,
    load_object,
)
from cdm_dist.models.spec import (
    PARTS,
    CDMProblem,
    DecoderSpec,
    DiffusersPriorSpec,
    FactorySpec,
    FlowSamplerSpec,
    GeneratorSamplerSpec,
    PriorSpec,
    ProblemConfig,
    SamplerSpec,
    TargetFileSpec,
    TargetSpec,
    VaeDecoderSpec,
    import_path,
)

ENTRY_POINT_GROUP = "cdm_dist.problems"


def builtin_problems() -> dict[str, Callable[..., Any]]:
    """The built-ins, name -> recipe (cdm_dist.problems.builtins, imported at the first look-up: it is not light)."""
    from cdm_dist.problems.builtins import BUILTIN_PROBLEMS

    return BUILTIN_PROBLEMS


def registered_problems() -> dict[str, Callable[..., Any] | str]:
    """Every registered problem name -> its function (built-ins) or "module:function" (installed entry points)."""
    names: dict[str, Callable[..., Any] | str] = dict(builtin_problems())
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
    function = names[name]
    if isinstance(function, str):
        function = load_object(function, field)
    if not callable(function):
        raise InputError(f"{field}: {names[name]} registered as {name!r} is not callable")
    return function


def problem_function(spec: ProblemConfig) -> tuple[Callable[..., Any], str]:
    """A name's or factory's function, and how its failures are named."""
    if spec.kind == "name":
        return registered_problem(spec.name), f"problem (name {spec.name!r})"
    return load_object(spec.factory, "problem.factory"), "problem.factory"


def problem_recipe(spec: ProblemConfig, device: torch.device | str | None = None) -> ProblemConfig | CDMProblem:
    """A name's or factory's function called once with its args (checked on the way): parts, or a whole problem."""
    function, label = problem_function(spec)
    made = call_with_args(function, spec.args, "problem", device, label)
    if isinstance(made, dict):
        made = ProblemConfig.model_validate(made)
    if isinstance(made, ProblemConfig):
        if made.kind != "parts":
            raise InputError(f"{label}: returned a {made.kind} spec; a recipe returns parts or a CDMProblem")
        return made
    return expect_type(made, CDMProblem, label, "a CDMProblem (or a ProblemConfig of parts)")


# -- driver-side validation -----------------------------------------------------------------------------------


def validate_spec(spec: ProblemConfig, importable: bool = True) -> None:
    """What the driver checks once, building no model (importable=False: user code only the actors import)."""
    target = getattr(spec, "target", None)
    if isinstance(target, TargetFileSpec):
        Target.from_file(target.file)  # a bad file is refused before any worker starts
    if not importable:
        return
    if spec.kind == "name" and spec.name in builtin_problems():
        problem_recipe(spec)
    elif spec.kind != "parts":
        check_args(problem_function(spec)[0], spec.args, "problem")
    for part in PARTS:
        value = getattr(spec, part)
        if isinstance(value, FactorySpec):
            check_args(factory_function(value, f"problem.{part}"), value.args, f"problem.{part}")


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
        tic = time.perf_counter()
        made = problem_recipe(self.spec, self.device)
        if isinstance(made, ProblemConfig):
            self._recipe = made
            return
        self._whole = made
        self.built["problem"] += 1
        self.load_seconds["problem"] = time.perf_counter() - tic

    def part_spec(self, part: str) -> Any:
        """A part's spec: the config's, or the recipe's once a name or factory is resolved (None for a whole
        problem, or where there is none)."""
        if getattr(self.spec, part, None) is not None or self.spec.kind == "parts":
            return getattr(self.spec, part, None)
        self._resolve_recipe()
        return None if self._recipe is None else getattr(self._recipe, part)

    def _part(self, part: str, build: Callable[[], Any]) -> Any:
        """The part, built (timed and counted) on first use."""
        if part not in self._parts:
            tic = time.perf_counter()
            self._parts[part] = build()
            self.load_seconds[part] = time.perf_counter() - tic
            self.built[part] += 1
        return self._parts[part]

    def _resolved(self, part: str, whole: Callable[[CDMProblem], Any], build: Callable[[Any, str], Any]) -> Any:
        """The whole problem's part, else the recipe's part built once (None where the recipe has none)."""
        self._resolve_recipe()
        if self._whole is not None:
            return whole(self._whole)
        spec = getattr(self._recipe, part)
        return None if spec is None else self._part(part, lambda: build(spec, f"problem.{part}"))

    # -- the parts ----------------------------------------------------------------------------------------
    @property
    def prior(self) -> DiffusionPrior:
        return self._resolved("prior", lambda whole: whole.prior, self._build_prior)

    @property
    def fast_sampler(self) -> ConditionalSampler:
        return self._resolved("sampler", lambda whole: whole.fast_sampler, self._build_sampler)

    @property
    def full_sampler(self) -> ConditionalSampler | None:
        return self._resolved("full_sampler", lambda whole: whole.full_sampler, self._build_sampler)

    @property
    def decoder(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """x -> what the samplers see (the decoder part, e.g. a latent prior's VAE), or None: they see x itself."""
        return self._resolved("decoder", lambda whole: None, self._build_decoder)

    @property
    def target(self) -> Target:
        spec = self.spec.target_override
        if spec is None:
            self._resolve_recipe()
            if self._whole is not None:
                return self._whole.target
            spec = self._recipe.target_override
        return self._part("target", lambda: self._build_target(spec, "problem.target"))

    @property
    def metrics(self) -> MetricsFn | None:
        if self.spec.target_override is not None and self.spec.kind != "parts":
            return None  # exact metrics describe the problem's own target, not the user's
        return self._resolved("metrics", lambda whole: whole.metrics, self._build_function)

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

    def build(
        self,
        name: str | None = None,
        params: dict[str, Any] | None = None,
        x_star: torch.Tensor | None = None,
        x_star_unique: bool = False,
    ) -> CDMProblem:
        """Every part at once, as a CDMProblem; name, params and x* describe parts (a whole problem has its own)."""
        self._resolve_recipe()
        base = self._whole
        if base is not None and self.spec.target_override is None:
            return base
        exact = base is not None and self.metrics is not None
        return CDMProblem(
            name=name or self.spec.label(),
            prior=self.prior,
            fast_sampler=self.fast_sampler,
            full_sampler=self.full_sampler,
            target=self.target,
            metrics=self.metrics,
            x_star=base.x_star if exact else x_star,
            x_star_unique=bool(base.x_star_unique) if exact else x_star_unique,
            params=self.params if base is not None else dict(params or {}),
        )

    # -- builders -----------------------------------------------------------------------------------------
    def _build_prior(self, spec: PriorSpec, field: str) -> DiffusionPrior:
        if isinstance(spec, DiffusersPriorSpec):
            from cdm_dist.models.adapters import load_diffusers_prior

            return load_diffusers_prior(spec, self.device, field)
        return expect_type(call_factory(spec, field, self.device), DiffusionPrior, field, "a DiffusionPrior")

    def _build_sampler(self, spec: SamplerSpec, field: str) -> ConditionalSampler:
        """The sampler, seeing x through the decoder where the problem has one."""
        if isinstance(spec, FlowSamplerSpec):
            from cdm_dist.models.learned import FlowSampler, load_flow_model

            key = (spec.flow, spec.dtype)
            if key not in self._flows:
                self._flows[key] = load_flow_model(spec.flow, spec.dtype, self.device, f"{field}.flow")
            sampler: ConditionalSampler = FlowSampler(self._flows[key], spec.steps, spec.renoise)
        elif isinstance(spec, GeneratorSamplerSpec):
            from cdm_dist.models.generator import load_generator_sampler

            sampler = load_generator_sampler(spec, self.device, field)
        else:
            sampler = expect_type(call_factory(spec, field, self.device), ConditionalSampler, field,
                                  "a ConditionalSampler")  # fmt: skip
        decoder = self.decoder
        if decoder is None:
            return sampler
        from cdm_dist.models.adapters import DecodedSampler

        channels = getattr(getattr(getattr(decoder, "vae", None), "config", None), "out_channels", None)
        if isinstance(spec, GeneratorSamplerSpec) and channels is not None:  # the ControlNet takes decoded images
            sampler.check_image_channels(int(channels), "the decoder's images (its VAE's out_channels)")
        return DecodedSampler(decoder, sampler)

    def _build_decoder(self, spec: DecoderSpec, field: str) -> Callable[[torch.Tensor], torch.Tensor]:
        if isinstance(spec, VaeDecoderSpec):
            from cdm_dist.models.adapters import load_latent_decoder

            return load_latent_decoder(spec, self.device, field)
        return self._build_function(spec, field)

    def _build_target(self, spec: TargetSpec, field: str) -> Target:
        if isinstance(spec, TargetFileSpec):
            return Target.from_file(spec.file)
        made = call_factory(spec, field, self.device)
        if isinstance(made, Target):
            return made
        if isinstance(made, torch.Tensor) or hasattr(made, "__array__"):
            return Target(torch.as_tensor(made).to(torch.float64).cpu(), None, import_path(spec.factory))
        raise InputError(f"{field}: the factory returned {type(made).__name__}, not a Target or an (m, d_y) array")

    def _build_function(self, spec: FactorySpec, field: str) -> Callable[[torch.Tensor], Any]:
        """A function of x (metrics, a decoder) from its factory."""
        made = call_factory(spec, field, self.device)
        if not callable(made):
            raise InputError(f"{field}: the factory returned {type(made).__name__}, not a function of x")
        return made


resolve_problem = ProblemSource  # resolve_problem(spec, device): the problem a spec describes, built lazily
