"""Flow matching against docs/design.md section 4: timesteps, loss, guidance and samplers."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from jat.config import Config, ConfigError, FlowConfig
from jat.model.dit import JaT, model_config
from jat.model.flow import FlowMatching, u_shaped_cdf


def test_u_shaped_sampler_matches_analytic_cdf():
    a = 4.0
    fm = FlowMatching(FlowConfig(timesteps="u_shaped", u_shape_a=a))
    t = fm.sample_t(200_000, generator=torch.Generator().manual_seed(0)).double()
    result = stats.kstest(t.numpy(), lambda v: u_shaped_cdf(torch.as_tensor(v), a).numpy())
    assert result.pvalue > 0.01
    # a broken sampler (uniform) fails the same test
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0)).double()
    assert stats.kstest(u.numpy(), lambda v: u_shaped_cdf(torch.as_tensor(v), a).numpy()).pvalue < 1e-6
    # end-to-middle density ratio close to cosh(a/2) = 3.76
    w = 0.01
    ends = ((t < w).sum() + (t > 1 - w).sum()).item() / 2
    middle = ((t - 0.5).abs() < w / 2).sum().item()
    assert math.cosh(a / 2) == pytest.approx(3.7622, abs=1e-3)
    assert ends / middle == pytest.approx(math.cosh(a / 2), rel=0.06)
    assert t.min() >= 0.999e-5 and t.max() <= 1 - 0.999e-5


def test_other_timestep_samplers():
    g = torch.Generator().manual_seed(0)
    uni = FlowMatching(FlowConfig(timesteps="uniform")).sample_t(100_000, generator=g)
    assert stats.kstest(uni.numpy(), "uniform").pvalue > 0.01
    ln = FlowMatching(FlowConfig(timesteps="logit_normal", logit_normal_mean=0.5, logit_normal_std=0.8))
    t = ln.sample_t(100_000, generator=g).double()
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.02)
    assert logit.std().item() == pytest.approx(0.8, abs=0.02)


class Oracle(torch.nn.Module):
    """Returns the true clean latent whatever it is asked."""

    def __init__(self, x):
        super().__init__()
        self.x = x

    def forward(self, z, t, c, mask=None):
        return self.x.expand_as(z)


def test_loss_is_zero_for_oracle_and_weighted_in_velocity_space():
    x = torch.randn(4, 3, 10)
    fm = FlowMatching(FlowConfig(cond_dropout=0.0))
    loss, info = fm.loss(Oracle(x), x, torch.zeros_like(x))
    assert loss.item() == 0.0
    # a constant error e in x gives velocity error e / max(1 - t, t_eps)
    fm = FlowMatching(FlowConfig(cond_dropout=0.0, t_eps=0.05))
    g = torch.Generator().manual_seed(3)
    loss, info = fm.loss(Oracle(x + 0.1), x, torch.zeros_like(x), generator=g)
    expected = (0.1 / (1 - info["t"]).clamp_min(0.05)).pow(2)
    assert torch.allclose(info["loss_per_example"], expected, rtol=1e-4)


def test_loss_ignores_masked_frames():
    x = torch.randn(2, 3, 10)
    wrong = x.clone()
    wrong[..., 6:] += 5.0
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :6] = True
    fm = FlowMatching(FlowConfig(cond_dropout=0.0))
    loss, _ = fm.loss(Oracle(wrong), x, x, mask=mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


def test_condition_dropout_uses_null_condition():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, z, t, c, mask=None):
            seen.append(c.clone())
            return z

    fm = FlowMatching(FlowConfig(cond_dropout=0.5))
    c = torch.ones(2000, 1, 1)
    fm.loss(Spy(), torch.zeros(2000, 1, 1), c, generator=torch.Generator().manual_seed(0))
    dropped = (seen[0] == 0).float().mean().item()
    assert dropped == pytest.approx(0.5, abs=0.05)
    assert set(seen[0].unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_sampler_with_oracle_reproduces_x(solver):
    x = torch.randn(2, 4, 7)
    out = FlowMatching().sample(Oracle(x), torch.zeros_like(x), steps=6, solver=solver,
                                generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x, atol=1e-5)


class GaussianDenoiser(torch.nn.Module):
    """Exact E[x | z_t] for x ~ N(mu, sigma^2) and z_t = t x + (1 - t) eps."""

    def __init__(self, mu, sigma):
        super().__init__()
        self.mu, self.sigma = mu, sigma

    def forward(self, z, t, c, mask=None):
        t = t.view(-1, 1, 1).double()
        var_z = t**2 * self.sigma**2 + (1 - t) ** 2
        return (self.mu + t * self.sigma**2 / var_z * (z.double() - t * self.mu)).float()


def test_samplers_on_gaussian_toy_problem():
    mu, sigma = 2.0, 0.5
    model = GaussianDenoiser(mu, sigma)
    noise = torch.randn(1, 1, 50_000, generator=torch.Generator().manual_seed(0))
    c = torch.zeros_like(noise)
    exact = mu + sigma * noise  # the probability-flow ODE of a Gaussian is this affine map
    errors = {}
    for solver in ("euler", "heun"):
        out = FlowMatching().sample(model, c, steps=8, solver=solver, noise=noise)
        errors[solver] = (out - exact).abs().mean().item()
        out = FlowMatching().sample(model, c, steps=64, solver=solver, noise=noise)
        tol = 0.005 if solver == "heun" else 0.03  # Euler is first order: 64 steps leave ~2 %
        assert out.mean().item() == pytest.approx(mu, abs=0.01)
        assert out.std().item() == pytest.approx(sigma, rel=tol)
    assert errors["heun"] < errors["euler"]


def test_guidance_extrapolates_inside_interval_only():
    class CondEcho(torch.nn.Module):
        def forward(self, z, t, c, mask=None):
            return c.clone()

    fm = FlowMatching()
    z, c = torch.zeros(1, 1, 1), torch.ones(1, 1, 1)
    v1 = fm.velocity(CondEcho(), z, 0.5, c, cfg_scale=1.0)
    v3 = fm.velocity(CondEcho(), z, 0.5, c, cfg_scale=3.0)
    v3_out = fm.velocity(CondEcho(), z, 0.5, c, cfg_scale=3.0, cfg_interval=(0.6, 1.0))
    assert v1.item() == pytest.approx(1 / 0.5)  # (x̂ - z) / (1 - t)
    assert v3.item() == pytest.approx(3 / 0.5)  # x_u + 3 (x_c - x_u) with x_u = 0
    assert v3_out.item() == pytest.approx(v1.item())


def test_tiny_model_overfits_one_pair():
    torch.manual_seed(0)
    C, T = 8, 32
    x = torch.randn(1, C, T)
    c = torch.randn(1, C, T)
    model = JaT(model_config("tiny", in_channels=C))
    fm = FlowMatching(FlowConfig(cond_dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    xb, cb = x.expand(8, C, T), c.expand(8, C, T)
    losses = []
    for _ in range(300):
        loss, _ = fm.loss(model, xb, cb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first / last > 100
    model.eval()
    out = fm.sample(model, c, steps=16, solver="heun", generator=torch.Generator().manual_seed(1))
    rel = ((out - x).norm() / x.norm()).item()
    assert rel < 0.05


# --- the "band" output parametrisation --------------------------------------------------------------


class ConstantNet(torch.nn.Module):
    """A network whose output is fixed: F = `value` on the C latent channels, `env` on the envelope ones."""

    def __init__(self, channels: int, bands: int = 0, value: float = 0.0, env: float = 0.0):
        super().__init__()
        self.channels, self.bands, self.value, self.env = channels, bands, value, env

    def forward(self, x_t, t, c, mask=None):
        B, _, T = x_t.shape
        out = torch.full((B, self.channels + self.bands, T), self.value)
        out[:, self.channels:] = self.env
        return out


def band_flow(**kw) -> FlowMatching:
    return FlowMatching(FlowConfig(precondition="band", **kw))


def test_band_skip_is_the_posterior_mean_of_the_prior():
    """With F = 0, x̂ is E[x | z_t] for x ~ N(0, σ²) in the channels the condition lacks: the least-squares
    regression coefficient of x on z_t = t x + (1 - t) ε, which is t σ² / (t² σ² + (1 - t)²)."""
    fm = band_flow()
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x, eps = torch.randn(1, 1, n, generator=g), torch.randn(1, 1, n, generator=g)
    c = torch.zeros(1, 1, n)  # an empty channel: σ = 1
    for t in (0.1, 0.5, 0.9):
        z = t * x + (1 - t) * eps
        x_hat = fm.predict_x(ConstantNet(1), z, torch.tensor([t]), c)
        fitted = float((x * z).sum() / (z * z).sum())  # least-squares coefficient of x on z
        # the regression estimate's standard error: sqrt((1 - ρ²) / n) / std(z) <= 1 / (sqrt(n) std(z))
        se = 1 / math.sqrt(n) / float(z.std())
        assert float((x_hat / z).mean()) == pytest.approx(t / (t * t + (1 - t) ** 2), rel=1e-6)
        assert fitted == pytest.approx(float((x_hat / z).mean()), abs=5 * se)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_straight_skip_returns_the_end_of_a_straight_path_from_the_noise(steps):
    """flow.band_skip straight (a few-step student's): with F = 0, x̂ at any point of the straight path
    from ε to c + σε is its end, so 1, 2 or 4 Euler steps from ε land exactly there, σ set by a
    predicted envelope too; the posterior skip returns the mean at t = 0 (c) and its 1-step sample is c,
    with none of the band's energy: what made distilled students quiet."""
    C, T = 3, 4096
    g = torch.Generator().manual_seed(3)
    c = torch.zeros(1, C, T)
    c[:, 0] = torch.randn(T, generator=g).sign()  # channel 0 carried, 1 and 2 empty
    eps = torch.randn(1, C, T, generator=g)
    net = ConstantNet(C, bands=1, env=math.log(0.5))  # σ = 0.5 in the empty channels
    fm = band_flow(band_skip="straight", sigma_min=0.05)
    sigma = fm.residual_scale(c, None, torch.full((1, 1, T), math.log(0.5)))  # [1, C, T]
    end = c + sigma * eps
    for t in (0.0, 0.3, 0.8):
        z = t * end + (1 - t) * eps
        torch.testing.assert_close(fm.predict_x(net, z, torch.tensor([t]), c), end, rtol=1e-5, atol=1e-6)
    x = fm.sample(net, c, steps=steps, solver="euler", noise=eps)
    torch.testing.assert_close(x, end, rtol=1e-5, atol=1e-5)
    assert float(x[0, 1].std()) == pytest.approx(0.5, rel=0.05)
    posterior = band_flow(sigma_min=0.05).sample(net, c, steps=1, solver="euler", noise=eps)
    torch.testing.assert_close(posterior, c, rtol=0, atol=1e-6)  # float32 rounding of the Euler step


def test_band_keeps_the_conditions_band_and_bounds_the_loss_weight():
    fm = band_flow(sigma_min=0.05, band_threshold=0.1)
    C, T = 4, 64
    g = torch.Generator().manual_seed(1)
    c = torch.randn(1, C, T, generator=g).sign()  # |c| = 1: carried channels at the average level
    c[:, 2:] = 0  # channels 0-1 carried by the condition, 2-3 absent
    z = torch.randn(1, C, T, generator=g)
    # at t = 0 the estimate is the condition itself where the network says nothing
    x0 = fm.predict_x(ConstantNet(C), z, torch.tensor([0.0]), c)
    torch.testing.assert_close(x0, c, rtol=0, atol=0)
    # F's weight in the velocity loss is o² / (1 - t)² = σ² / (t² σ² + (1 - t)²) <= 1 + σ²
    sigma = fm.residual_scale(c, None, torch.zeros(1, 0, T))[0, :, 0]  # [C]
    # an empty channel is expected at the training set's average level, a carried one at σ_min
    assert float(sigma[2]) == pytest.approx(1.0, rel=1e-5) and float(sigma[0]) == pytest.approx(0.05)
    delta = 0.3
    for t in torch.linspace(0.02, 0.94, 24).tolist():  # below 1 - t_eps, where the loss is unclamped
        tt = torch.tensor([t])
        e = fm.predict_x(ConstantNet(C, value=delta), z, tt, c) - fm.predict_x(ConstantNet(C), z, tt, c)
        weight = (e / (1 - t)).square().mean(-1)[0] / delta**2  # [C]
        expected = sigma**2 / (t * t * sigma**2 + (1 - t) ** 2)
        torch.testing.assert_close(weight, expected, rtol=1e-4, atol=0)
        assert bool((weight <= 1 + sigma**2 + 1e-6).all())


def test_band_sampler_with_a_silent_network_draws_from_the_prior():
    """F = 0 makes x̂ the exact posterior mean of a Gaussian prior, so the sampler's ODE carries N(0, I)
    noise to N(c, σ²): std 1 in an empty channel, exp(env) times that with a predicted envelope, and
    the condition itself (up to σ_min) where it carries the band."""
    C, T = 3, 20_000
    g = torch.Generator().manual_seed(2)
    c = torch.zeros(1, C, T)
    c[:, 0] = torch.randn(T, generator=g).sign()  # channel 0 carried at unit level; 1 and 2 absent
    noise = torch.randn(1, C, T, generator=g)
    fm = band_flow(sigma_min=0.05)
    x = fm.sample(ConstantNet(C), c, steps=32, solver="heun", noise=noise)
    assert float(x[0, 1].std()) == pytest.approx(1.0, rel=0.03)
    # near t = 1 - σ_min the carried channel's ODE is stiff: a fine grid resolves it to σ_min
    fine = fm.sample(ConstantNet(C), c, steps=512, solver="heun", noise=noise)
    assert float((fine[0, 0] - c[0, 0]).std()) == pytest.approx(0.05, rel=0.05)
    assert float((x[0, 0] - c[0, 0]).std()) < 0.06
    # a predicted log-envelope of log 0.25 on one band scales what is generated by 0.25
    quiet = fm.sample(ConstantNet(C, bands=1, env=math.log(0.25)), c, steps=32, noise=noise)
    assert float(quiet[0, 2].std()) == pytest.approx(0.25, rel=0.03)
    assert float((quiet[0, 0] - c[0, 0]).std()) < 0.06


def test_band_model_with_envelope_bands_trains():
    cfg = model_config("tiny", in_channels=8, envelope_bands=2)
    model = JaT(cfg)
    x = torch.randn(2, 8, 12)
    out = model(x, torch.rand(2), x)
    assert out.shape == (2, 10, 12)  # C latent channels, then the envelope bands
    fm = band_flow()
    c = x.clone()
    c[:, 4:] = 0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = fm.loss(model, x, c, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_band_parametrisation_trains_and_samples_on_dac_latents(tiny_dac):
    """The "band" choice is codec-agnostic: on DAC latents (every channel carried by the condition) it
    reduces to a residual over the condition, trains, and samples finite latents."""
    from jat.codecs import DACCodec

    codec = DACCodec(tiny_dac)
    g = torch.Generator().manual_seed(3)
    hr = torch.randn(2, 1, 44100 // 2, generator=g) * 0.1
    lr = torch.nn.functional.avg_pool1d(hr, 9, 1, 4)  # a crude low-pass
    x, c = codec.encode(hr), codec.encode(lr)  # [2, 64, T]
    x, c = (x - x.mean()) / x.std(), (c - x.mean()) / x.std()
    cfg = model_config("tiny", in_channels=codec.latent_dim, envelope_bands=4)
    model = JaT(cfg)
    fm = band_flow()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(80):
        loss, _ = fm.loss(model, x, c, generator=torch.Generator().manual_seed(step % 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])  # the same 4 draws, before and after
    out = fm.sample(model, c, steps=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


def test_envelope_loss_is_a_likelihood_of_the_band_power_where_the_condition_is_empty():
    fm = band_flow()
    C, T, E = 8, 30, 2
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, C, T, generator=g)
    x[:, 4:] *= 0.1  # the upper band is 20 dB below the lower one
    c = x.clone()
    c[:, 4:] = 0  # ... and absent from the condition
    power = F.adaptive_avg_pool1d(x.square().transpose(1, 2), E).transpose(1, 2) + 1e-4  # [1, E, T]
    prior = fm.band_prior(c, None)[1]  # [1, 1, T] the level the condition's top octave suggests
    level = 0.5 * torch.log(power) - prior  # the envelope is relative to it
    assert float(fm.envelope_error(level, x, c, None).abs().max()) < 1e-5  # σ² = the band power: zero
    wrong_low = level.clone()
    wrong_low[:, 0] += 3.0  # an error in the band the condition carries does not count
    assert float(fm.envelope_error(wrong_low, x, c, None).abs().max()) < 1e-5
    for d in (0.5, -0.5):  # off by d: d + (exp(-2d) - 1) / 2, and underestimating costs more
        off = level.clone()
        off[:, 1] += d
        expected = torch.full((1, T), d + 0.5 * (math.exp(-2 * d) - 1))
        torch.testing.assert_close(fm.envelope_error(off, x, c, None), expected, rtol=1e-4, atol=1e-5)
    assert -0.5 + 0.5 * (math.exp(1) - 1) > 0.5 + 0.5 * (math.exp(-1) - 1)
    # the flow loss does not train the envelope: its gradient reaches env only through this term
    env = torch.zeros(1, E, T, requires_grad=True)

    class Net(torch.nn.Module):
        def forward(self, x_t, t, c, mask=None):
            return torch.cat([torch.zeros_like(x_t), env.expand(x_t.shape[0], -1, -1)], 1)

    flow_only = FlowMatching(FlowConfig(precondition="band", envelope_loss=0.0))
    loss, _ = flow_only.loss(Net(), x, c, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert env.grad is not None and float(env.grad.abs().sum()) > 0  # without the term: through σ
    env.grad = None
    loss, _ = fm.loss(Net(), x, c, generator=torch.Generator().manual_seed(0))
    loss.backward()
    grad_with = env.grad.clone()
    expected = torch.autograd.grad(fm.envelope_error(env, x, c, None).mean(), env)[0]
    torch.testing.assert_close(grad_with, expected, rtol=1e-5, atol=1e-8)


def test_log_envelope_target_aims_at_the_typical_band_power_not_the_mean():
    """flow.envelope_target=log: (e - log(m) / 2)², zero where σ² is the band power, the same curvature
    as the likelihood there, and, over a spread of band powers for one condition, a minimiser at the
    geometric mean (E[log m] / 2) where the likelihood's is the mean power (log E[m] / 2)."""
    fm, power = band_flow(envelope_target="log"), band_flow()
    C, T, E = 8, 30, 2
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, C, T, generator=g)
    x[:, 4:] *= 0.1
    c = x.clone()
    c[:, 4:] = 0
    m = F.adaptive_avg_pool1d(x.square().transpose(1, 2), E).transpose(1, 2) + 1e-4  # [1, E, T]
    level = 0.5 * torch.log(m) - fm.band_prior(c, None)[1]
    assert float(fm.envelope_error(level, x, c, None).abs().max()) < 1e-6
    for d in (0.5, -0.5):  # off by d: d², symmetric (the likelihood costs an underestimate more)
        off = level.clone()
        off[:, 1] += d
        torch.testing.assert_close(fm.envelope_error(off, x, c, None), torch.full((1, T), d * d),
                                   rtol=1e-4, atol=1e-5)
    # one condition, two equally likely clean bands 20 dB apart in power (amplitude x1 and x0.1): the
    # fitted log σ is the mean of their log levels for "log", the log of their mean power for "power"
    xs = torch.cat([x, x]).clone()
    xs[1, 4:] *= 0.1
    cs = torch.cat([c, c])
    env = torch.zeros(1, E, T, requires_grad=True)
    fitted = {}
    for name, flow in (("log", fm), ("power", power)):
        env.data.zero_()
        opt = torch.optim.Adam([env], lr=0.05)
        for _ in range(600):
            opt.zero_grad()
            flow.envelope_error(env.expand(2, -1, -1), xs, cs, None)[:, :].mean().backward()
            opt.step()
        fitted[name] = (env.detach() + fm.band_prior(cs[:1], None)[1])[0, 1]  # log σ, upper band [T]
    ms = F.adaptive_avg_pool1d(xs.square().transpose(1, 2), E).transpose(1, 2)[:, 1] + 1e-4  # [2, T]
    torch.testing.assert_close(fitted["log"], 0.5 * torch.log(ms).mean(0), atol=2e-3, rtol=0)
    torch.testing.assert_close(fitted["power"], 0.5 * torch.log(ms.mean(0)), atol=2e-3, rtol=0)
    gap_db = float(20 * (fitted["power"] - fitted["log"]).mean() / math.log(10))  # latent amplitude, dB
    assert gap_db > 3.0  # the log target generates this band well below the likelihood's level


def test_band_prior_level_follows_the_conditions_top_octave():
    """An empty band is expected at the level of the octave below the highest carried channel, per
    frame: a condition 9 dB quieter there gives a generated band 9 dB quieter."""
    fm, average = band_flow(band_level="condition"), band_flow()
    C, T = 16, 40
    c = torch.zeros(1, C, T)
    c[:, :8] = torch.randn(1, 8, T, generator=torch.Generator().manual_seed(5)).sign()  # carried 0-7
    c[:, 4:8] *= 0.35  # its top octave (channels 4-7) is 9 dB down (still above 3 band_threshold)
    absent, level = fm.band_prior(c, None)
    assert absent[0, :8, 0].eq(0).all() and absent[0, 8:, 0].eq(1).all()
    torch.testing.assert_close(level, torch.full((1, 1, T), math.log(0.35)), rtol=0, atol=1e-4)
    sigma = fm.residual_scale(c, None, torch.zeros(1, 0, T))
    torch.testing.assert_close(sigma[0, 8:], torch.full((8, T), 0.35), rtol=1e-4, atol=0)
    assert float(average.band_prior(c, None)[1].abs().max()) == 0.0  # the default: the average level
    # a condition that carries nothing (dropout: all zeros) expects the training set's average level
    _, level0 = fm.band_prior(torch.zeros(1, C, T), None)
    assert float(level0.abs().max()) == 0.0


def test_lognormal_envelope_learns_the_spread_and_samples_between_typical_and_mean():
    """flow.envelope_target=lognormal: μ and the log spread s fitted by the Gaussian likelihood of
    log(m) / 2 over two equally likely bands 20 dB apart come out at the mean of their log levels and at
    their variance (Δ/2)², and the band is generated at μ + aim·v (aim 0: the typical level, as "log")."""
    fm = band_flow(envelope_target="lognormal", envelope_aim=0.5)
    C, T, E = 8, 30, 2
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, C, T, generator=g)
    x[:, 4:] *= 0.1
    c = x.clone()
    c[:, 4:] = 0
    xs, cs = torch.cat([x, x]).clone(), torch.cat([c, c])
    xs[1, 4:] *= 0.1
    env = torch.zeros(1, 2 * E, T, requires_grad=True)
    opt = torch.optim.Adam([env], lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        fm.envelope_error(env.expand(2, -1, -1), xs, cs, None).mean().backward()
        opt.step()
    prior = fm.band_prior(cs[:1], None)[1][0, 0]  # [T]
    ms = F.adaptive_avg_pool1d(xs.square().transpose(1, 2), E).transpose(1, 2)[:, 1] + 1e-4  # [2, T]
    y = 0.5 * torch.log(ms)  # [2, T] each band's log σ
    mu = env.detach()[0, 1] + prior
    torch.testing.assert_close(mu, y.mean(0), atol=2e-3, rtol=0)
    v = torch.exp(2 * (env.detach()[0, E + 1] + math.log(0.5)))
    torch.testing.assert_close(v, ((y[0] - y[1]) / 2).square(), rtol=2e-2, atol=0)
    level = fm.envelope_level(env.detach())  # [1, E, T]
    spread = torch.exp(2 * (env.detach()[:, E:] + math.log(0.5)))
    torch.testing.assert_close(level, env.detach()[:, :E] + 0.5 * spread)
    assert fm.envelope_level(torch.zeros(1, 0, T)).shape == (1, 0, T)


def test_lognormal_target_gives_the_head_its_spread_channels():

    band = {"model": {"preset": "tiny", "envelope_bands": 4}, "flow": {"precondition": "band"}}
    cfg = Config.from_dict({**band, "flow": {"precondition": "band", "envelope_target": "lognormal"}})
    assert cfg.model.envelope_spread  # follows from the target, written once
    model = JaT(cfg.model)
    c = torch.randn(2, cfg.model.in_channels, 12)
    assert model(torch.randn_like(c), torch.rand(2), c).shape == (2, cfg.model.in_channels + 8, 12)
    with pytest.raises(ConfigError, match="model.envelope_spread: follows from flow.envelope_target"):
        Config.from_dict({**band, "model": {"preset": "tiny", "envelope_bands": 4, "envelope_spread": True}})
    with pytest.raises(ConfigError, match="flow.envelope_target: lognormal needs an envelope head"):
        Config.from_dict({"model": {"preset": "tiny"}, "flow": {"envelope_target": "lognormal"}})
    with pytest.raises(ConfigError, match=r"flow.envelope_aim: must be in \[0, 1\]"):
        Config.from_dict({**band, "flow": {"precondition": "band", "envelope_target": "lognormal",
                                           "envelope_aim": 1.5}})


def test_smooth_band_level_generates_an_empty_band_smooth_across_channels():
    """flow.band_level smooth: a channel whose training std a tone raised 1.66 x (mdct's 15.6 kHz) gets
    log σ = log(1 / 1.66) and the others 0, so with a silent network the decoded (denormalised) empty
    band has the neighbours' level there instead of a line; without the statistics it is refused, and a
    codec whose channels are not frequency-ordered is refused by the config rules."""
    from jat.codecs import LatentNorm

    C, T = 40, 8000
    std = torch.ones(C)
    std[20] = 1.66
    fm = FlowMatching(FlowConfig(precondition="band", band_level="smooth"), LatentNorm(torch.zeros(C), std))
    level = fm.smooth_level()
    assert float(level[20]) == pytest.approx(-math.log(1.66), rel=1e-6)
    assert float(level.abs()[torch.arange(C) != 20].max()) == 0.0
    g = torch.Generator().manual_seed(4)
    c = torch.zeros(1, C, T)
    x = fm.sample(ConstantNet(C), c, steps=32, solver="heun", noise=torch.randn(1, C, T, generator=g))
    decoded = x[0].std(-1) * std  # [C] what the codec would see
    assert float(decoded[20]) == pytest.approx(1.0, rel=0.05)  # the average ("average" level) gave 1.66
    assert float((decoded - 1).abs().max()) < 0.05
    with pytest.raises(ValueError, match="needs the latent statistics"):
        FlowMatching(FlowConfig(precondition="band", band_level="smooth")).smooth_level()
    with pytest.raises(ConfigError, match="flow.band_level: smooth averages neighbouring channels"):
        Config.from_dict({"flow": {"precondition": "band", "band_level": "smooth"}, "codec": {"name": "dac"}})


def test_sample_aim_sets_the_sampling_level_and_the_loss_keeps_envelope_aim():
    """flow.sample_aim: sampling generates the band at μ + sample_aim·v while the loss keeps envelope_aim
    (a DiT trained under the band's mean power, sampled nearer its typical level); unset, both use
    envelope_aim. With a silent network the sample's std in an empty channel is exp(μ + aim·v)."""
    C, T = 2, 20_000
    c = torch.zeros(1, C, T)
    c[:, 0] = 1.0  # channel 0 carried, 1 empty
    net = ConstantNet(C, bands=2, env=0.0)  # μ = 0 and log spread 0: v = exp(2 SPREAD_OFFSET) = 0.25
    noise = torch.randn(1, C, T, generator=torch.Generator().manual_seed(5))
    v = 0.25
    for sample_aim, want in ((None, math.exp(1.0 * v)), (0.0, 1.0), (0.3, math.exp(0.3 * v))):
        fm = band_flow(envelope_target="lognormal", envelope_aim=1.0, sample_aim=sample_aim)
        x = fm.sample(net, c, steps=32, solver="heun", noise=noise)
        assert float(x[0, 1].std()) == pytest.approx(want * float(noise[0, 1].std()), rel=1e-3)
        z, t = noise, torch.tensor([0.5])
        trained = fm.predict_x(net, z, t, c, training=True)
        same = band_flow(envelope_target="lognormal", envelope_aim=1.0).predict_x(net, z, t, c)
        torch.testing.assert_close(trained, same, rtol=0, atol=0)  # the loss's aim is envelope_aim
