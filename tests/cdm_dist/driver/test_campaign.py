from pathlib import Path

import numpy as np
import pytest

from cdm_dist.driver.campaign import campaign_chains, check_config, load_config, micro_batches
from cdm_dist.errors import InputError

# Examples whose files the user makes or provides are validated where those files are made: editing_tiny.yaml in
# tests/cdm_cli/test_editing.py (tiny models written first), scribbles_sdxl.yaml in test_plan.py (published configs).
NEEDS_FILES = ("editing_tiny.yaml", "scribbles_sdxl.yaml")
EXAMPLES = sorted(p for p in (Path(__file__).parents[3] / "examples").glob("*.yaml") if p.name not in NEEDS_FILES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_examples_validate(path):
    config = load_config(path)
    assert len(campaign_chains(config)) == config.chains.count


def _yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_an_unknown_key_is_named_with_its_section(tmp_path):
    with pytest.raises(InputError, match=r"c\.yaml: chains\.cout: Extra inputs are not permitted"):
        load_config(_yaml(tmp_path, "chains:\n  cout: 3\n"))


def test_a_bad_value_names_the_field(tmp_path):
    with pytest.raises(InputError, match=r"resources\.placement: Input should be 'colocated' or 'split'"):
        load_config(_yaml(tmp_path, "resources:\n  placement: both\n"))


def test_set_overrides_are_type_checked():
    assert load_config(None, ["method.n_c=32", "chains.zeta=[{kind: cosine}]"]).method.n_c == 32
    with pytest.raises(InputError, match=r"method\.n_c: Input should be a valid integer"):
        load_config(None, ["method.n_c=many"])
    with pytest.raises(InputError, match=r"method\.n_c: Input should be greater than or equal to 1"):
        load_config(None, ["method.n_c=0"])
    with pytest.raises(InputError, match="expected key=value"):
        load_config(None, ["method.n_c"])
    with pytest.raises(InputError, match=r"method\.n_c is not a section"):
        load_config(None, ["method.n_c=3", "method.n_c.x=1"])


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(InputError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(_yaml(tmp_path, "chains: [1,\n"))
    with pytest.raises(InputError, match="expected a mapping"):
        load_config(_yaml(tmp_path, "- 1\n- 2\n"))


def test_a_zeta_grid_is_the_cartesian_product_and_chains_cycle_through_it():
    config = load_config(
        None, ["chains.count=10", "chains.base_seed=100", "chains.zeta_grid={kind: [linear, cosine], scale: [1, 2]}"]
    )
    schedules = config.chains.schedules()
    assert [(z.kind, z.scale) for z in schedules] == [("linear", 1), ("linear", 2), ("cosine", 1), ("cosine", 2)]
    chains = campaign_chains(config)
    assert chains.seeds == tuple(range(100, 110))
    assert [chains.zetas[k] for k in (0, 4, 8)] == [schedules[0]] * 3
    with pytest.raises(InputError, match=r"zeta_grid: unknown zeta fields \['speed'\]"):
        load_config(None, ["chains.zeta_grid={speed: [1]}"])
    with pytest.raises(InputError, match=r"chains: Value error, zeta_grid: \{'kind': 'cdms'\}: .* needs beta"):
        load_config(None, ["chains.zeta_grid={kind: [cdms]}"])


def test_micro_batches_cover_every_chain_once():
    config = load_config(None, ["chains.count=11", "resources.micro_batch=4"])
    batches = micro_batches(config)
    assert [len(b.chains) for b in batches] == [4, 4, 3]
    assert [c for b in batches for c in b.chain_ids] == list(range(11))
    assert sum((b.chains.seeds for b in batches), ()) == campaign_chains(config).seeds


def test_a_target_file_replaces_the_benchmark_target(tmp_path):
    from cdm_dist.driver.worker import ChainWorker

    samples = np.linspace(-1, 1, 50)[:, None]
    np.save(tmp_path / "g.npy", samples)
    worker = ChainWorker(load_config(None, [f"problem.target_file={tmp_path / 'g.npy'}"]), "sampler")
    np.testing.assert_allclose(worker.problem.target.samples.numpy(), samples)
    assert worker.problem.metrics is None  # the exact metrics describe the benchmark's own target
    np.save(tmp_path / "g2.npy", np.zeros((50, 2)))
    with pytest.raises(InputError, match=r"g2\.npy: target samples have dimension 2; .* gmm2d produces d_y = 1"):
        ChainWorker(load_config(None, [f"problem.target_file={tmp_path / 'g2.npy'}"]), "sampler")


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["problem.name=digits", "problem.models=exact"], r"problem\.args\.models: Input should be 'learned'"),
        (["problem.checkpoints=somewhere"], "checkpoints: only used with models: learned"),
        (["problem.models=learned", "problem.joint_seed=3"], "joint_seed: learned mixture models"),
        (["problem.models=learned", "problem.fast_steps=0"], r"problem\.args\.fast_steps: Input should be greater"),
        (["problem.models=learned", "problem.checkpoints=/nowhere"], "checkpoints: /nowhere is not a folder"),
        (["problem.digits_target=uniform"], r"problem\.args: unknown \['digits_target'\]; gmm2d takes"),
    ],
)
def test_built_in_problem_settings_are_checked_up_front(items, message):
    with pytest.raises(InputError, match=message):
        check_config(load_config(None, items))


def test_editing_chains_start_where_their_strength_says(tmp_path):
    """diffusers' img2img convention: start K = num_steps - int(num_steps * strength), strengths cycled."""
    np.save(tmp_path / "s.npy", np.zeros(1))
    source = f"chains.source={{file: {tmp_path / 's.npy'}, strengths: [0.5, 0.2, 1.0]}}"
    config = load_config(None, ["method.num_steps=30", "chains.count=5", source])
    assert campaign_chains(config).start_steps == (15, 24, 0, 15, 24)
    fixed = load_config(None, ["method.num_steps=30", f"chains.source={{file: {tmp_path / 's.npy'}, start_step: 15}}"])
    assert set(campaign_chains(fixed).start_steps) == {15}
    assert all(b.source == str(tmp_path / "s.npy") for b in micro_batches(fixed))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{file: S, strength: 0.0}", r"chains\.source\.strength: Input should be greater than 0"),
        ("{file: S, strength: 1.5}", r"chains\.source\.strength: Input should be less than or equal to 1"),
        ("{file: S, strength: 0.01}", r"strength: 0\.01 of method\.num_steps = 30 re-noises no step"),
        ("{file: S, start_step: 30}", r"start_step: 30 is beyond the schedule \(method\.num_steps = 30"),
        ("{file: S, start_step: 3, strength: 0.5}", r"give exactly one of start_step, strength or strengths"),
        ("{file: S}", r"give exactly one of start_step, strength or strengths \(given: none\)"),
        ("{file: missing.npy, strength: 0.5}", r"chains\.source\.file: .*missing\.npy is not a file"),
    ],
)
def test_a_bad_source_setting_is_named(tmp_path, source, message):
    np.save(tmp_path / "s.npy", np.zeros(1))
    with pytest.raises(InputError, match=message):
        load_config(None, ["method.num_steps=30", "chains.source=" + source.replace("S", str(tmp_path / "s.npy"))])


def test_optuna_can_tune_the_strength(tmp_path):
    from cdm_dist.driver.campaign import with_values

    np.save(tmp_path / "s.npy", np.zeros(1))
    config = load_config(None, ["method.num_steps=20", f"chains.source={{file: {tmp_path / 's.npy'}, strength: 0.5}}"])
    tuned = with_values(config, {"chains.source.strength": 0.25})
    assert set(campaign_chains(tuned).start_steps) == {15}
