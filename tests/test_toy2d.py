"""toy2d.py: each equation against an independent computation, the Figure 3 outcomes, determinism, CLI errors."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import toy2d

ROOT = Path(__file__).resolve().parents[1]


def test_zero_terminal_snr_schedule():
    betas = torch.linspace(1e-4, 0.02, toy2d.T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    rescaled = toy2d.rescale_zero_terminal_snr(abar)
    assert rescaled[-1].item() == 0.0                           # alpha_T = 0 exactly
    assert torch.isclose(rescaled[0], abar[0], rtol=0, atol=1e-15)  # the first step keeps its alphabar
    assert (rescaled[1:] < rescaled[:-1]).all()                  # still decreasing
    alphas, sigmas = toy2d.ddpm_schedule()
    assert alphas[0] == 1 and sigmas[0] == 0 and alphas[-1] == 0 and sigmas[-1] == 1
    torch.testing.assert_close(alphas ** 2 + sigmas ** 2, torch.ones_like(alphas))


def _mixture(dtype=torch.float32):
    m = toy2d.Mixture(means=[[-1.0, 0.5], [2.0, -1.0], [0.0, 2.0]], stds=[0.3, 0.7, 0.5], weights=[0.2, 0.5, 0.3])
    m.means, m.stds, m.weights = m.means.to(dtype), m.stds.to(dtype), m.weights.to(dtype)
    return m


def test_mixture_density_integrates_to_one():
    m = _mixture(torch.float64)
    g = torch.linspace(-6, 7, 521, dtype=torch.float64)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([gx.flatten(), gy.flatten()], 1)
    one = torch.ones(len(pts), 1, dtype=torch.float64)
    for a, s in ((1.0, 0.0), (0.6, 0.8)):
        mass = m.log_prob(pts, a * one, s * one).exp().sum() * (g[1] - g[0]) ** 2
        assert abs(mass.item() - 1) < 1e-6


@pytest.mark.parametrize("a,s", [(0.999, 0.0447), (0.8, 0.6), (0.3, 0.954), (0.02, 0.9998)])
def test_mixture_score_equals_autograd_of_log_density(a, s):
    m = _mixture(torch.float64)
    x = (torch.randn(64, 2, dtype=torch.float64) * 2).requires_grad_(True)
    al, sg = torch.full((64, 1), a, dtype=torch.float64), torch.full((64, 1), s, dtype=torch.float64)
    (auto,) = torch.autograd.grad(m.log_prob(x, al, sg).sum(), x)
    torch.testing.assert_close(m.score(x.detach(), al, sg), auto, rtol=1e-10, atol=1e-10)
    # Tweedie: E[x0 | x_t] = (x_t + sigma^2 score) / alpha, an independent route to the denoiser
    torch.testing.assert_close(m.x0(x.detach(), al, sg), (x.detach() + s ** 2 * auto) / a, rtol=1e-9, atol=1e-9)


def test_mixture_denoiser_at_pure_noise_is_the_mean():
    m = _mixture()
    x = torch.randn(8, 2)
    out = m.x0(x, torch.zeros(8, 1), torch.ones(8, 1))
    torch.testing.assert_close(out, (m.weights[:, None] * m.means).sum(0).expand(8, 2))


def test_ddim_on_a_gaussian_teacher_lands_on_the_closed_form():
    """For data N(mu, s^2 I) the probability-flow ODE from x_T = z ends at mu + s z exactly; DDIM, a first-order
    solver, gets there with an error that shrinks like 1 / steps."""
    mu, sd = torch.tensor([1.5, -0.5], dtype=torch.float64), 0.4
    alphas, sigmas = (v.double() for v in toy2d.ddpm_schedule())

    def x0_fn(x_t, t):
        a, s = alphas[t][:, None], sigmas[t][:, None]
        return mu + a * sd ** 2 / (a ** 2 * sd ** 2 + s ** 2) * (x_t - a * mu)

    z = torch.randn(256, 2, dtype=torch.float64)
    err = {n: (toy2d.ddim_sample(x0_fn, z, alphas, sigmas, steps=n) - (mu + sd * z)).abs().max().item()
           for n in (100, 1000)}
    assert err[1000] < 0.01
    assert 8 < err[100] / err[1000] < 12   # first order: 10x the steps, 10x less error


def test_distribution_matching_gradient_between_two_gaussians():
    """Real N(m_r, v_r I), fake N(m_f, v_f I): known diffused scores -> the DM gradient of Eq. 7 with Eq. 8's
    weight, computed here from the scores (not the denoisers) and by hand."""
    torch.manual_seed(0)
    m_r, v_r, m_f, v_f = torch.tensor([1.0, -2.0]), 0.5, torch.tensor([-0.5, 0.3]), 1.5
    a, s = 0.7, math.sqrt(1 - 0.49)
    x = torch.randn(32, 2)
    x_t = a * x + s * torch.randn(32, 2)

    def score(m, v):   # grad log N(x_t; a m, (a^2 v + s^2) I)
        return -(x_t - a * m) / (a ** 2 * v + s ** 2)

    def denoiser(m, v):  # E[x | x_t] for a Gaussian
        return m + a * v / (a ** 2 * v + s ** 2) * (x_t - a * m)

    mu_r, mu_f = denoiser(m_r, v_r), denoiser(m_f, v_f)
    al, sg = torch.full((32, 1), a), torch.full((32, 1), s)
    got = toy2d.distribution_matching_grad(x, x_t, mu_r, mu_f, al, sg)
    w = s ** 2 / a * 2 / (mu_r - x).abs().sum(1, keepdim=True)           # Eq. 8 with C S = 2
    want = w * a * (score(m_f, v_f) - score(m_r, v_r))                  # Eq. 7
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the surrogate loss has exactly that gradient (divided by the number of elements)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(toy2d.distribution_matching_loss(xg, got), xg)
    torch.testing.assert_close(g, got / x.numel())


def test_hinge_losses_and_r1_by_hand():
    d_real = torch.tensor([[2.0], [0.5], [-1.0]])
    d_fake = torch.tensor([[-2.0], [0.0], [3.0]])
    # real: max(0, 1 - d) = 0, 0.5, 2 -> 2.5/3; fake: max(0, 1 + d) = 0, 1, 4 -> 5/3
    assert toy2d.hinge_discriminator_loss(d_real, d_fake).item() == pytest.approx(7.5 / 3)
    assert toy2d.adversarial_generator_loss(d_fake).item() == pytest.approx(-1 / 3)
    # D(x) = sum_i c_i x_i^2 -> grad = 2 c x; R1 = mean ||2 c x||^2
    c = torch.tensor([1.0, -3.0])
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]], requires_grad=True)
    r1 = toy2d.r1_penalty((c * x ** 2).sum(1, keepdim=True), x)
    assert r1.item() == pytest.approx(((2 ** 2 + 12 ** 2) + (1 ** 2 + 6 ** 2)) / 2)


def test_score_distillation_with_sds_weighting_equals_sds_gradient():
    """ADD Appendix A: with c(t) = alpha_t / (2 sigma_t) w(t), grad of L_distill = w(t) (eps_hat - eps)."""
    torch.manual_seed(1)
    m = _mixture()
    a, s, w_t = 0.6, 0.8, 1.7
    x_hat = torch.randn(16, 2, requires_grad=True)
    eps = torch.randn(16, 2)
    x_t = a * x_hat.detach() + s * eps
    al, sg = torch.full((16, 1), a), torch.full((16, 1), s)
    target = m.x0(x_t, al, sg)
    loss = toy2d.score_distillation_loss(x_hat, target, c=al / (2 * sg) * w_t) * 16   # sum over the batch
    (g,) = torch.autograd.grad(loss, x_hat)
    eps_hat = -s * m.score(x_t, al, sg)              # the teacher's noise prediction, from its score
    torch.testing.assert_close(g, w_t * (eps_hat - eps), rtol=1e-4, atol=1e-4)


def test_energy_distance():
    torch.manual_seed(2)
    x, y = torch.randn(2000, 2), torch.randn(2000, 2)
    assert abs(toy2d.energy_distance(x, y)) < 0.01
    # N(0, I) vs the same shifted by d: E-distance grows with d
    assert toy2d.energy_distance(x, y + 1) > 0.3 > toy2d.energy_distance(x, y + 0.3) > 0.02


@pytest.mark.slow
def test_dmd_row_reproduces_figure_3():
    """The default recipe (fewer metric samples): (a), (b) miss the far mode, (c) gets its weight."""
    args = toy2d.parse_args(["--num-eval", "2000"])
    res, e = toy2d.run(args, panels=("dmd_real_only", "dmd_no_reg", "dmd_full"))
    true_far = toy2d.mode_shares(e["target"], e["mixture"])[1].item()
    assert res["dmd_real_only"]["far_mode_share"] <= 0.05
    assert res["dmd_no_reg"]["far_mode_share"] <= 0.05
    assert abs(res["dmd_full"]["far_mode_share"] - true_far) <= 0.10
    assert res["dmd_full"]["distance"] < min(res["dmd_real_only"]["distance"], res["dmd_no_reg"]["distance"])
    # (b) spreads over the near mode, (a) collapses to a point: (b) is closer to the target
    assert res["dmd_no_reg"]["distance"] < res["dmd_real_only"]["distance"]


@pytest.mark.slow
def test_cli_same_seed_same_json(tmp_path):
    """Same seed -> identical numbers, whether the panels train here, in one process, or in a fresh process
    with two workers."""
    outs, threads = [], torch.get_num_threads()
    for k in range(2):
        js = tmp_path / f"r{k}.json"
        argv = ["--steps", "15", "--num-eval", "300", "--workers", str(k + 1), "--out", str(tmp_path / f"f{k}.png"),
                "--json", str(js)]
        if k == 0:
            try:
                toy2d.main(argv)
            finally:
                torch.set_num_threads(threads)   # toy2d pins one thread; leave the other tests theirs
        else:
            subprocess.run([sys.executable, "toy2d.py", *argv], cwd=ROOT, check=True, capture_output=True)
        outs.append(json.loads(js.read_text()))
    assert outs[0] == outs[1]
    assert set(outs[0]) == {"far_mode_weight", "panels"} and outs[0]["far_mode_weight"] == 0.4
    assert set(outs[0]["panels"]) == set(toy2d.PANELS)
    assert all(set(v) == {"far_mode_share", "distance"} for v in outs[0]["panels"].values())
    assert (tmp_path / "f0.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv,msg", [(["--steps", "0"], "--steps must be >= 1"),
                                      (["--out", "/no/such/folder/x.png"], "does not exist"),
                                      (["--far-weight", "1.5"], "--far-weight"),
                                      (["--steps", "ten"], "invalid int value")])
def test_cli_bad_input_is_one_line_exit_2(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        toy2d.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert msg in err and len(err.strip().splitlines()) == 1, err


def test_add_row_drops_c_img_at_pure_noise_and_normalises_its_head():
    """Issue 15: the ADD row's discriminator gets no c_img where the student's input was pure noise (s = T), and its
    layers on x are spectrally normalised (largest singular value ~ 1)."""
    x0, s = torch.randn(4, 2), torch.tensor([toy2d.T, 250, toy2d.T, 750])
    c = toy2d.img_condition(x0, s, "drop")
    assert (c[[0, 2]] == 0).all() and torch.equal(c[[1, 3]], x0[[1, 3]])
    assert torch.equal(toy2d.img_condition(x0, s, "keep"), x0)
    torch.manual_seed(0)
    disc = toy2d.Discriminator(16)
    for _ in range(30):
        disc(torch.randn(8, 2), torch.randn(8, 2))
    disc.eval()
    for layer in [disc.trunk[0], disc.trunk[2], disc.trunk[4], disc.out]:
        assert torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item() == pytest.approx(1.0, abs=0.01)
    plain = toy2d.Discriminator(16, spectral_norm=False)
    assert not torch.nn.utils.parametrize.is_parametrized(plain.out)
