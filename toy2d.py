"""2D toy: DMD's Figure 3 (and ADD's Table 1d in 2D) on a CPU in under a minute.

Papers
  DMD: Yin et al., "One-step Diffusion with Distribution Matching Distillation", arXiv:2311.18828 (Fig. 3).
  ADD: Sauer et al., "Adversarial Diffusion Distillation", arXiv:2311.17042 (Table 1d).

Run
  python toy2d.py                       # figure -> toy2d.png, table on stdout (about 40 s on 2 CPU cores)
  python toy2d.py --json toy2d.json     # the table's numbers as JSON as well

The target ("real") distribution is a mixture of two Gaussians. Its denoiser is exact: under the forward
process x_t = a_t x + s_t eps (DDPM schedule with zero terminal SNR) the mixture stays a mixture of
Gaussians, so E[x | x_t] is closed form. That exact denoiser is the "teacher" mu_real(x_t, t), used exactly
like a pretrained diffusion model. The generator is an MLP mu_theta(x_t, t); its one-step sample is
G(z) = mu_theta(z, T). It starts with all its outputs in a small blob next to one mode, and every panel
trains a copy of that same start:
  DMD row  (a) real score only, (b) real - fake distribution matching, (c) (b) + regression on ODE pairs.
  ADD row  the student also denoises real samples noised at its 4 timesteps; a spectrally normalised
           discriminator conditioned on the real sample (hinge + R1; no c_img where the student saw pure noise),
           score distillation (lambda = 2.5): adversarial, distillation, both.
Panels train in parallel processes (--workers); each rebuilds the shared start from the seed.

Equation map (paper, equation -> function)
  DDPM schedule, zero terminal SNR (Lin et al. 2023, Alg. 1) -> ddpm_schedule, rescale_zero_terminal_snr
  DMD Eq. 3   forward diffusion q_t(x_t | x)                   -> add_noise
  DMD Eq. 4-6 score from a denoiser, s = -(x_t - a mu) / s^2   -> score_from_x0
  DMD Eq. 5-6 fake-score denoising loss                        -> denoising_loss
  DMD Eq. 7   distribution-matching gradient                   -> distribution_matching_grad
  DMD Eq. 8   weight w_t = s^2/a * CS / ||mu_real - x||_1      -> dmd_weight
  DMD Eq. 7   as a loss whose d/dx is that gradient            -> distribution_matching_loss
  DMD Eq. 9   regression loss on (z, y) ODE pairs              -> regression_loss
  ADD Eq. 2   generator adversarial loss                       -> adversarial_generator_loss
  ADD Eq. 3   discriminator hinge loss + gamma * R1            -> hinge_discriminator_loss, r1_penalty
  ADD 3.1     c_img of the real sample, none at pure noise     -> img_condition
  ADD Eq. 4   score distillation loss, weighting c(t) = a_t    -> score_distillation_loss
  PF-ODE      deterministic DDIM sampler (regression pairs)    -> ddim_sample
"""
import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PANELS = ("init", "dmd_real_only", "dmd_no_reg", "dmd_full", "add_adv", "add_distill", "add_full")
TITLES = {
    "init": "initial generator",
    "dmd_real_only": "(a) DMD: real score only",
    "dmd_no_reg": "(b) DMD: no regression",
    "dmd_full": "(c) DMD: full objective",
    "add_adv": "ADD: adversarial only",
    "add_distill": "ADD: distillation only",
    "add_full": "ADD: adversarial + distillation",
}


# Copied from dmd.py: Help
class Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, unless its help text already says it or there is none to say."""

    def _get_help_string(self, action):
        text = action.help or ""
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in text.lower():
            return text
        return super()._get_help_string(action)


# Copied from dmd.py: Parser
class Parser(argparse.ArgumentParser):
    """argparse, with the defaults in --help (Help, subcommands too) and user mistakes reported in one line (exit
    code 2) instead of the usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Help)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seed for every random draw (same seed, same numbers)")
    p.add_argument("--steps", type=int, default=1500, help="training steps per panel")
    p.add_argument("--out", default="toy2d.png", help="where to write the figure (PNG)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--batch-size", type=int, default=256, help="generator batch per step (and regression batch)")
    p.add_argument("--num-pairs", type=int, default=1024, help="size of the (z, y) regression set, DMD Eq. 9")
    p.add_argument("--ode-steps", type=int, default=200, help="DDIM steps of the teacher ODE that builds the pairs")
    p.add_argument("--num-eval", type=int, default=4000, help="samples for the plot and the metrics")
    p.add_argument("--far-weight", type=float, default=0.4, help="mixture weight of the far mode")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="Adam learning rate of the generator (cosine-decayed to 0 over --steps)")
    p.add_argument("--lr-critic", type=float, default=2e-3,
                   help="Adam learning rate of the fake score (DMD) and the discriminator (ADD)")
    p.add_argument("--lambda-reg", type=float, default=0.25, help="DMD regression weight (paper: 0.25)")
    p.add_argument("--lambda-distill", type=float, default=2.5, help="ADD distillation weight (paper: 2.5)")
    p.add_argument("--r1-gamma", type=float, default=0.1,
                   help="R1 weight; ADD uses 1e-5 on ViT features, a 2D input needs a larger one")
    p.add_argument("--img-cond-at-noise", choices=["drop", "keep"], default="drop",
                   help="ADD row: drop = no c_img (zeros) for rows whose student step is pure noise (s = T), where "
                        "the student saw nothing of x_0 (add.py's rule); keep = c_img on every row")
    p.add_argument("--disc-spectral-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="ADD row: spectral normalisation of the discriminator's layers on x (StyleGAN-T's heads)")
    p.add_argument("--hidden", type=int, default=64, help="width of every MLP")
    p.add_argument("--workers", type=int, default=2, help="processes that train panels in parallel")
    p.add_argument("--init-spread", type=float, default=5.0,
                   help="scale of the initial generator's last layer (sets how wide its initial blob is)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "num_pairs", "ode_steps", "num_eval", "hidden", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 < args.far_weight < 1.0:
        p.error("--far-weight must be in (0, 1)")
    for path in (args.out, args.json):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"folder of {path} does not exist")
    return args


# ----------------------------------------------------------------------------------------------------------
# Diffusion schedule and the exact mixture teacher
# ----------------------------------------------------------------------------------------------------------
T = 1000  # discrete diffusion steps, as in DDPM / Stable Diffusion
STUDENT_TIMESTEPS = (250, 500, 750, 1000)  # ADD: N = 4 student timesteps, the last one pure noise
MEANS, STD = ((-5.0, 0.0), (5.0, 0.0)), 0.3  # the target: two modes, the "near" one first
INIT_CENTER = (-5.6, 1.2)                   # where the initial generator puts its samples, next to mode 0


def rescale_zero_terminal_snr(alphas_cumprod):
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1.

    Shift and scale sqrt(alphabar) so that its last value is exactly 0 (zero terminal SNR) and its first value
    is unchanged. alphas_cumprod: (T,) -> (T,).
    """
    a = alphas_cumprod.sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * a0 / (a0 - aT)
    return a ** 2


def ddpm_schedule(beta_start=1e-4, beta_end=0.02):
    """DDPM linear-beta schedule (Ho et al. 2020) with zero terminal SNR. Returns alpha_t, sigma_t of shape
    (T + 1,), index t = 0 being clean data (alpha = 1, sigma = 0) and t = T pure noise (alpha = 0, sigma = 1)."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    abar = rescale_zero_terminal_snr(torch.cumprod(1 - betas, 0))
    abar = torch.cat([torch.ones(1, dtype=torch.float64), abar])
    return abar.sqrt().float(), (1 - abar).sqrt().float()


def add_noise(x, eps, alpha, sigma):
    """DMD Eq. 3: a draw of q_t(x_t | x) = N(alpha_t x, sigma_t^2 I). x, eps: (B, D); alpha, sigma: (B, 1)."""
    return alpha * x + sigma * eps


def score_from_x0(x_t, mu, alpha, sigma):
    """DMD Eq. 4 (real) and Eq. 5-6 (fake): s(x_t, t) = -(x_t - alpha_t mu(x_t, t)) / sigma_t^2. (B, D)."""
    return -(x_t - alpha * mu) / sigma ** 2


class Mixture:
    """Mixture of isotropic 2D Gaussians sum_k w_k N(m_k, s_k^2 I), diffused in closed form.

    Under x_t = alpha x + sigma eps, component k becomes N(alpha m_k, v_k I) with v_k = alpha^2 s_k^2 + sigma^2.
    """

    def __init__(self, means, stds, weights):
        self.means = torch.tensor(means, dtype=torch.float32)       # (K, 2)
        self.stds = torch.tensor(stds, dtype=torch.float32)         # (K,)
        self.weights = torch.tensor(weights, dtype=torch.float32)   # (K,)

    def _parts(self, x_t, alpha, sigma):
        var = alpha ** 2 * self.stds ** 2 + sigma ** 2                        # (B, K)
        diff = x_t[:, None, :] - alpha[:, :, None] * self.means[None]         # (B, K, 2)
        log_comp = (self.weights.log() - diff.pow(2).sum(-1) / (2 * var) - torch.log(2 * math.pi * var))
        return var, diff, log_comp

    def log_prob(self, x_t, alpha, sigma):
        """log p_t(x_t), (B,). alpha, sigma: (B, 1)."""
        return torch.logsumexp(self._parts(x_t, alpha, sigma)[2], dim=1)

    def score(self, x_t, alpha, sigma):
        """Closed-form grad_x log p_t(x_t) = sum_k r_k(x_t) * -(x_t - alpha m_k) / v_k, (B, 2)."""
        var, diff, log_comp = self._parts(x_t, alpha, sigma)
        r = log_comp.softmax(dim=1)                                            # responsibilities (B, K)
        return (r[:, :, None] * -diff / var[:, :, None]).sum(1)

    def x0(self, x_t, alpha, sigma):
        """Exact denoiser E[x | x_t] = sum_k r_k (m_k + alpha s_k^2 / v_k (x_t - alpha m_k)), (B, 2).

        This is the teacher mu_real(x_t, t). It stays finite at alpha = 0 (it returns the mixture mean)."""
        var, diff, log_comp = self._parts(x_t, alpha, sigma)
        r = log_comp.softmax(dim=1)
        post = self.means[None] + (alpha * self.stds ** 2 / var)[:, :, None] * diff
        return (r[:, :, None] * post).sum(1)

    def sample(self, n, generator=None):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[k] + self.stds[k, None] * torch.randn(n, 2, generator=generator)


@torch.no_grad()
def ddim_sample(x0_fn, z, alphas, sigmas, steps):
    """Deterministic DDIM (eta = 0; Song et al. 2021), a first-order solver of the probability-flow ODE.

    x0_fn(x_t, t) -> x0 estimate; z: (B, D) noise at t = T (alpha_T = 0, so x_T = z exactly). Returns x at t = 0.
    """
    ts = torch.linspace(T, 0, steps + 1).round().long()
    x = z
    for t, t_next in zip(ts[:-1], ts[1:]):
        a, s = alphas[t].expand(len(x), 1), sigmas[t].expand(len(x), 1)
        x0 = x0_fn(x, t.expand(len(x)))
        eps = (x - a * x0) / s
        x = alphas[t_next] * x0 + sigmas[t_next] * eps
    return x


# ----------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------
def mlp(d_in, d_out, hidden):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d_out))


def time_features(t):
    """(B,) integer steps -> (B, 8) Fourier features of t / T."""
    f = math.pi * (t.float() / T)[:, None] * torch.arange(1, 5, dtype=torch.float32)
    return torch.cat([f.sin(), f.cos()], dim=1)


class Denoiser(nn.Module):
    """x0-predicting MLP mu(x_t, t): (B, 2), (B,) -> (B, 2). Used as the one-step generator / ADD student: DMD
    queries it only at t = T (x_T = z, as DMD's generator is the teacher queried at the largest noise level),
    ADD at its N = 4 student timesteps."""

    def __init__(self, hidden):
        super().__init__()
        self.net = mlp(2 + 8, 2, hidden)

    def forward(self, x_t, t):
        return self.net(torch.cat([x_t, time_features(t)], dim=1))


def generate(gen, z):
    """One-step sample G(z) = mu_theta(z, T); with zero terminal SNR x_T = alpha_T x + sigma_T eps = z exactly."""
    return gen(z, torch.full((len(z),), T, dtype=torch.long))


class FakeDenoiser(nn.Module):
    """mu_fake(x_t, t) = mu_real(x_t, t) + MLP(x_t, t), the MLP's last layer zeroed: like DMD's fake score it
    starts as an exact copy of the teacher and is then trained online on generator samples."""

    def __init__(self, teacher, hidden):
        super().__init__()
        self.teacher, self.net = teacher, mlp(2 + 8, 2, hidden)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x_t, t):
        return self.teacher(x_t, t) + self.net(torch.cat([x_t, time_features(t)], dim=1))


class Discriminator(nn.Module):
    """ADD's discriminator reduced to 2D: the feature network F is the identity (a 2D point is its own feature),
    one trainable head with projection conditioning (Miyato & Koyama 2018) on c_img, the embedding of the real
    sample x_0 whose noised version the student saw: D(x, c) = w . h(x) + <P c, h(x)> / sqrt(H). spectral_norm:
    the layers on x spectrally normalised, as in StyleGAN-T's heads (its local batch norm and 1D convolutions over
    tokens have no counterpart for single 2D points)."""

    def __init__(self, hidden, spectral_norm=True):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        self.trunk = nn.Sequential(sn(nn.Linear(2, hidden)), nn.SiLU(), sn(nn.Linear(hidden, hidden)), nn.SiLU(),
                                   sn(nn.Linear(hidden, hidden)), nn.SiLU())
        self.out, self.proj = sn(nn.Linear(hidden, 1)), nn.Linear(2, hidden)

    def forward(self, x, c_img):
        h = self.trunk(x)
        return self.out(h) + (self.proj(c_img) * h).sum(1, keepdim=True) / h.shape[1] ** 0.5


# ----------------------------------------------------------------------------------------------------------
# Losses (each one a paper equation)
# ----------------------------------------------------------------------------------------------------------
def dmd_weight(x, mu_real, alpha, sigma):
    """DMD Eq. 8: w_t = sigma_t^2 / alpha_t * C S / ||mu_real(x_t, t) - x||_1, per sample. (B, D) -> (B, 1)."""
    cs = x[0].numel()
    return sigma ** 2 / alpha * cs / (mu_real - x).abs().flatten(1).sum(1, keepdim=True)


def distribution_matching_grad(x, x_t, mu_real, mu_fake, alpha, sigma):
    """DMD Eq. 7 integrand: w_t alpha_t (s_fake(x_t, t) - s_real(x_t, t)), the per-sample gradient of
    D_KL(p_fake || p_real) w.r.t. the generator output x (dG/dtheta is applied by autograd). (B, D).

    It equals alpha_t (mu_fake - mu_real) C S / ||mu_real - x||_1: with alpha = 1 (EDM) this is the usual
    implementation `(mu_fake - mu_real) / mean|mu_real - x|`."""
    s_real = score_from_x0(x_t, mu_real, alpha, sigma)
    s_fake = score_from_x0(x_t, mu_fake, alpha, sigma)
    return dmd_weight(x, mu_real, alpha, sigma) * alpha * (s_fake - s_real)


def distribution_matching_loss(x, grad):
    """DMD Eq. 7 as a loss: 0.5 * mean (x - sg(x - grad))^2, whose gradient w.r.t. x is grad / x.numel()
    (the mean over elements keeps it on the scale of the mean-reduced regression loss). x, grad: (B, D)."""
    return 0.5 * F.mse_loss(x, (x - grad).detach())


def denoising_loss(mu, x):
    """DMD Eq. 5-6: ||mu_fake(x_t, t) - x_0||^2 on detached generator samples x_0 (mean over elements)."""
    return F.mse_loss(mu, x)


def regression_loss(g_z, y):
    """DMD Eq. 9: E_{(z, y)} l(G(z), y), here l = squared L2 (LPIPS needs images). (B, D) -> scalar."""
    return F.mse_loss(g_z, y)


def adversarial_generator_loss(d_fake):
    """ADD Eq. 2: L_adv^G = -E[sum_k D_k(F_k(x_hat))]; here one head on the 2D point itself. (B, 1) -> scalar."""
    return -d_fake.mean()


def hinge_discriminator_loss(d_real, d_fake):
    """ADD Eq. 3 without R1: E[max(0, 1 - D(x_0))] + E[max(0, 1 + D(x_hat))]. (B, 1), (B, 1) -> scalar."""
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()


def r1_penalty(d_real, x_real):
    """R1 (Mescheder et al. 2018) of ADD Eq. 3: E ||grad_x D(x)||^2 on real inputs (the head's input), so that
    the discriminator loss is hinge + gamma * R1. d_real: (B, 1) computed from x_real (B, D) with grad."""
    (g,) = torch.autograd.grad(d_real.sum(), x_real, create_graph=True)
    return g.pow(2).flatten(1).sum(1).mean()


def score_distillation_loss(x_hat, target, c):
    """ADD Eq. 4: E[c(t) d(x_hat, x_psi(sg(x_hat_t), t))] with d = squared L2 and the teacher's denoised
    target already stop-gradient. x_hat, target: (B, D); c: (B, 1), the weighting c(t); ADD's "exponential"
    weighting is c(t) = alpha_t, and c(t) = alpha_t / (2 sigma_t) w(t) makes it SDS (Appendix A). -> scalar."""
    return (c * (x_hat - target.detach()) ** 2).flatten(1).sum(1).mean()


# ----------------------------------------------------------------------------------------------------------
# Training one panel
# ----------------------------------------------------------------------------------------------------------
def sample_t(n, lo=0.02, hi=0.98):
    """t ~ U[0.02 T, 0.98 T] (DMD Sec. 3.2), integer steps (n,)."""
    return torch.randint(int(lo * T), int(hi * T) + 1, (n,))


def train_dmd(gen, teacher, alphas, sigmas, args, use_fake, pairs):
    """DMD Algorithm 1. use_fake=False: Fig. 3(a); pairs=None: no regression (Fig. 3(b))."""
    fake = FakeDenoiser(teacher, args.hidden)
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, fused=True)
    opt_f = torch.optim.Adam(fake.net.parameters(), lr=args.lr_critic, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, args.steps)
    b = args.batch_size
    for _ in range(args.steps):
        # 1. generate: x = G(z), and x_ref = G(z_ref) for a batch of regression pairs
        z = torch.randn(b, 2)
        if pairs is not None:
            idx = torch.randint(0, len(pairs[0]), (b,))
            out = generate(gen, torch.cat([z, pairs[0][idx]]))
            x, x_ref = out[:b], out[b:]
        else:
            x = generate(gen, z)
        # 2. distribution-matching gradient at a random noise level (no gradient into either score)
        with torch.no_grad():
            t = sample_t(b)
            a, s = alphas[t][:, None], sigmas[t][:, None]
            x_t = add_noise(x, torch.randn_like(x), a, s)
            mu_real = teacher(x_t, t)
            # Fig. 3(a) "real score only": s_fake := grad log q_t(x_t | x) = -sigma eps / sigma^2 (mu_fake := x),
            # which has zero mean, so only the real score steers; it cancels the noise term as in SDS.
            mu_fake = fake(x_t, t) if use_fake else x
            grad = distribution_matching_grad(x, x_t, mu_real, mu_fake, a, s)
        loss_g = distribution_matching_loss(x, grad)
        # 3. regression on the paired set (Eq. 9)
        if pairs is not None:
            loss_g = loss_g + args.lambda_reg * regression_loss(x_ref, pairs[1][idx])
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        sched.step()
        # 4. fake score: denoising loss on the detached generator samples
        if use_fake:
            x0 = x.detach()
            t = sample_t(b)
            a, s = alphas[t][:, None], sigmas[t][:, None]
            loss_f = denoising_loss(fake(add_noise(x0, torch.randn_like(x0), a, s), t), x0)
            opt_f.zero_grad(set_to_none=True)
            loss_f.backward()
            opt_f.step()
    return gen


def img_condition(x0, s, rule):
    """c_img of ADD's discriminator for the real x_0 (B, 2) the student saw noised at step s (B,); rule 'drop': zeros
    where s = T, the pure-noise step whose input holds nothing of x_0 (ADD motivates c_img by that signal)."""
    return x0 * (s != T)[:, None] if rule == "drop" else x0


def train_add(gen, teacher, mixture, alphas, sigmas, args, use_adv, use_distill):
    """ADD (Sec. 3.1): the student sees a real sample noised at one of N = 4 student timesteps,
    x_s = alpha_s x_0 + sigma_s eps (the last, s = T, is pure noise), and is trained with
    L = L_adv^G + lambda L_distill (Eq. 1); the discriminator with hinge + R1 (Eq. 3)."""
    disc = Discriminator(args.hidden, args.disc_spectral_norm)
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=(0.0, 0.99), fused=True)
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr_critic, betas=(0.0, 0.99), fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, args.steps)
    student_steps = torch.tensor(STUDENT_TIMESTEPS)
    b = args.batch_size
    for _ in range(args.steps):
        # 1. a real sample, noised at a student timestep, denoised by the student in one step
        x0 = mixture.sample(b)
        s = student_steps[torch.randint(0, len(student_steps), (b,))]
        x_hat = gen(add_noise(x0, torch.randn_like(x0), alphas[s][:, None], sigmas[s][:, None]), s)
        c_img = img_condition(x0, s, args.img_cond_at_noise)
        loss_g = x_hat.new_zeros(())
        if use_adv:  # 2. adversarial loss (Eq. 2)
            loss_g = loss_g + adversarial_generator_loss(disc(x_hat, c_img))
        if use_distill:  # 3. score distillation (Eq. 4): re-noise, one teacher step, stop-gradient
            with torch.no_grad():
                t = torch.randint(1, T, (b,))
                a, sg = alphas[t][:, None], sigmas[t][:, None]
                target = teacher(add_noise(x_hat, torch.randn_like(x_hat), a, sg), t)
            loss_g = loss_g + args.lambda_distill * score_distillation_loss(x_hat, target, c=a)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        sched.step()
        if use_adv:  # 4. discriminator: hinge on real x_0 vs student output, R1 on the real inputs (Eq. 3)
            x_real = x0.clone().requires_grad_(True)
            d_real, d_fake = disc(torch.cat([x_real, x_hat.detach()]), torch.cat([c_img, c_img])).chunk(2)
            loss_d = hinge_discriminator_loss(d_real, d_fake) + args.r1_gamma * r1_penalty(d_real, x_real)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
    return gen


# ----------------------------------------------------------------------------------------------------------
# Metrics, figure
# ----------------------------------------------------------------------------------------------------------
def mode_shares(x, mixture, radius=3.0):
    """Share of samples within `radius` standard deviations of each mode's mean, (K,)."""
    d = (x[:, None, :] - mixture.means[None]).norm(dim=-1) / mixture.stds[None]
    return torch.stack([(d[:, k] < radius).float().mean() for k in range(len(mixture.means))])


def energy_distance(x, y):
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo), >= 0, 0 iff equal laws."""
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


COST = {"init": 0, "dmd_real_only": 4, "dmd_no_reg": 5, "dmd_full": 6, "add_adv": 9, "add_distill": 2, "add_full": 10}


def make_figure(results, mixture, target, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs, ys = torch.linspace(-7.5, 7.5, 301), torch.linspace(-2.5, 2.5, 101)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    one = torch.ones(gx.numel(), 1)
    logp = mixture.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1), one, 0 * one).reshape(gx.shape)
    peak = logp.max().item()
    levels = [peak - k ** 2 / 2 for k in (3, 2, 1)]  # 3, 2, 1 standard deviations of the heavier mode
    layout = [["init", "dmd_real_only", "dmd_no_reg", "dmd_full"], ["target", "add_adv", "add_distill", "add_full"]]
    fig, axes = plt.subplots(2, 4, figsize=(18, 5.2))
    for r, row in enumerate(layout):
        for c, name in enumerate(row):
            ax = axes[r, c]
            ax.contour(gx, gy, logp, levels=levels, colors="tab:blue", linewidths=0.8, linestyles="solid")
            if name == "target":
                pts, title = target, "target: mixture samples"
            else:
                res = results[name]
                pts = res["samples"]
                title = (f"{TITLES[name]}\nfar mode {100 * res['far_mode_share']:.1f}%, "
                         f"energy distance {res['distance']:.3f}")
            ax.scatter(pts[:2000, 0], pts[:2000, 1], s=2, c="tab:red", alpha=0.4)
            ax.set_title(title, fontsize=10)
            ax.set_xlim(-7.5, 7.5)
            ax.set_ylim(-2.5, 2.5)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("DMD Fig. 3 (top) and ADD Table 1d (bottom) on a 2D mixture (near mode left, far mode right). "
                 "Blue: target density (1, 2, 3 std); red: one-step samples", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def setup(args):
    """Everything the panels share, rebuilt identically from the seed in every worker process."""
    torch.manual_seed(args.seed)
    mixture = Mixture(means=MEANS, stds=[STD, STD], weights=[1 - args.far_weight, args.far_weight])
    alphas, sigmas = ddpm_schedule()

    def teacher(x_t, t):
        return mixture.x0(x_t, alphas[t][:, None], sigmas[t][:, None])

    # The shared initial configuration: every output lands in a small blob next to the near mode.
    gen0 = Denoiser(args.hidden)
    with torch.no_grad():
        last = gen0.net[-1]
        last.weight.mul_(args.init_spread)
        last.bias.add_(torch.tensor(INIT_CENTER) - generate(gen0, torch.zeros(1, 2))[0])
    z_eval, target = torch.randn(args.num_eval, 2), mixture.sample(args.num_eval)
    z_ref = torch.randn(args.num_pairs, 2)
    y_ref = ddim_sample(teacher, z_ref, alphas, sigmas, args.ode_steps)   # the teacher's ODE pairs (Eq. 9)
    return dict(mixture=mixture, alphas=alphas, sigmas=sigmas, teacher=teacher, gen0=gen0, z_eval=z_eval,
                target=target, pairs=(z_ref, y_ref))


def train_panel(args, name):
    """Train one panel from the shared start; returns (name, one-step samples G(z_eval) of shape (N, 2))."""
    torch.set_num_threads(1)  # panels are tiny: one thread each, and the same numbers in any process
    e = setup(args)
    gen = e["gen0"]
    torch.manual_seed(args.seed * 1000 + PANELS.index(name))
    dmd = dict(teacher=e["teacher"], alphas=e["alphas"], sigmas=e["sigmas"], args=args)
    add = dict(dmd, mixture=e["mixture"])
    if name == "init":
        pass
    elif name == "dmd_real_only":
        train_dmd(gen, use_fake=False, pairs=None, **dmd)
    elif name == "dmd_no_reg":
        train_dmd(gen, use_fake=True, pairs=None, **dmd)
    elif name == "dmd_full":
        train_dmd(gen, use_fake=True, pairs=e["pairs"], **dmd)
    elif name == "add_adv":
        train_add(gen, use_adv=True, use_distill=False, **add)
    elif name == "add_distill":
        train_add(gen, use_adv=False, use_distill=True, **add)
    elif name == "add_full":
        train_add(gen, use_adv=True, use_distill=True, **add)
    with torch.no_grad():
        return name, generate(gen, e["z_eval"])


def run(args, panels=PANELS):
    """Train the panels (in --workers processes) and measure them. Returns ({name: {far_mode_share,
    near_mode_share, distance, samples}}, shared setup)."""
    from tqdm import tqdm
    e = setup(args)
    order = sorted(panels, key=lambda n: -COST[n])   # longest first balances the workers
    bar = tqdm(total=len(order), desc=f"toy2d: {len(order)} panels x {args.steps} steps", file=sys.stderr)
    samples = {}
    if args.workers == 1:
        for name in order:
            samples.update([train_panel(args, name)])
            bar.update()
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
            for fut in concurrent.futures.as_completed([pool.submit(train_panel, args, n) for n in order]):
                samples.update([fut.result()])
                bar.update()
    bar.close()
    results = {}
    for name in panels:
        x = samples[name]
        shares = mode_shares(x, e["mixture"])
        results[name] = {"far_mode_share": round(shares[1].item(), 4), "near_mode_share": round(shares[0].item(), 4),
                         "distance": round(energy_distance(x, e["target"]), 4), "samples": x}
    return results, e


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    results, e = run(args)
    make_figure(results, e["mixture"], e["target"], args.out)
    print(f"target: far-mode weight {args.far_weight:.2f}; share within 3 std of the far mode: target samples "
          f"{mode_shares(e['target'], e['mixture'])[1].item():.3f}, "
          f"ODE pairs {mode_shares(e['pairs'][1], e['mixture'])[1].item():.3f}")
    print(f"{'panel':<16}{'near mode':>10}{'far mode':>10}{'elsewhere':>11}{'energy dist':>13}")
    for name in PANELS:
        r = results[name]
        print(f"{name:<16}{r['near_mode_share']:>10.3f}{r['far_mode_share']:>10.3f}"
              f"{1 - r['near_mode_share'] - r['far_mode_share']:>11.3f}{r['distance']:>13.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"far_mode_weight": args.far_weight,
                       "panels": {n: {"far_mode_share": results[n]["far_mode_share"],
                                      "distance": results[n]["distance"]} for n in PANELS}}, f, indent=2)
    print(f"figure: {args.out}  ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
