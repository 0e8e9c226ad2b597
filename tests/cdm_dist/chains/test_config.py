import pytest

from cdm_dist.chains.config import MLGDConfig, ZetaConfig, parse
from cdm_dist.errors import InputError


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"zeta": {"scale": -1.0}}, "zeta.scale"),
        ({"zeta": {"scale": float("nan")}}, "zeta.scale"),
        ({"zeta": {"kind": "exponential"}}, "zeta.kind"),
        ({"loss": {"name": "kl"}}, "loss.name"),
        ({"n_c": 1}, "n_c = 1"),
        ({"num_stepz": 3}, "num_stepz"),
        ({"guidance_start": 0.8, "guidance_stop": 0.2}, "guidance_start"),
    ],
)
def test_bad_values_name_the_field(data, field):
    class Campaign(MLGDConfig):
        zeta: ZetaConfig = ZetaConfig()

    with pytest.raises(InputError) as info:
        parse(Campaign, data, "campaign.yaml")
    assert field in str(info.value)
    assert str(info.value).startswith("campaign.yaml: ")


def test_biased_mmd_allows_a_single_sample():
    assert parse(MLGDConfig, {"n_c": 1, "loss": {"unbiased": False}}).n_c == 1


def test_cdms_needs_beta():
    with pytest.raises(InputError, match="beta"):
        parse(ZetaConfig, {"kind": "cdms"})


def test_heldout_default_is_four_times_n_c():
    assert MLGDConfig(n_c=30).heldout_samples == 120
    assert MLGDConfig(n_c=30, eval_samples=7).heldout_samples == 7
