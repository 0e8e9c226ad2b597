"""Design campaigns: the typed campaign config (YAML + --set overrides), the chain table and micro-batches."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from cdm_dist.chains.config import MLGDConfig, NonNegative, Positive, StrictModel, ZetaConfig, parse
from cdm_dist.chains.mlgd import Chains
from cdm_dist.errors import InputError
from cdm_dist.models.spec import FactorySpec, File, ProblemConfig, absolute, existing_folder

PositiveInt = Annotated[int, Field(ge=1)]
EXECUTORS = ("local", "ray_colocated", "ray_split")
NAME = r"^[A-Za-z0-9_.-]+$"  # campaign and study names: one folder under output (no separator)


class MethodConfig(MLGDConfig):
    """The method and its knobs (every MLGDConfig field): MLGD-F (the fast sampler), MLGD (the full chain), or
    'sdedit', the unguided baseline of an editing campaign (SDEdit variations of the source, Meng et al. 2022)."""

    name: Literal["mlgd_f", "mlgd", "sdedit"] = "mlgd_f"  # guided through the fast sampler, the full one, or not

    def mlgd(self) -> MLGDConfig:
        """The knobs without the method name (sdedit: guidance off)."""
        knobs = self.model_dump(exclude={"name"})
        return MLGDConfig(**knobs | ({"guidance": False} if self.name == "sdedit" else {}))


class SourceConfig(StrictModel):
    """Editing: chains start from a source x_src noised to an intermediate step (SDEdit; MLGD-F paper, Exp. 2).

    Chain k starts at step K_k = start_step, or num_steps - int(num_steps * s_k) for strength s_k (diffusers'
    img2img convention: the fraction of the schedule re-noised), with s_k = strengths[k mod len] or `strength`.
    """

    file: File  # .npy / .safetensors tensor in the prior's event shape, or a PNG/JPEG image for image priors
    start_step: Annotated[int, Field(ge=0)] | None = None  # K, the reverse step all chains start at (0: t = T)
    strength: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None  # fraction re-noised (img2img)
    # one strength per chain, cycled (chain k: strengths[k mod len]); give one of start_step, strength, strengths
    strengths: list[Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_start(self) -> SourceConfig:
        given = [k for k in ("start_step", "strength", "strengths") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of start_step, strength or strengths (given: {given or 'none'})")
        return self

    def start_steps(self, count: int, num_steps: int) -> list[int]:
        """The start step of each of `count` chains on a schedule of num_steps steps."""
        if self.start_step is not None:
            return [self.start_step] * count
        strengths = self.strengths or [self.strength]
        return [num_steps - int(num_steps * strengths[k % len(strengths)]) for k in range(count)]


class ChainsConfig(StrictModel):
    """The campaign's chains: chain k has seed base_seed + k and zeta schedule k modulo the list (or grid)."""

    count: PositiveInt = 8  # chains in the campaign
    base_seed: Annotated[int, Field(ge=0)] = 0  # chain k's seed (of all its noise) is base_seed + k
    zeta: list[ZetaConfig] = Field(  # ζ_t schedules, the guidance step sizes; chain k takes item k mod len
        default_factory=lambda: [ZetaConfig(kind="linear", scale=3.0, final=0.1)], min_length=1
    )
    zeta_grid: dict[str, list[Any]] | None = None  # cartesian product of ZetaConfig fields; replaces `zeta`
    source: SourceConfig | None = None  # editing: start from a noised source instead of pure noise

    @model_validator(mode="after")
    def _grid_fields(self) -> ChainsConfig:
        if self.zeta_grid is not None:
            unknown = sorted(set(self.zeta_grid) - set(ZetaConfig.model_fields))
            if unknown:
                known = sorted(ZetaConfig.model_fields)
                raise ValueError(f"zeta_grid: unknown zeta fields {unknown}; expected some of {known}")
            empty = [k for k, v in self.zeta_grid.items() if not v]
            if empty:
                raise ValueError(f"zeta_grid: {empty} have no values")
            self.schedules()
        return self

    @property
    def source_file(self) -> str | None:
        """The editing source's file, None for chains from noise."""
        return None if self.source is None else self.source.file

    def schedules(self) -> list[ZetaConfig]:
        """The zeta schedules chains cycle through."""
        if self.zeta_grid is None:
            return list(self.zeta)
        keys = sorted(self.zeta_grid)
        schedules = []
        for values in itertools.product(*(self.zeta_grid[k] for k in keys)):
            combination = dict(zip(keys, values, strict=True))
            try:
                schedules.append(ZetaConfig.model_validate(combination))
            except ValidationError as exc:
                raise ValueError(f"zeta_grid: {combination}: {exc.errors()[0]['msg']}") from None
        return schedules


# The keys of Ray 2.60's runtime_env (ray.runtime_env.RuntimeEnv.known_fields, public ones); a test keeps them in step.
RAY_RUNTIME_ENV_KEYS = (
    "conda",
    "config",
    "container",
    "env_vars",
    "excludes",
    "image_uri",
    "java_jars",
    "pip",
    "py_executable",
    "py_modules",
    "uv",
    "worker_process_setup_hook",
    "working_dir",
)
CODE_SHIPPING_KEYS = ("working_dir", "py_modules", "pip", "uv", "conda", "container", "image_uri", "py_executable")


def _local_or_uri(value: str) -> str:
    """A remote URI as it is; a local path made absolute and checked."""
    if "://" in value:
        return value
    path = absolute(value)
    if not Path(path).exists():
        raise ValueError(f"{path} does not exist")
    return path


class RuntimeEnvConfig(StrictModel):
    """Ray's runtime_env for the campaign's actors: how the user's code and packages reach every node."""

    model_config = ConfigDict(extra="allow", frozen=True)

    working_dir: str | None = None  # a local folder (uploaded) or a remote .zip URI; the actors' cwd and sys.path
    py_modules: list[str] | None = None  # local package folders / .whl files or remote URIs, importable by actors
    pip: list[str] | None = None  # requirements installed into the actors' environment
    env_vars: dict[str, str] | None = None  # environment variables of the actors' processes
    excludes: list[str] | None = None  # gitignore-style patterns left out of working_dir / py_modules uploads

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(RAY_RUNTIME_ENV_KEYS))
            if unknown:
                raise ValueError(f"unknown key(s) {unknown}; Ray's runtime_env knows {list(RAY_RUNTIME_ENV_KEYS)}")
        return data

    @field_validator("working_dir")
    @classmethod
    def _working_dir(cls, value: str | None) -> str | None:
        if value is None or "://" in value:
            return value
        return existing_folder(value)

    @field_validator("py_modules")
    @classmethod
    def _modules(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [_local_or_uri(v) for v in value]

    def ray_dict(self) -> dict[str, Any]:
        """As Ray takes it (unset keys left out)."""
        return self.model_dump(exclude_none=True)

    def local_paths(self) -> list[str]:
        """The working_dir and py_modules that are local paths (Ray uploads those only at ray.init)."""
        paths = [self.working_dir, *(self.py_modules or [])]
        return [p for p in paths if p is not None and "://" not in p]

    @property
    def ships_code(self) -> bool:
        """Whether user code may reach the actors through it (then the driver cannot import it itself)."""
        env = self.ray_dict()
        return any(env.get(k) for k in CODE_SHIPPING_KEYS) or "PYTHONPATH" in (self.env_vars or {})


class ResourcesConfig(StrictModel):
    """Where chains run: in-process or on Ray actors, split (prior | sampler) or colocated (both)."""

    executor: Literal["local", "ray"] = "ray"  # local: in the driver's process; ray: on Ray actors
    placement: Literal["colocated", "split"] = "colocated"  # actors hold both models, or a prior + a sampler actor
    replicas: PositiveInt = 1  # colocated replicas, or prior/sampler pairs when split
    num_gpus: NonNegative = 0.0  # GPUs per actor, fractions share one (logical GPUs are fine for pinning tests)
    num_cpus: Positive = 1.0  # CPUs per actor (Ray's logical CPUs)
    threads: PositiveInt = 1  # torch threads per actor (and in-process)
    micro_batch: PositiveInt = 8  # chains per micro-batch
    in_flight: PositiveInt = 2  # micro-batches in flight per actor (pipeline depth)
    checkpoint_every: PositiveInt = 10  # steps between chain checkpoints
    max_restarts: Annotated[int, Field(ge=0)] = 3  # Ray restarts of a dead actor
    max_retries: Annotated[int, Field(ge=0)] = 3  # restarts of a micro-batch from its checkpoint
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA where the actor has a GPU
    runtime_env: RuntimeEnvConfig | None = None  # user code and packages for the actors (working_dir, py_modules, ...)
    # split placement: how stages pass tensors actor to actor: a Ray Compiled Graph per replica, or Ray tasks
    # with ObjectRefs; auto: compiled where Ray can compile, else tasks (one log line)
    transport: Literal["auto", "compiled", "tasks"] = "auto"

    @property
    def executor_name(self) -> str:
        return "local" if self.executor == "local" else f"ray_{self.placement}"


class TrackingConfig(StrictModel):
    """MLflow: the run store and experiment."""

    enabled: bool = True  # false: the campaign folder only, no MLflow runs
    uri: str = "sqlite:///out/mlflow.db"  # MLflow tracking URI: a SQLite file, a server's URL, a database
    experiment: str = Field("cdm", min_length=1)  # MLflow experiment name (a plain name, no '/')
    artifact_location: str = "out/mlartifacts"  # for experiments this campaign creates in a local store
    log_every: PositiveInt = 1  # loss metric every k steps
    flush_seconds: NonNegative = 5.0  # seconds between batched writes of the chains' live losses to MLflow
    child_runs_max: Annotated[int, Field(ge=0)] = 500  # a run per chain up to this many chains, else the top-k's
    system_metrics: bool = False  # CPU, memory, disk, network, GPU of every Ray node on the campaign run (MLflow's)
    system_metrics_seconds: Positive = 10.0  # their sampling interval in seconds

    @field_validator("experiment")
    @classmethod
    def _plain_experiment(cls, value: str) -> str:
        if value.strip() in (".", "..") or any(c in value for c in "/\\\0"):
            raise ValueError(f"{value!r} is a path; an experiment is a plain name (no '/', '\\', '.' or '..')")
        return value

    @model_validator(mode="after")
    def _metrics_need_a_store(self) -> TrackingConfig:
        if self.system_metrics and not self.enabled:
            raise ValueError("system_metrics: needs tracking.enabled (there is no MLflow run to take them)")
        return self


class ParamSpec(StrictModel):
    """One tunable knob: a float or int range (optionally log-uniform) or a list of choices."""

    type: Literal["float", "int", "categorical"]  # a float or int range, or one of choices
    low: float | None = None  # the range's lower end (float, int)
    high: float | None = None  # the range's upper end (float, int)
    log: bool = False  # log-uniform over the range (needs low > 0)
    choices: list[Any] | None = None  # the values of a categorical

    @model_validator(mode="after")
    def _complete(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs choices")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.type} needs low < high")
        elif self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        return self


class TuneConfig(StrictModel):
    """An Optuna study over campaigns: the search space (config paths -> specs), objective and pruning."""

    space: dict[str, ParamSpec] = Field(default_factory=dict)  # path -> range: "chains.zeta.0.scale": {type: float, …}
    objective: Literal["median", "best", "topk_mean"] = "median"  # a trial's value, of its chains' final_loss
    objective_topk: PositiveInt = 5  # k of topk_mean
    pruner: Literal["none", "median", "successive_halving"] = "median"  # Optuna's pruner, asked at the milestones
    # fractions of num_steps at which a trial reports its chains' median guidance loss to the pruner
    milestones: list[Annotated[float, Field(gt=0, lt=1)]] = Field(default_factory=lambda: [0.25, 0.5, 0.75])
    multi_objective: bool = False  # minimise (loss, compute = num_steps x n_c) together; pruning is off then
    study_name: str | None = Field(None, min_length=1, pattern=NAME)  # default: the campaign name
    sampler_seed: int = 0  # seed of Optuna's TPE sampler
    # Trials whose chains' median prior_fit exceeds this limit are infeasible (x* the sampler likes but the prior
    # does not: adversarial inputs). "auto": the 95% quantile over unguided chains, measured once per study.
    prior_fit_limit: Literal["auto", "off"] | Positive = "auto"
    # Database storages (--storage URL): each process heartbeats its running trials; a trial whose heartbeat is
    # older than the grace period belongs to a dead process, is failed (not counted) and retried once. None:
    # 30 s and 3 heartbeats. The journal file (one process per file) has no heartbeats: setting these is an error.
    heartbeat_seconds: PositiveInt | None = None  # seconds between a running trial's heartbeats
    grace_seconds: PositiveInt | None = None  # seconds after its last heartbeat before a trial counts as dead

    @field_validator("prior_fit_limit", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @model_validator(mode="after")
    def _grace_outlasts_a_heartbeat(self) -> TuneConfig:
        if self.heartbeat_seconds and self.grace_seconds and self.grace_seconds <= self.heartbeat_seconds:
            raise ValueError(f"grace_seconds: must exceed heartbeat_seconds ({self.heartbeat_seconds})")
        return self


class ClassifierConfig(StrictModel):
    """An attribute classifier: zero-shot against class text embeddings (softmax of logit_scale x cosine, as CLIP),
    or a factory returning class probabilities of y (input 'y') or of the generated image (input 'image')."""

    zero_shot: File | None = None  # .safetensors: "embeddings" (K, d_y) [+ "logit_scale"]
    factory: FactorySpec | None = None
    input: Literal["y", "image"] = "y"  # what the factory's function takes
    classes: list[str] = Field(min_length=2)  # class names, in the order of the embeddings / probabilities
    attribute: str | None = None  # the class whose share is the headline number (default: the first)
    logit_scale: Positive | None = None  # default: the file's logit_scale, else 100 (CLIP's)

    @model_validator(mode="after")
    def _one_kind(self) -> ClassifierConfig:
        if (self.zero_shot is None) == (self.factory is None):
            raise ValueError("give exactly one of zero_shot (a .safetensors of class embeddings) or factory")
        if self.zero_shot is not None and self.input != "y":
            raise ValueError("input: zero-shot classification compares y with the class embeddings; input must be y")
        if self.attribute is not None and self.attribute not in self.classes:
            raise ValueError(f"attribute: {self.attribute!r} is not one of classes {self.classes}")
        return self


class EvaluationConfig(StrictModel):
    """`cdm evaluate`: fresh conditional samples at the source and the top-k x*, their MMD to the target and the
    improvement over the source, and attribute shares with 95% Wilson intervals (MLGD-F paper, Exp. 2)."""

    samples: PositiveInt = 2000  # conditional samples per design
    chunk: PositiveInt = 250  # samples per sampler call
    topk: PositiveInt | None = None  # the best chains' x* evaluated; null: the campaign's topk
    seed: int = 20261202  # seed of the evaluation's sampler noise η
    classifier: ClassifierConfig | None = None
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95  # level of the attribute shares' Wilson intervals


class SelectionConfig(StrictModel):
    """Which chains a top-k lists (`cdm topk`): x* the prior finds unlikely are flagged and left out by default."""

    prior_fit_limit: Positive | None = None  # chains whose prior_fit exceeds it are flagged (None: no limit)


class CampaignConfig(StrictModel):
    """A design campaign: a problem, a method, many chains, resources, tracking and an output folder."""

    name: str = Field("campaign", min_length=1, pattern=NAME)  # the campaign folder is output/NAME-<time>-<id>
    problem: ProblemConfig = Field(default_factory=ProblemConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    chains: ChainsConfig = Field(default_factory=ChainsConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output: str = "out/campaigns"  # the folder campaign folders are made in
    topk: PositiveInt = 5  # chains with the lowest final_loss reported at the end
    pictures: bool = True  # per chain: its samples against the target and x* as an image (output folder, MLflow)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)  # which chains top-k lists keep or flag

    @model_validator(mode="after")
    def _source_within_schedule(self) -> CampaignConfig:
        source, steps = self.chains.source, self.method.num_steps
        if source is None:
            if self.method.name == "sdedit":
                raise ValueError("method.name: sdedit edits a source; set chains.source")
            return self
        if source.start_step is not None and source.start_step >= steps:
            raise ValueError(
                f"chains.source.start_step: {source.start_step} is beyond the schedule (method.num_steps = {steps}; "
                f"the start step must be below it)"
            )
        for strength in source.strengths or [source.strength] if source.start_step is None else []:
            if int(steps * strength) < 1:
                raise ValueError(
                    f"chains.source.strength: {strength} of method.num_steps = {steps} re-noises no step (the chain "
                    f"would start at step {steps}); use a strength of at least {1 / steps:.3g}"
                )
        return self


# -- loading ----------------------------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: list[str] = (), executor: str | None = None) -> CampaignConfig:
    """Read a campaign YAML (safe_load), apply `key=value` overrides and validate everything up front."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        data = read_yaml(path)
    for item in overrides:
        set_dotted(data, item)
    if executor is not None:
        if executor not in EXECUTORS:
            raise InputError(f"--executor: unknown {executor!r}; expected one of {list(EXECUTORS)}")
        resources = data.setdefault("resources", {})
        resources["executor"] = "local" if executor == "local" else "ray"
        if executor != "local":
            resources["placement"] = executor.removeprefix("ray_")
    return parse(CampaignConfig, data, source)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, with the file named in every error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def set_dotted(data: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (so 3 is an int, [1, 2] a list)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise InputError(f"--set {item!r}: expected key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise InputError(f"--set {key}: value {text!r} is not valid YAML") from None
    parts = key.strip().split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise InputError(f"--set {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def with_values(config: CampaignConfig, values: dict[str, Any], source: str = "tune.space") -> CampaignConfig:
    """The config with dotted paths (list items by index, e.g. chains.zeta.0.scale) set and re-validated."""
    data = config.model_dump(mode="json")
    for path, value in values.items():
        node: Any = data
        parts = path.split(".")
        for depth, part in enumerate(parts):
            key: Any = int(part) if isinstance(node, list) and part.isdigit() else part
            exists = (
                key < len(node)
                if isinstance(node, list) and isinstance(key, int)
                else isinstance(node, dict) and key in node
            )
            if not exists:
                raise InputError(f"{source}: {path}: no field {'.'.join(parts[: depth + 1])!r} in the campaign config")
            if depth == len(parts) - 1:
                node[key] = value
            else:
                node = node[key]
    return parse(CampaignConfig, data, source)


RESUME_MAY_CHANGE = (
    "resources.",
    "tracking.log_every",
    "tracking.flush_seconds",
    "tracking.system_metrics",
    "topk",
    "pictures",
    "evaluation.",
)  # where and how to run, not which chains
RESUME_MAY_NOT_CHANGE = ("resources.micro_batch",)  # the split of the chains into micro-batches


def leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted path -> value (list items by index)."""
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in leaves(value, f"{prefix}{key}.").items()} or {
            prefix.rstrip("."): {}
        }
    if isinstance(data, list):
        return {k: v for i, value in enumerate(data) for k, v in leaves(value, f"{prefix}{i}.").items()} or {
            prefix.rstrip("."): []
        }
    return {prefix.rstrip("."): data}


def check_resume(stored: CampaignConfig, resumed: CampaignConfig) -> None:
    """`--resume` may change where and how the campaign runs, never its chains or their micro-batches."""
    before, after = leaves(stored.model_dump(mode="json")), leaves(resumed.model_dump(mode="json"))
    for path in sorted(set(before) | set(after)):
        if before.get(path) == after.get(path):
            continue
        allowed = path.startswith(RESUME_MAY_CHANGE) and not path.startswith(RESUME_MAY_NOT_CHANGE)
        if not allowed:
            raise InputError(
                f"--set {path}: --resume cannot change the campaign's chains or their micro-batches (the campaign "
                f"has {before.get(path)!r}, given {after.get(path)!r}); only resources (but micro_batch), "
                "tracking.log_every and topk may change"
            )


def dump_config(config: CampaignConfig) -> str:
    """The resolved config as YAML (every default written out)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# -- chains and micro-batches ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MicroBatch:
    """A slice of a campaign's chains that runs as one batch: chain ids [start, stop), with the method knobs
    (so workers shared by several campaigns, e.g. the trials of a study, run each batch with its own)."""

    index: int
    start: int
    chains: Chains
    method: MethodConfig
    campaign: str = ""
    pictures: bool = True  # draw each chain's pictures at the end
    source: str | None = None  # editing: the source file the chains with a start step > 0 start from

    @property
    def key(self) -> tuple[str, int]:
        return (self.campaign, self.index)

    @property
    def chain_ids(self) -> range:
        return range(self.start, self.start + len(self.chains))


def campaign_chains(config: CampaignConfig) -> Chains:
    """Every chain of the campaign: seeds base_seed + k, schedules cycled."""
    schedules = config.chains.schedules()
    count, base, source = config.chains.count, config.chains.base_seed, config.chains.source
    starts = source.start_steps(count, config.method.num_steps) if source is not None else None
    return Chains.make(range(base, base + count), [schedules[k % len(schedules)] for k in range(count)], starts)


def micro_batches(config: CampaignConfig) -> list[MicroBatch]:
    """The campaign's chains cut into micro-batches of resources.micro_batch chains."""
    chains, size, source = campaign_chains(config), config.resources.micro_batch, config.chains.source_file
    return [
        MicroBatch(i, start, chains[start : start + size], config.method, config.name, config.pictures, source)
        for i, start in enumerate(range(0, len(chains), size))
    ]


def zeta_label(zeta: ZetaConfig) -> str:
    """A short label of a zeta schedule: its non-default fields."""
    changed = zeta.model_dump(exclude_defaults=True)
    return ",".join(f"{k}={v}" for k, v in changed.items()) or "constant"


def zeta_labels(zetas: Sequence[ZetaConfig]) -> list[str]:
    """Each chain's zeta_label; a schedule shared by many chains (cycled over 10^6 of them) is labelled once."""
    labels: dict[int, str] = {}
    return [labels.get(id(z)) or labels.setdefault(id(z), zeta_label(z)) for z in zetas]


def check_config(config: CampaignConfig) -> None:
    """What the driver checks before anything starts: the chains fit in its memory, the output folder can be
    written, the MLflow store answers and is one, its artifact folder can be written, and the problem spec resolves
    as far as it can without building a model (user code shipped through a runtime_env is checked by the actors
    when they start)."""
    from cdm_dist.driver import preconditions
    from cdm_dist.problems.registry import validate_spec

    preconditions.chains_fit(config.chains.count, config.method.num_steps)
    preconditions.writable_folder(config.output, "output")
    if config.tracking.enabled:
        tracking = config.tracking
        preconditions.tracking_store(tracking.uri)
        preconditions.artifact_folder(tracking.uri, tracking.experiment, tracking.artifact_location)
    runtime_env = config.resources.runtime_env
    ships = config.resources.executor == "ray" and runtime_env is not None and runtime_env.ships_code
    validate_spec(config.problem, importable=not ships)
