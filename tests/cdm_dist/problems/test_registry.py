"""Problem specs: registered names (built-in and entry points), factories and parts; each part built once, and only
by the role that needs it; every kind of bad spec is one InputError naming the field."""

import numpy as np
import pytest
import torch

from cdm_dist.driver.campaign import check_config, load_config
from cdm_dist.driver.runner import run_campaign
from cdm_dist.driver.store import CampaignStore
from cdm_dist.driver.worker import ChainWorker, LocalExecutor
from cdm_dist.errors import InputError
from cdm_dist.models.spec import ProblemConfig
from cdm_dist.problems.registry import registered_problems, resolve_problem


def _parts(module, **extra):
    return {part: {"factory": f"{module}:{part}"} for part in ("prior", "sampler", "target", "metrics")} | extra


def _campaign(small_campaign, problem):
    """A small in-process campaign on the given problem spec (a mapping)."""
    config = small_campaign(resources__executor="local")
    return config.model_copy(update={"problem": ProblemConfig.model_validate(problem)})


def _run(config):
    return run_campaign(config, LocalExecutor(config), CampaignStore.create(config), progress=False)


def _same_chains(a, b):
    for got, want in zip(a.rows, b.rows, strict=True):
        assert got.final_loss == pytest.approx(want.final_loss, abs=1e-12)
        np.testing.assert_allclose(np.load(got.x_path), np.load(want.x_path), rtol=0, atol=1e-12)


def test_the_old_problem_fields_become_the_built_ins_args():
    spec = load_config(None, ["problem.name=gmm5d", "problem.models=learned", "problem.fast_steps=4"]).problem
    assert (spec.kind, spec.name, spec.args) == ("name", "gmm5d", {"models": "learned", "fast_steps": 4})
    assert load_config(None, []).problem.name == "gmm2d"
    assert {"gmm2d", "gmm5d", "gmm10d", "digits"} <= set(registered_problems())


def test_factories_and_parts_give_the_same_chains_as_the_built_in(small_campaign, user_plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(user_plugin.folder))
    module = user_plugin.module
    reference = _run(_campaign(small_campaign, {"name": "gmm2d"}))
    for problem in ({"factory": f"{module}:whole"}, _parts(module), {"factory": f"{module}:recipe"}):
        report = _run(_campaign(small_campaign, problem))
        _same_chains(report, reference)
        assert report.rows[0].metrics.keys() == reference.rows[0].metrics.keys()  # l2_gmm, x_err, prior_fit


def test_without_metrics_the_chains_have_only_prior_fit(small_campaign, user_plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(user_plugin.folder))
    problem = _parts(user_plugin.module)
    del problem["metrics"]
    report = _run(_campaign(small_campaign, problem))
    assert all(set(r.metrics) == {"prior_fit"} for r in report.rows)


def test_each_role_builds_only_its_parts_once(small_campaign, user_plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(user_plugin.folder))
    config = _campaign(small_campaign, _parts(user_plugin.module))
    prior_worker = ChainWorker(config, "prior")
    assert [part for part, _ in user_plugin.built()] == ["prior"]
    sampler_worker = ChainWorker(config, "sampler")
    assert sorted(part for part, _ in user_plugin.built()) == ["metrics", "prior", "sampler", "target"]
    assert dict(prior_worker.problem.built) == {"prior": 1}
    assert dict(sampler_worker.problem.built) == {"sampler": 1, "target": 1, "metrics": 1}
    both = ChainWorker(config, "both")
    both.problem.prior, both.problem.fast_sampler, both.problem.target  # noqa: B018 (cached: no second build)
    assert dict(both.problem.built) == {"prior": 1, "sampler": 1, "target": 1, "metrics": 1}


def test_a_sampler_factory_that_raises_stops_only_the_sampler_role(small_campaign, user_plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(user_plugin.folder))
    config = _campaign(small_campaign, _parts(user_plugin.module, sampler={"factory": f"{user_plugin.module}:boom"}))
    ChainWorker(config, "prior")  # the prior role never calls the sampler's factory
    with pytest.raises(InputError, match=r"^problem\.sampler: boom raised RuntimeError: the user's model failed"):
        ChainWorker(config, "sampler")


def test_an_entry_point_registers_a_problem_name(small_campaign, user_plugin, monkeypatch, tmp_path):
    info = user_plugin.folder / "cdm_user_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cdm-user-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[cdm_dist.problems]\nmy-problem = {user_plugin.module}:recipe\n")
    monkeypatch.syspath_prepend(str(user_plugin.folder))
    assert registered_problems()["my-problem"] == f"{user_plugin.module}:recipe"
    config = _campaign(small_campaign, {"name": "my-problem", "args": {"name": "gmm2d"}})
    check_config(config)
    _same_chains(_run(config), _run(_campaign(small_campaign, {"name": "gmm2d"})))
    with pytest.raises(
        InputError, match=r"problem\.name: no problem 'my-problm' is registered; available: \[.*'my-problem'"
    ):
        check_config(_campaign(small_campaign, {"name": "my-problm"}))


def test_a_whole_problem_with_the_users_target_drops_the_problems_metrics(tmp_path):
    np.save(tmp_path / "g.npy", np.linspace(-1, 1, 40)[:, None])
    source = resolve_problem(ProblemConfig(name="gmm2d", target_file=str(tmp_path / "g.npy")))
    assert source.metrics is None and source.target.samples.shape == (40, 1)
    assert source.build().metrics is None


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ({"factory": "no_colon"}, r"problem\.factory: Value error, 'no_colon' is not of the form 'package\.module"),
        ({"factory": "not_a_module_xyz:make"}, r"problem\.factory: cannot import 'not_a_module_xyz' \(No module"),
        ({"factory": "MODULE:missing"}, r"problem\.factory: module 'MODULE' has no 'missing'"),
        (
            {"factory": "MODULE:whole", "args": {"size": 3}},
            r"problem\.args: unknown \['size'\]; whole takes \['name'\]",
        ),
        (
            _parts("MODULE", target={"factory": "MODULE:target", "args": {"target_size": "many"}}),
            r"problem\.target\.args\.target_size: Input should be a valid integer",
        ),
        (
            {"prior": {"diffusrs": "x"}, "sampler": {"factory": "m:f"}, "target": {"file": "x"}},
            r"problem\.prior: expected \{diffusers: FOLDER, \.\.\.\} or \{factory:",
        ),
        (_parts("MODULE", prior={"factory": "MODULE:prior", "args": {"nam": 1}}), r"problem\.prior\.args: unknown"),
        ({"name": "gmm2d", "prior": {"factory": "MODULE:prior"}}, r"problem: Value error, name builds the whole"),
        ({"prior": {"factory": "MODULE:prior"}}, r"a parts spec needs prior, sampler and target; \['sampler', 'target"),
        ({"name": "gmm2d", "args": [1, 2]}, r"problem\.args: Input should be a valid dictionary"),
        (
            _parts("MODULE", target={"file": "/no/such/file.npy"}),
            r"problem\.target\.file: Value error, /no/such/file\.npy is not a file$",
        ),
    ],
)
def test_bad_specs_are_one_line_naming_the_field(small_campaign, user_plugin, monkeypatch, problem, message):
    monkeypatch.syspath_prepend(str(user_plugin.folder))
    text = repr(problem).replace("MODULE", user_plugin.module)
    message = message.replace("MODULE", user_plugin.module)
    with pytest.raises(InputError, match=message):
        config = load_config(None, [f"problem={text}", "resources.executor=local"])
        check_config(config)


@pytest.mark.parametrize(
    ("part", "factory", "message"),
    [
        ("sampler", "not_a_sampler", r"problem\.sampler: the factory returned int, not a ConditionalSampler"),
        ("prior", "boom", r"problem\.prior: boom raised RuntimeError: the user's model failed to load"),
        ("target", "not_a_sampler", r"problem\.target: the factory returned int, not a Target"),
    ],
)
def test_factories_that_raise_or_return_the_wrong_type_are_named(
    small_campaign, user_plugin, monkeypatch, part, factory, message
):
    monkeypatch.syspath_prepend(str(user_plugin.folder))
    config = _campaign(
        small_campaign, _parts(user_plugin.module, **{part: {"factory": f"{user_plugin.module}:{factory}"}})
    )
    with pytest.raises(InputError, match=message):
        LocalExecutor(config)


def test_the_cli_refuses_a_bad_factory_with_exit_2_and_creates_nothing(tmp_path, user_plugin, capsys):
    from cdm_cli.main import main

    config = tmp_path / "c.yaml"
    config.write_text(
        f"problem: {{factory: 'not_a_module_xyz:make'}}\noutput: {tmp_path / 'out'}\n"
        f"tracking: {{uri: 'sqlite:///{tmp_path}/m.db'}}\nresources: {{executor: local}}\n"
    )
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cdm: error: problem.factory: cannot import 'not_a_module_xyz'")
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.db").exists()


def test_a_problem_factory_may_take_the_workers_device(user_plugin, monkeypatch, tmp_path):
    module = tmp_path / "device_plugin.py"
    module.write_text(
        "from cdm_dist.problems.builtins import gmm_prior\nSEEN = []\n"
        "def prior(device):\n    SEEN.append(device)\n    return gmm_prior('gmm2d')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = ProblemConfig.model_validate(
        {"prior": {"factory": "device_plugin:prior"}, "sampler": {"factory": f"{user_plugin.module}:sampler"},
         "target": {"factory": f"{user_plugin.module}:target"}}
    )  # fmt: skip
    monkeypatch.syspath_prepend(str(user_plugin.folder))
    resolve_problem(spec, torch.device("cpu")).prior  # noqa: B018
    import device_plugin

    assert device_plugin.SEEN == ["cpu"]


def test_a_built_in_is_registered_and_resolved_by_function_object(monkeypatch):
    """The built-ins and their parts are the functions themselves: resolving one imports nothing by name."""
    from cdm_dist.models import factories
    from cdm_dist.problems import builtins as problems
    from cdm_dist.problems import registry
    from cdm_dist.problems.registry import problem_recipe

    assert registered_problems()["gmm2d"] is problems.gmm2d and problems.gmm2d.__name__ == "gmm2d"

    def no_imports(path, field):
        raise AssertionError(f"{field}: {path} imported by name")

    monkeypatch.setattr(factories, "load_object", no_imports)
    monkeypatch.setattr(registry, "load_object", no_imports)
    parts = problem_recipe(ProblemConfig(name="gmm2d", args={"target_size": 50}))
    assert parts.prior.factory is problems.gmm_prior and parts.target.factory is problems.gmm_target
    built = resolve_problem(ProblemConfig(name="gmm2d", args={"target_size": 50})).build()
    exact = problems.gmm_problem("gmm2d", target_size=50)
    assert torch.equal(built.target.samples, exact.target.samples)
    x = exact.x_star[None]
    assert built.metrics(x)["l2_gmm"].item() == exact.metrics(x)["l2_gmm"].item()
    dumped = parts.model_dump(mode="json")  # written out, a function part is its import path
    assert dumped["target"]["factory"] == "cdm_dist.problems.builtins:gmm_target"
    monkeypatch.undo()
    again = ProblemConfig.model_validate(dumped)
    assert torch.equal(resolve_problem(again).target.samples, exact.target.samples)


DECODER_SOURCE = """
SEEN = []


def doubling(scale: float = 2.0):
    def decode(x):
        SEEN.append(tuple(x.shape))
        return scale * x

    return decode
"""


def test_a_decoder_part_feeds_both_samplers_and_only_the_sampler_role_builds_it(monkeypatch, tmp_path):
    from cdm_dist.models.adapters import DecodedSampler
    from cdm_dist.problems.builtins import gmm_fast_sampler, gmm_full_sampler, gmm_prior, gmm_target

    (tmp_path / "decoder_plugin.py").write_text(DECODER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    gmm = {"args": {"name": "gmm2d"}}
    spec = ProblemConfig.model_validate(
        {"prior": {"factory": gmm_prior} | gmm, "sampler": {"factory": gmm_fast_sampler} | gmm,
         "full_sampler": {"factory": gmm_full_sampler} | gmm, "target": {"factory": gmm_target} | gmm,
         "decoder": {"factory": "decoder_plugin:doubling", "args": {"scale": 3.0}}}
    )  # fmt: skip
    prior_side = resolve_problem(spec)
    prior_side.prior  # noqa: B018
    assert dict(prior_side.built) == {"prior": 1}
    source = resolve_problem(spec)
    fast, full = source.sampler("mlgd_f"), source.sampler("mlgd")
    assert isinstance(fast, DecodedSampler) and isinstance(full, DecodedSampler)
    assert fast.decoder is full.decoder is source.decoder
    assert dict(source.built) == {"decoder": 1, "sampler": 1, "full_sampler": 1}
    x, eta = torch.tensor([[-5.0], [1.0]], dtype=torch.float64), torch.randn(2, 4, 1, dtype=torch.float64)
    torch.testing.assert_close(fast.sample(x, eta), gmm_fast_sampler("gmm2d").sample(3.0 * x, eta), rtol=0, atol=0)
    import decoder_plugin

    assert decoder_plugin.SEEN == [(2, 1)]
    with pytest.raises(InputError, match=r"problem\.decoder\.args: unknown \['size'\]"):
        bad = spec.model_copy(update={"decoder": spec.decoder.model_copy(update={"args": {"size": 1}})})
        resolve_problem(bad).fast_sampler  # noqa: B018
    with pytest.raises(ValueError, match=r"name builds the whole problem; \['decoder'\] are only for parts specs"):
        ProblemConfig.model_validate({"name": "gmm2d", "decoder": {"factory": "decoder_plugin:doubling"}})
