import math
from typing import Literal

import pytest
import torch

from cdm_dist.chains.config import MLGDConfig, parse
from cdm_dist.chains.losses import (
    LOSSES,
    EnergyLoss,
    LossSpec,
    MMDLaplaceLoss,
    MMDLoss,
    SlicedWassersteinLoss,
    energy_distance,
    log_mean_exp_loss,
    mmd2,
    sliced_wasserstein,
)
from cdm_dist.errors import InputError


def _loop_mmd2(x, y, scale, mults, unbiased):
    """Float64 double loops over pairs."""

    def k(a, b):
        d2 = float(((a - b) ** 2).sum())
        return sum(math.exp(-d2 / (c * scale)) for c in mults)

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if not unbiased or i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if not unbiased or i != j)
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m))
    nn, mm = (n * (n - 1), m * (m - 1)) if unbiased else (n * n, m * m)
    return xx / nn + yy / mm - 2 * xy / (n * m)


def _pairwise_d2(a, b):
    return [float(((ai - bj) ** 2).sum()) for ai in a for bj in b]


@pytest.mark.parametrize("dim", [1, 3])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("bandwidth", ["median", "mean", "target", 0.7])
def test_mmd2_equals_double_loops(dim, unbiased, bandwidth):
    gen = torch.Generator().manual_seed(dim)
    y = torch.randn(3, 9, dim, generator=gen, dtype=torch.float64)
    target = torch.randn(11, dim, generator=gen, dtype=torch.float64) + 0.5
    mults = (0.5, 1.0, 2.0)
    got = mmd2(y, target, bandwidth, mults, unbiased)
    for b in range(3):
        if bandwidth == "median":
            d2 = sorted(_pairwise_d2(y[b], target))
            scale = d2[(len(d2) - 1) // 2]  # torch.median takes the lower middle
        elif bandwidth == "mean":
            pooled = torch.cat([y[b], target])
            d2 = [v for i, v in enumerate(_pairwise_d2(pooled, pooled)) if i // len(pooled) != i % len(pooled)]
            scale = sum(d2) / len(d2)
        elif bandwidth == "target":  # the target's own mean off-diagonal d², whatever y is
            d2 = [v for i, v in enumerate(_pairwise_d2(target, target)) if i // len(target) != i % len(target)]
            scale = sum(d2) / len(d2)
        else:
            scale = 2 * bandwidth**2
        assert got[b].item() == pytest.approx(_loop_mmd2(y[b], target, scale, mults, unbiased), rel=1e-10, abs=1e-12)


def test_unbiased_mmd_matches_the_gaussian_closed_form():
    """X ~ N(0, s1² I), Y ~ N(mu, s2² I), k = exp(-|a-b|²/(2h²)): E k(X, Y) = (h²/(h²+s1²+s2²))^{d/2} exp(...)."""
    d, h, s1, s2 = 2, 1.3, 0.8, 1.1
    mu = torch.tensor([0.9, -0.4], dtype=torch.float64)

    def ek(va, vb, delta2):
        return (h**2 / (h**2 + va + vb)) ** (d / 2) * math.exp(-delta2 / (2 * (h**2 + va + vb)))

    exact = ek(s1**2, s1**2, 0) + ek(s2**2, s2**2, 0) - 2 * ek(s1**2, s2**2, float(mu @ mu))
    gen = torch.Generator().manual_seed(0)
    x = s1 * torch.randn(40, 200, d, generator=gen, dtype=torch.float64)
    y = mu + s2 * torch.randn(40, 200, d, generator=gen, dtype=torch.float64)
    estimates = mmd2(x, y, h, (1.0,), unbiased=True)  # 40 independent U-statistics
    standard_error = estimates.std() / 40**0.5
    assert abs(estimates.mean().item() - exact) < 4 * standard_error.item()


@pytest.mark.parametrize("dim", [1, 3])
@pytest.mark.parametrize("bandwidth", ["median", "mean", "target", 0.7])
def test_laplace_mmd_equals_double_loops(dim, bandwidth):
    gen = torch.Generator().manual_seed(dim)
    y = torch.randn(2, 8, dim, generator=gen, dtype=torch.float64)
    t = torch.randn(10, dim, generator=gen, dtype=torch.float64) + 0.5
    got = parse(MLGDConfig, {"loss": {"name": "mmd_laplace", "bandwidth": bandwidth, "multipliers": [0.5, 2.0]}})
    got = got.loss.build()(y, t)
    for b in range(2):
        x, z = y[b].tolist(), t.tolist()
        cross = sorted(math.dist(a, c) for a in x for c in z)
        within = [math.dist(a, c) for i, a in enumerate(x + z) for j, c in enumerate(x + z) if i != j]
        own = [math.dist(a, c) for i, a in enumerate(z) for j, c in enumerate(z) if i != j]
        s = {"median": cross[(len(cross) - 1) // 2], "mean": sum(within) / len(within), "target": sum(own) / len(own)}
        s = s.get(bandwidth, bandwidth)

        def mean_k(u, v, s=s):
            """Mean Laplace kernel over the pairs (i, j) of u x v, i != j within a sample."""
            pairs = [(a, c) for i, a in enumerate(u) for j, c in enumerate(v) if u is not v or i != j]
            return sum(math.exp(-math.dist(a, c) / (mult * s)) for a, c in pairs for mult in (0.5, 2.0)) / len(pairs)

        assert got[b].item() == pytest.approx(mean_k(x, x) + mean_k(z, z) - 2 * mean_k(x, z), rel=1e-10)
    assert MMDLaplaceLoss().min_samples == 2


def test_energy_distance_equals_loops_and_is_zero_in_law():
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(2, 7, 2, generator=gen, dtype=torch.float64)
    t = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    got = energy_distance(y, t)
    for b in range(2):
        xy = sum(float((a - c).norm()) for a in y[b] for c in t) / (7 * 6)
        xx = sum(float((y[b][i] - y[b][j]).norm()) for i in range(7) for j in range(7) if i != j) / 42
        tt = sum(float((t[i] - t[j]).norm()) for i in range(6) for j in range(6) if i != j) / 30
        assert got[b].item() == pytest.approx(2 * xy - xx - tt, rel=1e-10)


def test_sliced_wasserstein_in_1d_is_the_sorted_w2():
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(3, 50, 1, generator=gen, dtype=torch.float64)
    t = torch.randn(50, 1, generator=gen, dtype=torch.float64) * 2 + 1
    got = sliced_wasserstein(y, t, n_projections=4)
    expected = ((torch.sort(y[..., 0], 1).values - torch.sort(t[:, 0]).values) ** 2).mean(1)
    torch.testing.assert_close(got, expected)


def test_sliced_wasserstein_with_unequal_sizes_uses_target_quantiles():
    y = torch.tensor([[[0.0], [1.0]]], dtype=torch.float64)
    t = torch.tensor([[0.0], [0.0], [1.0], [1.0]], dtype=torch.float64)  # quantiles at 1/4 and 3/4: 0 and 1
    assert sliced_wasserstein(y, t, n_projections=1).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_are_batched_and_differentiable(name):
    spec = LOSSES[name]()
    loss = (spec.model_copy(update={"bandwidth": 1.0}) if "bandwidth" in type(spec).model_fields else spec).build()
    y = torch.randn(4, 16, 2, dtype=torch.float64, requires_grad=True)
    t = torch.randn(20, 2, dtype=torch.float64)
    out = loss(y, t)
    assert out.shape == (4,)
    (grad,) = torch.autograd.grad(out.sum(), y, retain_graph=True)
    assert torch.isfinite(grad).all()
    # each chain's loss depends on its own samples only
    assert torch.autograd.grad(out[1], y)[0][[0, 2, 3]].abs().max() == 0
    # a per-chain target gives the same numbers as a shared one
    torch.testing.assert_close(loss(y, t.expand(4, -1, -1)), out)


def test_mmd_gradient_matches_finite_differences():
    loss = MMDLoss(bandwidth=0.8, multipliers=[0.5, 2.0]).build()
    y = torch.randn(1, 6, 2, dtype=torch.float64)
    t = torch.randn(8, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: loss(v, t), (y.requires_grad_(True),))


def test_sqrt_option_and_log_mean_exp():
    y, t = torch.randn(2, 10, 1, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    plain, rooted = MMDLoss(unbiased=False).build()(y, t), MMDLoss(unbiased=False, sqrt=True).build()(y, t)
    torch.testing.assert_close(rooted, torch.sqrt(plain.clamp_min(0) + 1e-8))
    losses = torch.tensor([[0.1, 0.5, 2.0]], dtype=torch.float64)
    expected = -math.log(sum(math.exp(-v) for v in (0.1, 0.5, 2.0)) / 3)
    assert log_mean_exp_loss(losses).item() == pytest.approx(expected)


def test_bad_loss_inputs_are_named():
    with pytest.raises(InputError, match="n_c >= 2"):
        MMDLoss().build()(torch.zeros(1, 1, 1), torch.zeros(5, 1))
    with pytest.raises(InputError, match=r"loss\.name"):
        parse(MLGDConfig, {"loss": {"name": "kl"}})
    with pytest.raises(InputError, match=r"loss\.bandwidth"):
        parse(MLGDConfig, {"loss": {"name": "mmd", "bandwidth": "silverman"}})


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        ({}, MMDLoss),
        ({"bandwidth": 0.5}, MMDLoss),  # no name: the MMD
        ({"name": "mmd", "bandwidth": 0.5}, MMDLoss),
        ({"name": "energy"}, EnergyLoss),
        ({"name": "sliced_wasserstein"}, SlicedWassersteinLoss),
        ({"name": "sliced_wasserstein", "n_projections": 8, "sqrt": True}, SlicedWassersteinLoss),
    ],
)
def test_the_loss_union_dispatches_on_name_and_round_trips(data, kind):
    loss = parse(MLGDConfig, {"loss": data}).loss
    assert type(loss) is kind and all(getattr(loss, k) == v for k, v in data.items())
    dumped = MLGDConfig(loss=loss).model_dump(mode="json")
    assert parse(MLGDConfig, dumped).loss == loss and dumped["loss"]["name"] == loss.name


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "mmd", "n_projections": 8}, "loss.n_projections"),
        ({"name": "energy", "bandwidth": 1.0}, "loss.bandwidth"),
        ({"name": "sliced_wasserstein", "unbiased": False}, "loss.unbiased"),
        ({"n_projections": 8}, "loss.n_projections"),  # no name: the MMD's options only
    ],
)
def test_options_of_another_loss_are_rejected_by_name(data, field):
    with pytest.raises(InputError, match=rf"{field}: Extra inputs are not permitted"):
        parse(MLGDConfig, {"loss": data})


@pytest.mark.parametrize("name", ["kl", 3])
def test_an_unknown_loss_name_lists_the_known_ones(name):
    with pytest.raises(InputError, match=r"^config: loss\.name: ") as info:
        parse(MLGDConfig, {"loss": {"name": name}})
    assert all(f"'{known}'" in str(info.value) for known in LOSSES)
    with pytest.raises(InputError, match="expected a mapping with a name in"):
        parse(MLGDConfig, {"loss": "mmd"})


@pytest.mark.parametrize(
    ("spec", "least"),
    [(MMDLoss(), 2), (MMDLoss(unbiased=False), 1), (EnergyLoss(), 2), (SlicedWassersteinLoss(), 1)],
)
def test_min_samples_is_checked_by_the_config_and_the_loss(spec, least):
    assert spec.min_samples == least
    y, t = torch.randn(1, least, 2, dtype=torch.float64), torch.randn(least, 2, dtype=torch.float64)
    assert spec.build()(y, t).shape == (1,)
    assert MLGDConfig(n_c=least, loss=spec).n_c == least
    if least > 1:
        with pytest.raises(InputError, match=rf"n_c = {least - 1}: the {spec.name} loss needs n_c >= {least}"):
            parse(MLGDConfig, {"n_c": least - 1, "loss": spec})
        with pytest.raises(InputError, match=rf"the {spec.name} loss needs at least {least} samples"):
            spec.build()(y[:, 1:], t)


def test_every_loss_is_registered_once_with_its_name():
    assert {"mmd", "energy", "sliced_wasserstein"} <= set(LOSSES)
    assert all(cls.model_fields["name"].default == name and issubclass(cls, LossSpec) for name, cls in LOSSES.items())
    with pytest.raises(TypeError, match="a name no other loss has"):

        class Again(LossSpec):
            name: Literal["mmd"] = "mmd"


def _dense_kernel_mmd2(y, t, bandwidth, mults, unbiased, power):
    """The loss as it was before the target block was prepared: every block computed in full, per row."""
    t = t.expand(y.shape[0], -1, -1) if t.dim() == 2 else t

    def values(a, b):
        d2 = ((a[:, :, None, :] - b[:, None, :, :]) ** 2).sum(-1)
        return d2 if power == 2 else d2.clamp_min(1e-30).sqrt()

    v_xx, v_tt, v_xt = values(y, y), values(t, t), values(y, t)
    if bandwidth == "median":
        scale = v_xt.flatten(1).median(dim=1).values.detach()
    elif bandwidth == "mean":
        n, m = y.shape[1], t.shape[1]
        total = v_xx.sum((1, 2)) + v_tt.sum((1, 2)) + 2 * v_xt.sum((1, 2))
        scale = (total / ((n + m) ** 2 - (n + m))).detach()
    elif bandwidth == "target":
        m = t.shape[1]
        scale = v_tt.sum((1, 2)) / (m * m - m)
    else:
        scale = torch.full((y.shape[0],), bandwidth, dtype=y.dtype)

    def mean_k(v, within):
        k = sum(torch.exp(-v / (c * scale[:, None, None])) for c in mults)
        if within and unbiased:
            size = v.shape[-1]
            return (k.sum((1, 2)) - torch.diagonal(k, dim1=1, dim2=2).sum(1)) / (size * (size - 1))
        return k.mean((1, 2))

    return mean_k(v_xx, True) + mean_k(v_tt, True) - 2 * mean_k(v_xt, False)


KERNEL_SPECS = [
    MMDLoss(),
    MMDLoss(unbiased=False, multipliers=[0.5, 1.0, 2.0]),
    MMDLoss(bandwidth="mean"),
    MMDLoss(bandwidth=0.9, unbiased=False),
    MMDLoss(bandwidth="target", unbiased=False, multipliers=[0.25, 0.5, 1.0, 2.0, 4.0]),  # the MLGD-F mixtures' loss
    MMDLaplaceLoss(),
    MMDLaplaceLoss(bandwidth="mean", multipliers=[0.5, 2.0]),
    MMDLaplaceLoss(bandwidth=1.3),
]


@pytest.mark.parametrize("spec", KERNEL_SPECS, ids=lambda s: repr(s))
@pytest.mark.parametrize("dim", [1, 3, 6])  # pair differences (d <= 4) and full blocks
@pytest.mark.parametrize("per_row", [False, True])
def test_prepared_target_block_equals_the_dense_loss_and_gradient(spec, dim, per_row):
    gen = torch.Generator().manual_seed(dim)
    y = torch.randn(4, 7, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    t = (
        torch.randn(4, 12, dim, generator=gen, dtype=torch.float64)
        if per_row
        else torch.randn(12, dim, generator=gen, dtype=torch.float64)
    )
    scale = spec.scale
    unbiased = spec.u_statistic
    expected = _dense_kernel_mmd2(y, t, scale, spec.multipliers, unbiased, spec.power)
    loss = spec.build()
    prepared = spec.prepare(t)
    got = loss(y, prepared)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), y)
    (expected_grad,) = torch.autograd.grad(expected.sum(), y)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss(y, prepared), got, rtol=0, atol=0)  # a prepared target is reused as it is
    assert not any(v.requires_grad for v in prepared.terms.values())


@pytest.mark.parametrize("dim", [1, 2])
def test_the_target_block_is_chunked_over_rows_without_changing_it(monkeypatch, dim):
    y = torch.randn(5, 6, dim, dtype=torch.float64)
    targets = (torch.randn(9, dim, dtype=torch.float64), torch.randn(5, 9, dim, dtype=torch.float64))  # shared, per row
    whole = [MMDLoss().build()(y, t) for t in targets]
    monkeypatch.setattr("cdm_dist.chains.losses.PAIR_CHUNK", 1)  # one row at a time
    for t, expected in zip(targets, whole, strict=True):
        torch.testing.assert_close(MMDLoss().build()(y, t), expected, rtol=1e-14, atol=0)


def test_far_apart_samples_keep_the_loss_exact_under_the_exp_floor():
    """Kernel arguments far below -87 (where torch's exp leaves its fast path) are floored; the loss is unchanged."""
    y = torch.zeros(2, 5, 1, dtype=torch.float64)
    y[1] += 1e3  # all cross distances of row 1 are huge against a tight target
    t = torch.linspace(-0.01, 0.01, 8, dtype=torch.float64)[:, None]
    for spec in (MMDLoss(bandwidth=0.001), MMDLoss()):
        got = spec.build()(y, t)
        expected = _dense_kernel_mmd2(y, t, spec.scale, spec.multipliers, True, 2)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-30)


@pytest.mark.parametrize("spec", [EnergyLoss(), SlicedWassersteinLoss(n_projections=5)], ids=lambda s: s.name)
def test_energy_and_sliced_terms_prepared_once_equal_the_plain_loss(spec):
    y = torch.randn(3, 6, 2, dtype=torch.float64)
    t_shared, t_rows = torch.randn(10, 2, dtype=torch.float64), torch.randn(3, 10, 2, dtype=torch.float64)
    plain = energy_distance if spec.name == "energy" else lambda a, b: sliced_wasserstein(a, b, 5)
    for t in (t_shared, t_rows):
        torch.testing.assert_close(spec.build()(y, spec.prepare(t)), plain(y, t), rtol=1e-12, atol=1e-14)
    rows = torch.stack([spec.build()(y[b : b + 1], t_rows[b])[0] for b in range(3)])
    torch.testing.assert_close(spec.build()(y, t_rows), rows, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("p", [1, 2])
def test_sliced_wasserstein_in_1d_is_the_sorted_wp(p):
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(2, 40, 1, generator=gen, dtype=torch.float64)
    t = torch.randn(40, 1, generator=gen, dtype=torch.float64) * 0.5 - 1
    got = sliced_wasserstein(y, t, n_projections=3, p=p)  # every 1-D direction is ±1: the same sorted gaps
    expected = ((torch.sort(y[..., 0], 1).values - torch.sort(t[:, 0]).values).abs() ** p).mean(1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("p", [1, 2])
def test_sliced_wasserstein_of_a_shifted_copy_is_the_mean_projected_shift(p):
    gen = torch.Generator().manual_seed(4)
    t = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    shift = torch.tensor([0.7, -0.3], dtype=torch.float64)
    spec = SlicedWassersteinLoss(n_projections=50, p=p)
    directions = spec.target_terms(t)["directions"]  # (2, 50): sorting commutes with a shift along each direction
    expected = ((shift @ directions).abs() ** p).mean()
    assert spec.build()((t + shift)[None], t).item() == pytest.approx(expected.item(), rel=1e-12)


def test_sliced_wasserstein_in_2d_equals_a_float64_loop_over_directions():
    gen = torch.Generator().manual_seed(5)
    y = torch.randn(3, 12, 2, generator=gen, dtype=torch.float64)
    t = torch.randn(12, 2, generator=gen, dtype=torch.float64) + 0.5
    spec = SlicedWassersteinLoss(n_projections=7, p=1)
    directions = spec.target_terms(t)["directions"].tolist()  # [[x_l], [y_l]]
    got = spec.build()(y, t)
    for b in range(3):
        total = 0.0
        for ux, uy in zip(*directions, strict=True):
            a = sorted(float(v[0]) * ux + float(v[1]) * uy for v in y[b])
            c = sorted(float(v[0]) * ux + float(v[1]) * uy for v in t)
            total += sum(abs(i - j) for i, j in zip(a, c, strict=True)) / 12
        assert got[b].item() == pytest.approx(total / 7, rel=1e-12)


def test_sliced_wasserstein_p_must_be_1_or_2():
    with pytest.raises(InputError, match=r"^config: loss\.p: Input should be 1 or 2"):
        parse(MLGDConfig, {"loss": {"name": "sliced_wasserstein", "p": 3}})
