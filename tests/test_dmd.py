"""dmd.py: the equations against independent computations, smoke runs on tiny teachers, exact resume."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import dmd

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- analytic teachers: data N(m, s^2 I) exactly
class GaussianNet(torch.nn.Module):
    """Stands in for a UNet: returns exactly what a perfect network would for data N(m, s^2 I), in the
    teacher's parametrisation (EDM: F with D = c_skip x + c_out F; VP: eps or v)."""

    def __init__(self, m, s):
        super().__init__()
        self.m, self.s, self.tch = m, s, None

    def denoise(self, x_t, alpha, sigma):   # E[x | x_t] for Gaussian data
        return self.m + alpha * self.s ** 2 / (alpha ** 2 * self.s ** 2 + sigma ** 2) * (x_t - alpha * self.m)

    def forward(self, x_in, t, **kw):
        tch = self.tch
        if tch.formulation == "edm":
            sigma = (t.double() / tch.noise_cond_scale / 0.25).exp().view(-1, 1, 1, 1)
            c_skip, c_out, c_in, _ = dmd.edm_precond(sigma, tch.sigma_data)
            x = x_in.double() / c_in
            return SimpleNamespace(sample=((self.denoise(x, 1.0, sigma) - c_skip * x) / c_out).float())
        alpha, sigma = (v.double().view(-1, 1, 1, 1) for v in tch.alpha_sigma(t))
        x0 = self.denoise(x_in.double(), alpha, sigma)
        eps = (x_in.double() - alpha * x0) / sigma
        out = eps if tch.prediction_type == "epsilon" else alpha * eps - sigma * x0
        return SimpleNamespace(sample=out.float())


def gaussian_teacher(formulation, m=0.7, s=0.3, prediction_type="epsilon"):
    net = GaussianNet(m, s)
    if formulation == "edm":
        tch = dmd.Teacher(net, "edm", dmd.karras_sigmas(1000).log())
    else:
        abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
        tch = dmd.Teacher(net, "vp", ((1 - abar) / abar).sqrt().log(), prediction_type=prediction_type)
    net.tch = tch
    return tch


def test_edm_preconditioning_matches_karras_table_1():
    # hand-computed at sigma = sigma_data = 0.5, and at sigma = 2
    c_skip, c_out, c_in, c_noise = dmd.edm_precond(torch.tensor([0.5, 2.0], dtype=torch.float64), 0.5)
    torch.testing.assert_close(c_skip, torch.tensor([0.5, 0.25 / 4.25], dtype=torch.float64))
    torch.testing.assert_close(c_out, torch.tensor([0.25 / math.sqrt(0.5), 1.0 / math.sqrt(4.25)], dtype=torch.float64))
    torch.testing.assert_close(c_in, torch.tensor([1 / math.sqrt(0.5), 1 / math.sqrt(4.25)], dtype=torch.float64))
    torch.testing.assert_close(c_noise, torch.tensor([math.log(0.5) / 4, math.log(2.0) / 4], dtype=torch.float64))
    # Karras et al. Eq. 7-8: the effective training target F = (y - c_skip x) / c_out has unit variance
    for sig in (0.01, 0.5, 10.0):
        cs, co, ci, _ = dmd.edm_precond(torch.tensor(sig, dtype=torch.float64), 0.5)
        var_target = ((1 - cs) ** 2 * 0.25 + cs ** 2 * sig ** 2) / co ** 2
        assert abs(var_target.item() - 1) < 1e-12 and abs((ci ** 2 * (0.25 + sig ** 2)).item() - 1) < 1e-12
    # Karras sigma grid: ends at sigma_min and sigma_max
    sig = dmd.karras_sigmas(1000)
    assert abs(sig[0].item() - 0.002) < 1e-12 and abs(sig[-1].item() - 80) < 1e-9 and (sig[1:] > sig[:-1]).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_vp_teacher_conversion_inverts_the_forward_process(prediction_type):
    """A network that predicts the true eps (or v) of x_t = alpha x + sigma eps gives back x exactly."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    x, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 250, 700, 999])

    class Oracle(torch.nn.Module):
        def forward(self, x_t, t, **kw):
            a, s = (v.view(-1, 1, 1, 1) for v in tch.alpha_sigma(t))
            return SimpleNamespace(sample=eps if prediction_type == "epsilon" else a * eps - s * x)

    tch = dmd.Teacher(Oracle(), "vp", ((1 - abar) / abar).sqrt().log(), prediction_type=prediction_type)
    a, s = (v.view(-1, 1, 1, 1) for v in tch.alpha_sigma(t))
    torch.testing.assert_close(a.flatten() ** 2, abar[t].float())
    x_t = dmd.add_noise(x, eps, a, s)
    tol = 2e-3 if prediction_type == "epsilon" else 1e-5   # eps -> x0 divides by alpha_999 = 0.0064
    torch.testing.assert_close(tch.mu(tch.unet, x_t, t, None), x, rtol=0, atol=tol)


@pytest.mark.parametrize("formulation", ["edm", "vp"])
def test_heun_ode_sampler_lands_on_the_closed_form_endpoint(formulation):
    """For data N(m, s^2 I) the ODE in x~ = x / alpha, r = sigma / alpha keeps (x~ - m) / sqrt(s^2 + r^2)
    constant, so from x~ = r_max z it ends exactly at m + s (r_max z - m) / sqrt(s^2 + r_max^2)."""
    tch = gaussian_teacher(formulation)
    z = torch.randn(8, 1, 4, 4)
    r_max = tch.log_r[-1].exp().item()
    want = 0.7 + 0.3 * (r_max * z - 0.7) / math.sqrt(0.09 + r_max ** 2)
    err = {n: (tch.heun_sample(z, None, n) - want).abs().max().item() for n in (40, 80, 160)}
    assert err[160] < 2e-3
    assert err[40] / err[80] > 3 and err[80] / err[160] > 3   # Heun is second order (Euler would give 2)
    # and the teacher's own denoiser is exact at a few levels
    t = torch.tensor([10, 500, 990] * 2 + [0, 999])
    x_t = torch.randn(8, 1, 4, 4)
    a, s = (v.view(-1, 1, 1, 1) for v in tch.alpha_sigma(t))
    torch.testing.assert_close(tch.mu(tch.unet, x_t, t, None), tch.unet.denoise(x_t, a, s).float(),
                               rtol=1e-4, atol=1e-4)


def test_one_step_heun_is_the_denoiser_at_r_max_also_on_a_floored_zero_snr_schedule():
    """steps = 1: one Euler step from r_max to 0 returns D(r_max z; r_max). Checked on a zero-terminal-SNR
    schedule whose last alphabar values are floored to 2^-24 (a flat end of the log r table)."""
    assert dmd.karras_sigmas(1, 0.002, 80.0).tolist() == [80.0]
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    abar[-3:] = 2.0 ** -24
    tch = gaussian_teacher("vp")
    tch = dmd.Teacher(tch.unet, "vp", ((1 - abar) / abar).sqrt().log())
    tch.unet.tch = tch
    r_max = tch.log_r[-1].exp().item()
    assert tch.t_of_ratio(r_max) == 997.0 and tch.t_of_ratio(r_max * 1.001) == 997.0
    z = torch.randn(4, 1, 4, 4)
    t = torch.full((4,), 997.0)
    alpha = tch.alpha_sigma(t)[0].view(-1, 1, 1, 1)
    torch.testing.assert_close(tch.heun_sample(z, None, 1), tch.mu(tch.unet, alpha * r_max * z, t, None))


def test_distribution_matching_gradient_between_two_gaussians():
    """Real N(m_r, v_r I), fake N(m_f, v_f I): closed-form diffused scores; Eq. 7 with Eq. 8's weight."""
    torch.manual_seed(0)
    m_r, v_r, m_f, v_f = 0.8, 0.5, -0.4, 1.5
    a, s = 0.6, 0.8
    x = torch.randn(5, 3, 4, 4)
    x_t = a * x + s * torch.randn_like(x)
    score = lambda m, v: -(x_t - a * m) / (a ** 2 * v + s ** 2)                      # noqa: E731
    denoiser = lambda m, v: m + a * v / (a ** 2 * v + s ** 2) * (x_t - a * m)         # noqa: E731
    mu_r, mu_f = denoiser(m_r, v_r), denoiser(m_f, v_f)
    al, sg = torch.full((5, 1, 1, 1), a), torch.full((5, 1, 1, 1), s)
    got = dmd.distribution_matching_grad(x, x_t, mu_r, mu_f, al, sg)
    w = s ** 2 / a * 48 / (mu_r - x).abs().sum((1, 2, 3)).view(-1, 1, 1, 1)          # Eq. 8, C S = 3 * 4 * 4
    torch.testing.assert_close(got, w * a * (score(m_f, v_f) - score(m_r, v_r)), rtol=1e-4, atol=1e-6)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(dmd.distribution_matching_loss(xg, got), xg)
    torch.testing.assert_close(g, got / x.numel())
    # Table 2 alternatives: w_t = sigma / alpha and sigma^3 / alpha
    torch.testing.assert_close(dmd.dmd_weight(x, mu_r, al, sg, "sigma_over_alpha"), sg / al)
    torch.testing.assert_close(dmd.dmd_weight(x, mu_r, al, sg, "sigma3_over_alpha"), sg ** 3 / al)


@pytest.mark.parametrize("target", ["edm", "epsilon", "v_prediction", "sample"])
def test_denoising_weight_turns_the_x0_error_into_the_teachers_own_mse(target):
    """DMD Sec. 3.2: lambda_t ||mu(x_t, t) - x||^2 equals the MSE of the teacher's own parametrisation (EDM's
    F-target, eps, v, x0) for a network that outputs random tensors, converted to mu by Teacher.mu."""
    torch.manual_seed(0)
    x, eps, out = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 17, 500, 990])

    class Net(torch.nn.Module):
        def forward(self, x_in, t, **kw):
            return SimpleNamespace(sample=out)

    if target == "edm":
        tch = dmd.Teacher(Net(), "edm", dmd.karras_sigmas(1000).log(), sigma_data=0.5)
    else:
        abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
        tch = dmd.Teacher(Net(), "vp", ((1 - abar) / abar).sqrt().log(), prediction_type=target)
    a, s = (v.view(-1, 1, 1, 1) for v in tch.alpha_sigma(t))
    x_t = dmd.add_noise(x, eps, a, s)
    if target == "edm":   # Karras et al. Eq. 8: F's target (x - c_skip x_t) / c_out
        c_skip, c_out, _, _ = dmd.edm_precond(s)
        own = (out - (x - c_skip * x_t) / c_out) ** 2
    else:
        own = (out - {"epsilon": eps, "v_prediction": a * eps - s * x, "sample": x}[target]) ** 2
    mu = tch.mu(tch.unet, x_t, t, None)
    w = dmd.denoising_weight(a, s, target, 0.5)
    torch.testing.assert_close(dmd.denoising_loss(mu, x, w), own.mean(), rtol=1e-4, atol=0)
    assert dmd.denoising_loss(mu, x, dmd.denoising_weight(a, s, "x0")) == dmd.denoising_loss(mu, x)


class StandInLPIPS(torch.nn.Module):
    """LPIPS's shape without its download: a fixed random conv, ReLU, squared feature distance per image."""

    def __init__(self, *a, **k):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, u, v):
        return (F.relu(self.conv(u)) - F.relu(self.conv(v))).pow(2).mean((1, 2, 3))


def test_lpips_gradient_reaches_pixels_outside_minus_one_one(tiny_teachers, tmp_path, monkeypatch):
    """The regression loss sees the generator's output unclamped (to_images(clamp=False)): the gradient reaches
    pixels outside [-1, 1]; and train() passes LPIPS the unclamped G(z_ref) (no clamp in its autograd graph)."""
    import lpips
    torch.manual_seed(0)
    tch = dmd.Teacher(torch.nn.Identity(), "edm", dmd.karras_sigmas(10).log())
    g = (torch.randn(2, 1, 8, 8) * 2).requires_grad_(True)
    outside = g.detach().abs() > 1
    y = torch.zeros(2, 1, 8, 8)
    fn = StandInLPIPS()
    loss = dmd.regression_loss(dmd.to_images(tch, g, clamp=False), dmd.to_images(tch, y, clamp=False), "lpips", fn)
    (grad,) = torch.autograd.grad(loss, g)
    assert outside.any() and (grad[outside] != 0).all()
    (grad,) = torch.autograd.grad(dmd.regression_loss(dmd.to_images(tch, g), y, "lpips", fn), g)
    assert (grad[outside] == 0).all()   # what clamping did; sample grids still clamp
    seen, reg = [], dmd.regression_loss
    monkeypatch.setattr(lpips, "LPIPS", StandInLPIPS)
    monkeypatch.setattr(dmd, "regression_loss", lambda a, b, kind, f=None: seen.append(a.grad_fn) or reg(a, b, kind, f))
    run_dmd(tmp_path, tiny_teachers["edm_uncond"], "--reg-loss", "lpips", "--no-dm", "--max-steps", "1")
    assert seen and all("Clamp" not in type(f).__name__ for f in seen), seen


def test_regression_losses():
    a, b = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 2.0)
    assert dmd.regression_loss(a, b, "l2").item() == 4.0
    assert dmd.regression_loss(a, b, "huber").item() == 1.5           # |d| - 0.5 for |d| > 1
    seen = {}

    def fake_lpips(u, v):   # LPIPS gets 3-channel 224 x 224 images
        seen["shape"] = tuple(u.shape)
        return (u - v).abs().mean((1, 2, 3))
    assert dmd.regression_loss(a, b, "lpips", fake_lpips).item() == pytest.approx(2.0)
    assert seen["shape"] == (2, 3, 224, 224)


def test_unweighted_lpips_is_the_lpips_package_without_its_heads():
    """unweighted_lpips against the lpips package's own computation with lpips=False (its unit-weight 'baseline'),
    on its AlexNet with random weights (the pretrained backbone is a download)."""
    import lpips
    torch.manual_seed(0)
    import warnings
    with warnings.catch_warnings():   # torchvision's notes on the 'pretrained' argument lpips passes (as dmd.py)
        warnings.simplefilter("ignore", UserWarning)
        ref = lpips.LPIPS(net="alex", lpips=False, pretrained=False, pnet_rand=True, verbose=False).eval()
    x, y = torch.rand(3, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        want = ref(x, y).flatten()
        got = dmd.unweighted_lpips(ref.net(ref.scaling_layer(x)), ref.net(ref.scaling_layer(y)))
    assert got.shape == (3,) and torch.allclose(got, want, rtol=1e-5), (got, want)


def test_effnet_regression_distance(tiny_teachers, tmp_path):
    """--reg-loss effnet: zero between identical images, larger for larger changes, a gradient at pixels outside
    [-1, 1], and a training run with it."""
    torch.manual_seed(0)
    fn = dmd.EfficientNetLPIPS(32)
    a = torch.rand(2, 1, 32, 32) * 2 - 1
    small, large = (dmd.regression_loss(a + s * torch.randn_like(a), a, "effnet", fn) for s in (0.05, 0.5))
    assert dmd.regression_loss(a, a, "effnet", fn).item() == 0 and 0 < small < large
    g = (a * 2).requires_grad_(True)
    outside = g.detach().abs() > 1
    (grad,) = torch.autograd.grad(dmd.regression_loss(g, a, "effnet", fn), g)
    assert outside.any() and (grad[outside] != 0).all()
    run_dmd(tmp_path, tiny_teachers["edm_uncond"], "--reg-loss", "effnet", "--effnet-size", "32", "--no-dm",
            "--max-steps", "1")
    assert (tmp_path / "generator" / "generator.json").exists()


# ---------------------------------------------------------------- end to end on tiny teachers
def run_dmd(out, teacher, *extra):
    argv = ["--teacher", teacher, "--output-dir", str(out), "--reg-loss", "l2", "--max-steps", "2",
            "--batch-size", "4", "--micro-batch", "2", "--num-pairs", "6", "--shard-size", "4", "--ode-steps", "2",
            "--log-every", "1", "--sample-every", "2", "--ckpt-every", "2", "--device", "cpu", *extra]
    return dmd.train(dmd.parse_args(argv))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vp_class", "edm_uncond", "sd"])
def test_smoke_each_teacher_kind_exports_a_loadable_generator(tiny_teachers, tmp_path, kind, monkeypatch):
    """sd: no --prompts, run from another folder: the shipped prompts/train.txt beside dmd.py is found; the
    sample grid shows the first 16 prompts of prompts/eval.txt."""
    monkeypatch.chdir(tmp_path)
    extra = ["--resolution", "16"] if kind == "sd" else []
    seen, encode = [], dmd.Conditions.encode
    monkeypatch.setattr(dmd.Conditions, "encode", lambda self, texts: seen.append(list(texts)) or encode(self, texts))
    history = run_dmd(tmp_path, tiny_teachers[kind], *extra)
    if kind == "sd":
        train, evals = ((ROOT / "prompts" / f).read_text().splitlines() for f in ("train.txt", "eval.txt"))
        assert evals[:16] in seen and all(set(t) <= set(train) for t in seen if t not in ([""], evals[:16]))
    assert [h["step"] for h in history] == [1, 2]
    assert all(math.isfinite(v) for h in history for v in h.values())
    for f in ("log.csv", "loss.png", "samples_0000002.png", "checkpoint.pt", "generator/generator.json"):
        assert (tmp_path / f).exists(), f
    spec = json.loads((tmp_path / "generator" / "generator.json").read_text())
    assert spec["method"] == "dmd" and spec["steps"][0]["t"] == 999
    assert spec["conditioning"] == {"vp_class": "class", "edm_uncond": "none", "sd": "text"}[kind]
    from diffusers import UNet2DConditionModel, UNet2DModel
    cls = UNet2DConditionModel if kind == "sd" else UNet2DModel
    assert spec["model_class"] == cls.__name__
    gen = cls.from_pretrained(tmp_path / "generator")
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for k, v in gen.state_dict().items():
        torch.testing.assert_close(v, ck["gen"][k], rtol=0, atol=0)
    if kind == "edm_uncond":
        assert spec["steps"][0]["sigma"] == pytest.approx(80.0)


@pytest.mark.slow
def test_ablation_flags_run(tiny_teachers, tmp_path):
    h = run_dmd(tmp_path / "nodm", tiny_teachers["vp_class"], "--no-dm", "--export-every", "1")
    assert all(r["loss_dm"] == 0 and r["loss_fake"] == 0 and r["loss_reg"] > 0 for r in h)
    # --export-every 1 over 2 steps: an extra export at step 1, the final one at step 2 (not twice)
    assert sorted(p.name for p in (tmp_path / "nodm").glob("generator*")) == ["generator", "generator_0000001"]
    h = run_dmd(tmp_path / "noreg", tiny_teachers["vp_class"], "--no-reg", "--weighting", "sigma_over_alpha")
    assert all(r["loss_reg"] == 0 and r["loss_fake"] > 0 for r in h)
    assert not (tmp_path / "noreg" / "pairs").exists()


@pytest.mark.slow
def test_resume_continues_exactly(tiny_teachers, tmp_path, capsys):
    """4 steps straight == 2 steps, stop, --resume, 2 more steps: same losses, same weights (both networks)."""
    common = ["--ema", "0.9", "--lr-fake", "1e-3", "--fake-updates", "2"]   # updates 2.. draw fresh samples
    straight = run_dmd(tmp_path / "a", tiny_teachers["vp_class"], "--max-steps", "4", *common)
    run_dmd(tmp_path / "b", tiny_teachers["vp_class"], "--max-steps", "2", *common)
    resumed = run_dmd(tmp_path / "b", tiny_teachers["vp_class"], "--max-steps", "4", "--resume", *common)
    assert straight == resumed and len(resumed) == 4
    ca = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert [o["param_groups"][0]["initial_lr"] for o in cb["opts"]] == [5e-5, 1e-3]   # --lr (preset), --lr-fake
    for part in ("gen", "fake", "ema"):
        for k in ca[part]:
            torch.testing.assert_close(ca[part][k], cb[part][k], rtol=0, atol=0)
    # and a one-step run differs (the comparison can fail)
    other = run_dmd(tmp_path / "c", tiny_teachers["vp_class"], "--max-steps", "4", "--seed", "1", *common)
    assert other != straight
    # a new --lr on --resume applies from the resumed step (a learning-rate decay by hand), and says so
    run_dmd(tmp_path / "b", tiny_teachers["vp_class"], "--max-steps", "5", "--resume", "--lr", "2e-5",
            "--warmup", "1", *common)
    assert "--resume: --lr 5e-05 -> 2e-05 from step 4" in capsys.readouterr().out
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert [(g["lr"], g["initial_lr"]) for o in cb["opts"] for g in o["param_groups"]] == [(2e-5, 2e-5), (1e-3, 1e-3)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "vp_class"])
def test_text_teacher_distribution_matching_batch_includes_g_of_z_ref(tiny_teachers, tmp_path, monkeypatch, kind):
    """DMD Algorithm 1 line 7: for text-to-image, x = concat(G(z), G(z_ref)) feeds the DM loss and the fake-score
    update (micro-batch 2 -> 4); other teachers use G(z) alone (2)."""
    sizes, dm, dn = {"dm": [], "fake": []}, dmd.distribution_matching_loss, dmd.denoising_loss
    monkeypatch.setattr(dmd, "distribution_matching_loss", lambda x, g: sizes["dm"].append(len(x)) or dm(x, g))
    monkeypatch.setattr(dmd, "denoising_loss", lambda mu, x, w=None: sizes["fake"].append(len(x)) or dn(mu, x, w))
    run_dmd(tmp_path, tiny_teachers[kind], "--max-steps", "1", *(["--resolution", "16"] if kind == "sd" else []))
    n = 4 if kind == "sd" else 2
    assert sizes == {"dm": [n, n], "fake": [n, n]}   # batch 4 = 2 micro-batches of 2


@pytest.mark.slow
def test_fake_updates_makes_n_fake_score_steps_per_generator_step(tiny_teachers, tmp_path):
    """--fake-updates 3 (DMD2's two-time-scale rule): 2 generator steps, 6 fake-score optimiser steps."""
    run_dmd(tmp_path, tiny_teachers["vp_class"], "--fake-updates", "3", "--no-reg")
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert [s["last_epoch"] for s in ck["scheds"]] == [2, 6]
    assert [o["state"][0]["step"].item() for o in ck["opts"]] == [2, 6]


@pytest.mark.slow
def test_reg_until_is_regression_then_a_no_reg_resume(tiny_teachers, tmp_path):
    """--reg-until 2: regression at generator steps 0 and 1 (log rows 1, 2), distribution matching alone after,
    the same networks bit for bit as 2 steps of full then --resume --no-reg; a text teacher's DM batch (G(z_ref)
    included while regressing) shrinks back to the fresh samples."""
    h = run_dmd(tmp_path / "a", tiny_teachers["vp_class"], "--reg-until", "2", "--max-steps", "3")
    assert [r["loss_reg"] > 0 for r in h] == [True, True, False]
    run_dmd(tmp_path / "b", tiny_teachers["vp_class"], "--max-steps", "2")
    run_dmd(tmp_path / "b", tiny_teachers["vp_class"], "--max-steps", "3", "--no-reg", "--resume")
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("a", "b"))
    assert a["step"] == b["step"] == 3
    for net in ("gen", "fake"):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net
    h = run_dmd(tmp_path / "sd", tiny_teachers["sd"], "--reg-until", "1", "--resolution", "16")
    assert [r["loss_reg"] > 0 for r in h] == [True, False]
    with pytest.raises(SystemExit) as e:
        dmd.parse_args(["--teacher", "x", "--reg-until", "5", "--no-reg"])
    assert e.value.code == 2


def test_teacher_json_missing_field_is_one_line_exit_2(tiny_teachers, tmp_path, capsys):
    """A teacher.json without noise_cond_scale is an error naming it, not a silent 1000."""
    import shutil
    shutil.copytree(tiny_teachers["edm_uncond"], tmp_path / "t")
    (tmp_path / "t" / "teacher.json").write_text(json.dumps({"formulation": "edm", "sigma_min": 0.002,
                                                             "sigma_max": 80.0, "sigma_data": 0.5}))
    with pytest.raises(SystemExit) as e:
        dmd.main(["--teacher", str(tmp_path / "t"), "--device", "cpu", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "teacher.json lacks noise_cond_scale" in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_time_limit_stops_checkpoints_and_exports_and_max_steps_0_only_builds_pairs(tiny_teachers, tmp_path):
    """--max-minutes ends the run after the step in which the time ran out, like a finished one: log row,
    checkpoint and export at that step; a resume then continues. --max-steps 0 builds the pairs and stops."""
    h = run_dmd(tmp_path / "t", tiny_teachers["vp_class"], "--max-steps", "50", "--max-minutes", "1e-9")
    assert [r["step"] for r in h] == [1]
    assert torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=True)["step"] == 1
    assert (tmp_path / "t" / "generator" / "generator.json").exists()
    assert (tmp_path / "t" / "samples_0000001.png").exists()
    h = run_dmd(tmp_path / "t", tiny_teachers["vp_class"], "--max-steps", "3", "--resume")
    assert [r["step"] for r in h] == [1, 2, 3]
    assert run_dmd(tmp_path / "p", tiny_teachers["vp_class"], "--max-steps", "0") == []
    assert len(os.listdir(tmp_path / "p" / "pairs")) == 2 and not (tmp_path / "p" / "generator").exists()


@pytest.mark.slow
def test_regression_pairs_are_deterministic_and_resume(tiny_teachers, tmp_path, capsys):
    """Shards are a function of (seed, shard): a deleted shard is rebuilt identically; others are kept; shards of
    another --ode-steps are refused."""
    args = dmd.parse_args(["--teacher", tiny_teachers["vp_class"], "--output-dir", str(tmp_path), "--num-pairs", "6",
                           "--shard-size", "4", "--ode-steps", "2", "--micro-batch", "2", "--device", "cpu"])
    tch = dmd.load_teacher(args, torch.device("cpu"))
    conds = dmd.Conditions(tch, args, torch.device("cpu"))
    shape = dmd.sample_shape(tch, args)
    first = dmd.build_pairs(tch, conds, args, shape, torch.device("cpu"))
    assert [len(s["z"]) for s in first] == [4, 2]
    snapshot = [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in first]
    os.remove(tmp_path / "pairs" / "shard_00001.pt")
    mtime0 = os.path.getmtime(tmp_path / "pairs" / "shard_00000.pt")
    again = dmd.build_pairs(tch, conds, args, shape, torch.device("cpu"))
    assert os.path.getmtime(tmp_path / "pairs" / "shard_00000.pt") == mtime0
    for s0, s1 in zip(snapshot, again):
        for k in s0:
            if torch.is_tensor(s0[k]):
                torch.testing.assert_close(s0[k], s1[k], rtol=0, atol=0)
            else:   # ode_steps, the teacher's fingerprint
                assert s0[k] == s1[k] and s0[k] is not None, k
    # y is the teacher's Heun ODE from z with the stored class labels
    z, y, ids = dmd.take_pairs(again, torch.tensor([5]))
    torch.testing.assert_close(tch.heun_sample(z, ids, 2), y, rtol=1e-4, atol=1e-4)  # batch 1 vs 2: conv rounding
    # the same folder asked for pairs of another ODE (and more of them): a one-line error, not the 2-step pairs
    # reused silently, and raised before the missing third shard is built
    args.ode_steps, args.num_pairs = 3, 10
    capsys.readouterr()   # the builds' progress bars
    with pytest.raises(SystemExit) as e:
        dmd.build_pairs(tch, conds, args, shape, torch.device("cpu"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "2-step teacher ODE, not --ode-steps 3" in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "pairs" / "shard_00002.pt")


@pytest.mark.slow
def test_two_processes_with_torchrun(tiny_teachers, tmp_path):
    """Data-parallel path (DDP over gloo on the CPU): pairs split across ranks, one export."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "dmd.py",
                        "--teacher", tiny_teachers["vp_class"], "--reg-loss", "l2", "--max-steps", "2", "--batch-size",
                        "8", "--micro-batch", "2", "--num-pairs", "8", "--shard-size", "2", "--ode-steps", "2",
                        "--output-dir", str(tmp_path), "--device", "cpu", "--log-every", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "pairs")) == [f"shard_0000{k}.pt" for k in range(4)]
    assert (tmp_path / "generator" / "generator.json").exists()
    assert len(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["rng"]) == 2   # both ranks' RNG states


def test_unreachable_hub_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """Offline (HF_HUB_OFFLINE, set in-process), --dataset imagenet64's hub teacher is a one-line error."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as e:
        dmd.main(["--dataset", "imagenet64", "--output-dir", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--teacher PATH" in err
    assert len(err.strip().splitlines()) == 1, err


def test_bare_sd15_command_fails_only_on_the_unreachable_hub(tmp_path, capsys, monkeypatch):
    """`python dmd.py --teacher sd15` needs no other flag: offline (HF_HUB_OFFLINE, set in-process so the test
    skips a subprocess's imports) the only error is the hub's, one line naming --teacher PATH."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as e:
        dmd.main(["--teacher", "sd15", "--max-steps", "1", "--device", "cpu", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "stable-diffusion-v1-5" in err and "--teacher PATH" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert os.path.samefile(dmd.parse_args(["--teacher", "sd15"]).prompts, ROOT / "prompts" / "train.txt")


@pytest.mark.parametrize("case", ["both", "no_model", "batch", "resume", "prompts", "steps"])
def test_bad_input_is_one_line_exit_2(tiny_teachers, tmp_path, capsys, case):
    os.makedirs(tmp_path / "nothing", exist_ok=True)
    argv, msg = {"both": (["--dataset", "cifar10", "--teacher", "x"], "exactly one of"),
                 "no_model": (["--teacher", str(tmp_path / "nothing")], "no diffusers model"),
                 "batch": (["--teacher", tiny_teachers["vp_class"], "--batch-size", "6", "--micro-batch", "4"],
                           "not a multiple"),
                 "resume": (["--teacher", tiny_teachers["vp_class"], "--resume"], "no checkpoint"),
                 "prompts": (["--teacher", tiny_teachers["sd"], "--prompts", str(tmp_path / "none.txt")],
                             "no such file"),
                 "steps": (["--teacher", tiny_teachers["vp_class"], "--max-steps", "-1"],
                           "--max-steps, --max-minutes and --export-every must be")}[case]
    with pytest.raises(SystemExit) as e:
        dmd.main([*argv, "--device", "cpu", "--output-dir", str(tmp_path / "o"), "--reg-loss", "l2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_lpips_that_cannot_load_names_the_fallback_flags(tiny_teachers, tmp_path, capsys, monkeypatch):
    import lpips

    def offline(*a, **k):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")
    monkeypatch.setattr(lpips, "LPIPS", offline)
    with pytest.raises(SystemExit) as e:
        dmd.main(["--teacher", tiny_teachers["vp_class"], "--reg-loss", "lpips", "--device", "cpu",
                  "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--reg-loss l2" in err and len(err.strip().splitlines()) == 1
