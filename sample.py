"""Sample from a one-step (or few-step) student exported by dmd.py or add.py, or from a teacher for comparison.

  python sample.py --generator runs/dmd/generator --class 3 --num 16             # class-conditional
  python sample.py --generator runs/add/student --prompt "a cat" --steps 4        # text-to-image, 4 steps
  python sample.py --teacher fmnist --num 64                                     # the shipped teacher, 32 Heun steps

The generator folder holds the network (save_pretrained) and generator.json, which says how to call it: for
step i with (t, alpha, sigma, alpha_read, sigma_read), the input is x = alpha x_hat + sigma eps (the first step:
x = sigma z), and the output is read as x_hat with the formulation's preconditioning at (alpha_read,
sigma_read). Latent students are decoded with the VAE of the teacher that generator.json names. Writes
OUT/grid.png, OUT/images/*.png and OUT/samples.npz (uint8 `images` (N, H, W, C), or (N, H, W) for grey).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch


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
    print(f"{os.path.basename(sys.argv[0]) or 'sample.py'}: error: {msg}", file=sys.stderr)
    sys.exit(2)


class Generator:
    """An exported student: `net` (UNet2DModel / UNet2DConditionModel) + generator.json (`spec`); calling it
    maps noise z (N, *sample_shape) and conditioning to images in [-1, 1] with 1..len(steps) steps."""

    def __init__(self, path, device, dtype=torch.float32):
        import diffusers
        spec_path = os.path.join(path, "generator.json")
        if not os.path.isdir(path):
            fail(f"--generator {path}: no such folder (dmd.py and add.py export one at the end of a run)")
        if not os.path.exists(spec_path):
            fail(f"{path}: no generator.json (expected a folder exported by dmd.py or add.py)")
        with open(spec_path) as f:
            self.spec = json.load(f)
        self.device, self.dtype = torch.device(device), dtype
        self.net = getattr(diffusers, self.spec["model_class"]).from_pretrained(path, torch_dtype=dtype).to(device)
        self.net.eval()
        self.vae, self.tokenizers, self.encoders = None, [], []
        src = self.spec["teacher"]
        if self.spec["latent"] or self.spec["conditioning"] == "text":
            from diffusers import AutoencoderKL
            from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
            try:
                self.vae = AutoencoderKL.from_pretrained(src, subfolder="vae").to(device, dtype).eval()
                self.tokenizers = [CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")]
                self.encoders = [CLIPTextModel.from_pretrained(src, subfolder="text_encoder").to(device).eval()]
                if self.spec.get("sdxl"):
                    self.tokenizers.append(CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2"))
                    self.encoders.append(CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2")
                                         .to(device).eval())
            except Exception as e:  # noqa: BLE001
                fail(f"the VAE / text encoders of the teacher {src} could not load: {str(e).splitlines()[0][:150]}")

    @property
    def max_steps(self):
        return len(self.spec["steps"])

    @torch.no_grad()
    def conditioning(self, labels=None, prompts=None):
        kind = self.spec["conditioning"]
        if kind == "class":
            return {"class_labels": labels.to(self.device)}
        if kind != "text":
            return {}
        hs, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            hs.append(out.hidden_states[-2] if self.spec.get("sdxl") else out.last_hidden_state)
            pooled = out[0] if self.spec.get("sdxl") else out.pooler_output
        kw = {"encoder_hidden_states": torch.cat(hs, -1).to(self.dtype)}
        if self.spec.get("sdxl"):
            r = self.spec["resolution"]
            ids = torch.tensor([r, r, 0, 0, r, r], device=self.device, dtype=self.dtype).expand(len(prompts), 6)
            kw["added_cond_kwargs"] = {"text_embeds": pooled.to(self.dtype), "time_ids": ids}
        return kw

    def denoise(self, x, step, cond):
        """x_hat = mu(x, t) read at (alpha_read, sigma_read) with the formulation's preconditioning."""
        if self.spec["formulation"] == "edm":
            from dmd import edm_precond  # Karras et al. Table 1, the same function dmd.py trains with
            c_skip, c_out, c_in, c_noise = (v.item() for v in edm_precond(torch.tensor(step["sigma_read"]),
                                                                        self.spec["sigma_data"]))
            noise_cond = torch.full((len(x),), self.spec["noise_cond_scale"] * c_noise, device=self.device)
            return c_skip * x + c_out * self.net(c_in * x, noise_cond, **cond).sample
        t = torch.full((len(x),), step["t"], device=self.device)
        out = self.net(x, t, **cond).sample
        a, s = step["alpha_read"], step["sigma_read"]
        kind = self.spec["prediction_type"]
        return (x - s * out) / a if kind == "epsilon" else a * x - s * out if kind == "v_prediction" else out

    def step_subset(self, n):
        steps = self.spec["steps"]
        return [steps[round(i * len(steps) / n)] for i in range(n)]

    @torch.no_grad()
    def __call__(self, z, cond, n_steps=1, generator=None):
        """Images in [-1, 1] (float32), from noise z with n_steps (re-noising with fresh noise in between)."""
        z = z.to(self.device, self.dtype)
        x_hat = None
        for i, step in enumerate(self.step_subset(n_steps)):
            eps = z if i == 0 else torch.randn(z.shape, generator=generator).to(self.device, self.dtype)
            x = step["sigma"] * eps if i == 0 else step["alpha"] * x_hat + step["sigma"] * eps
            x_hat = self.denoise(x, step, cond)
        if self.vae is not None:
            x_hat = self.vae.decode(x_hat / self.vae.config.scaling_factor).sample
        return x_hat.float().clamp(-1, 1)


def to_uint8(images):
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), or (N, H, W) for one channel."""
    u = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return u[..., 0] if u.shape[-1] == 1 else u


def parse_args(argv=None):
    p = Parser(description="Sample from a student exported by dmd.py / add.py, or from a teacher.")
    a = p.add_argument
    a("--generator", help="a folder exported by dmd.py (generator/) or add.py (student/)")
    a("--teacher", help="instead: a teacher folder (as dmd.py --teacher takes), sampled with --steps Heun steps")
    a("--steps", type=int, default=None, help="sampling steps (default: 1 for a student, which has 1 .. its number "
      "of student steps; 32 Heun steps for a teacher)")
    a("--class", dest="label", type=int, default=None, help="class label (default: random classes)")
    a("--prompt", default=None, help="one prompt for every sample")
    a("--prompts", default=None, help="a file of prompts, one per line, used in turn")
    a("--guidance", type=float, default=1.0, help="teacher sampling only: classifier-free guidance (text)")
    a("--num", type=int, default=16, help="how many samples")
    a("--seed", type=int, default=0, help="seed of the noise (and the random classes)")
    a("--batch-size", type=int, default=16, help="samples per forward pass")
    a("--compile", action="store_true", help="torch.compile the network (mode reduce-overhead on CUDA)")
    a("--device", default=None, help="cuda | cpu (default: cuda if available)")
    a("--out", default="samples", help="output folder: grid.png, images/, samples.npz")
    args = p.parse_args(argv)
    if (args.generator is None) == (args.teacher is None):
        p.error("give exactly one of --generator or --teacher")
    if args.generator and not os.path.isdir(args.generator):
        p.error(f"--generator {args.generator}: no such folder (dmd.py and add.py export one at the end of a run)")
    args.steps = args.steps or (32 if args.teacher else 1)
    for k in ("steps", "num", "batch_size"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.prompts and not os.path.isfile(args.prompts):
        p.error(f"--prompts {args.prompts}: no such file")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def conditions(kind, num_classes, args, n, generator):
    """Per-sample class labels (tensor) or prompts (list), or None."""
    if kind == "class":
        if args.label is not None:
            return torch.full((n,), args.label)
        return torch.randint(0, num_classes, (n,), generator=generator)
    if kind == "text":
        if args.prompt:
            return [args.prompt] * n
        if not args.prompts:
            fail("a text-to-image model needs --prompt or --prompts")
        lines = [ln.strip() for ln in open(args.prompts) if ln.strip()]
        return [lines[i % len(lines)] for i in range(n)]
    return None


def make_sampler(args):
    """-> (fn(z, cond_batch) -> images in [-1, 1], sample shape, conditioning kind, number of classes)."""
    if args.generator:
        g = Generator(args.generator, args.device)
        if args.steps > g.max_steps:
            fail(f"--steps {args.steps}: this {g.spec['method']} student has {g.max_steps} step(s)")
        if args.compile:
            g.net = torch.compile(g.net, mode="reduce-overhead" if args.device.startswith("cuda") else None)
        spec = g.spec
        renoise = torch.Generator().manual_seed(args.seed + 1)   # multi-step re-noising: seeded, in call order

        def fn(z, c):
            cond = g.conditioning(labels=c, prompts=c) if c is not None else {}
            return g(z, cond, args.steps, generator=renoise)
        return fn, tuple(spec["sample_shape"]), spec["conditioning"], spec["num_classes"]
    import dmd  # teachers are sampled with dmd.py's teacher wrapper (Heun ODE)
    targs = dmd.parse_args(["--teacher", args.teacher, "--guidance", str(args.guidance), "--device", args.device,
                            *(["--prompts", args.prompts] if args.prompts else [])])
    tch = dmd.load_teacher(targs, torch.device(args.device))
    conds = dmd.Conditions(tch, targs, torch.device(args.device)) if tch.text else None
    shape = dmd.sample_shape(tch, targs)
    kind = "text" if tch.text else "class" if tch.num_classes else "none"

    def fn(z, c):
        if tch.text:
            cond = conds.encode(c)
        else:
            cond = None if c is None else c.to(args.device)
        return dmd.to_images(tch, tch.heun_sample(z.to(args.device), cond, args.steps,
                                                  conds.uncond if conds else None))
    return fn, shape, kind, tch.num_classes


def main(argv=None):
    from torchvision.utils import save_image
    from tqdm import tqdm
    args = parse_args(argv)
    fn, shape, kind, n_cls = make_sampler(args)
    gen = torch.Generator().manual_seed(args.seed)
    z_all = torch.randn((args.num, *shape), generator=gen)
    c_all = conditions(kind, n_cls, args, args.num, gen)
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    out, t0 = [], time.time()
    for i in tqdm(range(0, args.num, args.batch_size), desc="sampling", file=sys.stderr):
        c = None if c_all is None else c_all[i:i + args.batch_size]
        out.append(fn(z_all[i:i + args.batch_size], c).cpu())
    images = torch.cat(out)
    u8 = to_uint8(images)
    for i, im in enumerate(u8):
        from PIL import Image
        Image.fromarray(im).save(os.path.join(args.out, "images", f"{i:05d}.png"))
    save_image((images + 1) / 2, os.path.join(args.out, "grid.png"), nrow=int(math.ceil(len(images) ** 0.5)))
    extra = {"labels": c_all.numpy()} if kind == "class" else {"prompts": np.array(c_all)} if kind == "text" else {}
    np.savez(os.path.join(args.out, "samples.npz"), images=u8, **extra)
    print(f"{args.num} samples in {time.time() - t0:.1f} s -> {args.out}/grid.png, {args.out}/samples.npz")
    return u8


if __name__ == "__main__":
    main()
