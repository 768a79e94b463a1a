"""The paper-scale commands, measured: step time, images/s, peak GPU memory and MFU of dmd.py and add.py, and
the 1-step latency of the exported students (eval.py latency), on the real architectures with random weights.

  python benchmark/scale.py --dry-run                  # the rows and their commands, nothing run
  python benchmark/scale.py --tiny                     # CPU: every row on scaled-down configs (a smoke run)
  python benchmark/scale.py --max-minutes 9            # GPU: the real sizes -> benchmark/results/scale.csv
  python benchmark/scale.py --rows 'add-sdxl-*'        # a subset (names or shell patterns, comma-separated)

1. Build. Each paper-scale model is built from its public config (REFERENCE.md, "Architecture configs") with
   random weights and save_pretrained into the layout the scripts load with --teacher PATH: the EDM/ADM
   ImageNet-64 UNet2DModel + teacher.json (EDM preconditioning, as dmd.py reads it); Stable Diffusion 1.5 and
   SDXL pipeline folders (UNet, VAE, CLIP text encoder(s), DDPM scheduler, tokenizers written offline over a
   tiny vocabulary with CLIP's special tokens); DINOv2 ViT-S/14 for add.py --disc-backbone; random captioned
   images for add.py --data. Students for the latency rows are exported with dmd.py's export_generator /
   add.py's export_student from the same random UNets.
2. Run. Every row is an unchanged user command (`python dmd.py ...`, `python add.py ...`, `python eval.py
   latency ...`), started through benchmark/probe.py, which times each training update from outside (it wraps
   the scripts' tqdm bar), counts one update's FLOPs and stops the run after warm-up + --steps updates,
   before the checkpoint and export. Its output: WORK/logs/ROW.log.
3. Report. Per row: seconds per update (median of --steps updates after 1 first update, 1 FLOP-counted update
   and --warmup updates), images/s = global batch / that, peak memory, MFU. Latency rows: eval.py latency's own
   median (CUDA events) per 1-step call (UNet + VAE decode), fp16 weights, batch 1 (and 64 for ImageNet-64).

Memory: torch.cuda.max_memory_allocated() over the whole command (the build of DMD's regression pairs
included), in GiB; on a CPU (--tiny) the process's peak RSS instead. MFU = FLOPs of one update / (seconds per
update x the GPU's dense bf16 peak: H100 and H200 989 TFLOP/s, A100 312; --peak-tflops overrides; on a CPU
the measured rate of a float32 1024^3 matmul). FLOPs are counted by torch.utils.flop_counter.FlopCounterMode
over one whole update: every matmul, convolution and attention of every network it runs, forward and
backward (generator, fake score, teacher with CFG, VAE decode, DINOv2, text encoders), so it includes the
recomputation of --gradient-checkpointing (those rows' MFU counts hardware FLOPs, not 3x forward).

Deviations from a user's run, all to fit a few minutes: DMD builds 64 regression pairs with a 2-step Heun ODE
(the paper: 25k pairs, 256 steps; the pairs' cost is outside the update) and uses --reg-loss l2 (LPIPS-VGG's
weights are a download; LPIPS on 2 x 336 images at 224^2 adds about 2 x 336 x 15.5 GFLOP forward); the
micro-batch rows dmd-in64-m16/32/48 take one micro-batch per update (--batch-size = --micro-batch), so their
memory is that of the 336 run at that micro-batch and 336 / m of their updates make one update at 336.

A GPU session (one H200 through the device tool; its machine lacks diffusers, lpips and peft):
  here, once:  ../shared/tools/gpu_wheels.sh peft     (-> .whl/; in a git worktree, where .git is a file, the
               script's exclude line fails: run its `pip download` line by hand)
  run(carry=[".whl"], timeout_s=600, command=
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
     .whl/*.whl && export PYTHONPATH=/tmp/site || exit; python3 benchmark/scale.py --max-minutes 9 --work
     /tmp/scale --csv $OUT/scale.csv --rows 'dmd-*,add-sd15-b4,lat-in64,lat-sd15' 2>&1 | tail -n 30")
  and in a second session the same with --rows 'add-sdxl-*,lat-sdxl' --csv $OUT/scale2.csv; then concatenate
  the two files (one header) into benchmark/results/scale.csv. Each set is estimated at 8-9 minutes with its
  build (the estimates are guesses until a first run); a row whose estimate no longer fits --max-minutes is
  written as 'skipped: time budget' (a row still running at the deadline is stopped: 'timeout'): run those
  again with --rows NAMES. Rows run in the order of ROWS below.
"""
import argparse
import csv
import fnmatch
import gc
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmark", "results")
COLUMNS = ["row", "command", "gpu", "torch", "diffusers", "batch", "micro_batch", "s_per_step", "img_per_s",
           "peak_gib", "mfu", "tflop_per_step", "status"]
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}   # dense bf16 / fp16 tensor-core peaks (SXM)

# The fixed flags of every training row: the probe stops the run long before any of these events.
TAIL = " --output-dir {out} --max-steps 1000 --log-every 1000 --sample-every 1000 --ckpt-every 1000"
DMD = " --reg-loss l2 --num-pairs {pairs} --shard-size {pairs} --ode-steps 2" + TAIL
ADD = " --data {data} --resolution {res} --disc-backbone {dino} --disc-size {disc}" + TAIL
LATENCY = " --fp16 {lat}"


@dataclass
class Row:
    """One measured command. cmd: a template ({b}: batch, {m}: micro-batch, and the paths of `needs`);
    est_s: its estimated seconds on one H200 (start, load, updates), for --max-minutes."""
    name: str
    cmd: str
    batch: int
    micro: int = 0          # 0: the script's default (dmd.py / add.py: the largest divisor of the batch <= 32)
    needs: tuple = ()
    est_s: float = 60.0
    tiny: tuple = (2, 0)    # (batch, micro) on --tiny
    latency: bool = False


ROWS = [
    Row("dmd-in64-b336", "python dmd.py --teacher {in64} --batch-size {b}" + DMD, 336, 0, ("in64",), 75, (4, 0)),
    *[Row(f"dmd-in64-m{m}", "python dmd.py --teacher {in64} --batch-size {b} --micro-batch {m}" + DMD, m, m,
          ("in64",), 30, (2, 2)) for m in (16, 32, 48)],
    Row("dmd-sd15-512", "python dmd.py --teacher {sd15} --prompts {prompts} --resolution {res} --batch-size {b} "
        "--micro-batch {m}" + DMD, 4, 4, ("sd15", "prompts"), 60, (2, 2)),
    *[Row(f"add-sdxl-b{b}" + ("-lora64" if lora else ""), "python add.py --teacher {sdxl} --batch-size {b} "
          "--gradient-checkpointing" + " --lora-rank 64" * lora + ADD, b, 0, ("sdxl", "dino", "data"), 45 + 4 * b)
      for lora in (False, True) for b in (2, 4, 8)],
    Row("add-sd15-b4", "python add.py --teacher {sd15} --batch-size {b}" + ADD, 4, 0, ("sd15", "dino", "data"), 40),
    Row("lat-in64", "python eval.py latency --generator {in64_student} --batch-size {b}" + LATENCY, 64, 64,
        ("in64_student",), 35, (4, 4), True),
    Row("lat-sd15", "python eval.py latency --generator {sd15_student} --batch-size 1 --compile" + LATENCY, 1, 1,
        ("sd15_student",), 120, (1, 1), True),
    Row("lat-sdxl", "python eval.py latency --generator {sdxl_student} --batch-size 1 --compile" + LATENCY, 1, 1,
        ("sdxl_student",), 180, (1, 1), True),
]
BUILD_EST_S = {"in64": 15, "in64_student": 10, "sd15": 30, "sd15_student": 15, "sdxl": 60, "sdxl_student": 30,
               "dino": 5, "data": 2, "prompts": 0}


class Parser(argparse.ArgumentParser):
    """argparse, with user mistakes reported in one line (exit code 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(msg):
    """A user-facing error: one line on stderr, exit code 2."""
    print(f"scale.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--rows", default="all", help="comma-separated row names or shell patterns (e.g. 'add-sdxl-*'), or all")
    a("--tiny", action="store_true", help="scaled-down configs and batches (a CPU smoke run of every command)")
    a("--work", default=None, help="models, run folders and logs (default runs/scale, or runs/scale-tiny)")
    a("--csv", default=None, help="results CSV (default benchmark/results/scale.csv, or scale_tiny_<device>.csv)")
    a("--max-minutes", type=float, default=0.0, help="skip rows whose estimate no longer fits; 0 = no limit")
    a("--steps", type=int, default=None, help="timed updates per training row (median; default 3, tiny 1)")
    a("--warmup", type=int, default=None, help="untimed updates before them, after the first and the FLOP-counted "
                                               "one (default 1, tiny 0)")
    a("--peak-tflops", type=float, default=None, help="the device's peak FLOP/s for MFU (default: by GPU name)")
    a("--in-process", action="store_true", help="run the commands inside this Python (no interpreter start per "
                                                "row; for tests) instead of one subprocess per row")
    a("--dry-run", action="store_true", help="print the rows and their commands, marked 'not measured'")
    a("--plan", action="store_true", help="no GPU needed: plan each row's memory by kind, FLOPs, seconds per update "
      "and largest batch on 80 GB from fake tensors (benchmark/plan.py; traces cached in WORK/plan) -> "
      "benchmark/results/plan.csv (--tiny: the tiny configs, fp32, -> WORK/plan_tiny.csv)")
    a("--plan-check", action="store_true", help="run real commands on this CPU (tiny, and ImageNet-64 DMD at "
      "micro-batch 1 and 2) and set their measured peak memory beside the plan -> benchmark/results/plan_check.csv")
    a("--workers", type=int, default=2, help="--plan: traces at a time (one single-threaded process each)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    args.steps = args.steps if args.steps is not None else (1 if args.tiny else 3)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 1)
    if args.steps < 1 or args.warmup < 0 or args.max_minutes < 0:
        p.error("need --steps >= 1, --warmup >= 0 and --max-minutes >= 0")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error("--peak-tflops must be > 0")
    if args.plan:   # the commands as typed are planned too (plan.default_rows)
        args.selected = select_rows(args.rows, ROWS + plan_module().default_rows())
    else:
        args.selected = select_rows(args.rows)
    args.work = os.path.abspath(args.work or os.path.join(ROOT, "runs", "scale-tiny" if args.tiny else "scale"))
    if args.csv is None:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        args.csv = os.path.join(RESULTS, f"scale_tiny_{dev}.csv" if args.tiny else "scale.csv")
    if not (args.tiny or args.dry_run or args.plan or args.plan_check or torch.cuda.is_available()):
        p.error("the full-size rows need a CUDA GPU (SDXL alone is 2.6B parameters); on a CPU use --tiny")
    return args


def plan_module():
    """benchmark/plan.py, imported when --plan or --plan-check asks for it (as a script or from the package)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import plan
    return plan


def select_rows(spec, rows=ROWS):
    """'all' or comma-separated names / shell patterns -> the matching rows, in the table's order."""
    if spec == "all":
        return list(rows)
    pats = [s.strip() for s in spec.split(",") if s.strip()]
    for pat in pats:
        if not any(fnmatch.fnmatchcase(r.name, pat) for r in rows):
            fail(f"--rows: no row matches {pat!r} (rows: {', '.join(r.name for r in rows)})")
    return [r for r in rows if any(fnmatch.fnmatchcase(r.name, pat) for pat in pats)]


# ----------------------------------------------------------------------------------------------------------
# 1. Build: the public configs (REFERENCE.md), random weights, save_pretrained in the scripts' layouts
# ----------------------------------------------------------------------------------------------------------
def in64_config(tiny):
    """ADM / EDM ImageNet-64 UNet2DModel (296M; the diffusers port of OpenAI's edm_imagenet64_ema)."""
    cfg = dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=3, num_class_embeds=1000,
               block_out_channels=[192, 384, 576, 768], attention_head_dim=64,
               down_block_types=["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
               up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
               resnet_time_scale_shift="scale_shift", upsample_type="resnet", downsample_type="resnet")
    if tiny:
        cfg.update(sample_size=8, layers_per_block=1, num_class_embeds=10, block_out_channels=[16, 32],
                   attention_head_dim=8, norm_num_groups=8, down_block_types=cfg["down_block_types"][:2],
                   up_block_types=cfg["up_block_types"][2:])
    return cfg


def sd_unet_config(xl, tiny):
    """SD 1.5 (860M) or SDXL base (2.57B) UNet2DConditionModel."""
    if xl:
        cfg = dict(addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                   attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                   down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                   up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], in_channels=4,
                   out_channels=4, layers_per_block=2, projection_class_embeddings_input_dim=2816, sample_size=128,
                   transformer_layers_per_block=[1, 2, 10], use_linear_projection=True)
    else:
        cfg = dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                   down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                   up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, layers_per_block=2, sample_size=64,
                   in_channels=4, out_channels=4)
    if tiny:
        cfg.update(block_out_channels=[16, 32], layers_per_block=1, sample_size=8, norm_num_groups=8,
                   attention_head_dim=4, cross_attention_dim=32 if xl else 16,
                   down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"] if xl else
                   ["CrossAttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"] if xl else ["UpBlock2D", "CrossAttnUpBlock2D"])
        if xl:
            cfg.update(addition_embed_type_num_heads=4, addition_time_embed_dim=4, transformer_layers_per_block=[1, 2],
                       projection_class_embeddings_input_dim=16 + 6 * 4)
    return cfg


def text_configs(xl, tiny, vocab):
    """CLIP ViT-L/14 text tower (SD 1.5; SDXL's first encoder) and SDXL's OpenCLIP ViT-bigG/14 text tower, with
    the special tokens of the offline tokenizer (bos 0, eos = pad 1)."""
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=8 if tiny else 77)
    big = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               hidden_act="quick_gelu", projection_dim=768)
    big_g = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
    if tiny:
        big.update(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   projection_dim=16)
        big_g.update(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, projection_dim=16)
    return [{**big, **ids}] + ([{**big_g, **ids}] if xl else [])


def vae_config(xl, tiny):
    """The SD 1.5 / SDXL AutoencoderKL (8x downsampling, 4 latent channels)."""
    cfg = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2, sample_size=512,
               scaling_factor=0.13025 if xl else 0.18215)
    if tiny:
        cfg.update(block_out_channels=[8, 16], down_block_types=cfg["down_block_types"][:2],
                   up_block_types=cfg["up_block_types"][:2], layers_per_block=1, norm_num_groups=8, sample_size=16)
    return cfg


def write_tokenizer(folder, max_length):
    """A CLIP tokenizer over single letters, written offline (vocab.json + merges.txt) with CLIP's special
    tokens <|startoftext|> (0) and <|endoftext|> (1). -> its vocabulary size."""
    from transformers import CLIPTokenizer
    os.makedirs(folder, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                  model_max_length=max_length).save_pretrained(folder)
    return len(vocab)


def build_in64(path, tiny, student=None):
    """The ImageNet-64 teacher folder (dmd.py --teacher PATH): UNet2DModel + teacher.json; optionally a student
    exported by dmd.py's own export_generator (what eval.py latency loads)."""
    from diffusers import UNet2DModel

    import dmd
    unet = UNet2DModel(**in64_config(tiny))
    unet.save_pretrained(path)
    with open(os.path.join(path, "teacher.json"), "w") as f:
        json.dump({"formulation": "edm", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
                   "noise_cond_scale": 1000.0}, f)
    if student:
        tch = dmd.Teacher(unet, "edm", dmd.karras_sigmas(1000).log(), num_classes=unet.config.num_class_embeds,
                          source=path)
        dmd.export_generator(tch, unet, dmd.sample_shape(tch, None), None, student)


def build_sd(path, xl, tiny, student=None, res=512):
    """A Stable Diffusion 1.5 / SDXL pipeline folder (model_index.json, unet, vae, text_encoder[_2],
    tokenizer[_2], scheduler); optionally a student exported by add.py's own export_student."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    import add
    max_len = 8 if tiny else 77
    vocab = write_tokenizer(os.path.join(path, "tokenizer"), max_len)
    encoders = []
    for i, cfg in enumerate(text_configs(xl, tiny, vocab)):
        suffix = "_2" if i else ""
        if i:
            write_tokenizer(os.path.join(path, "tokenizer" + suffix), max_len)
        enc = (CLIPTextModelWithProjection if i else CLIPTextModel)(CLIPTextConfig(**cfg))
        enc.save_pretrained(os.path.join(path, "text_encoder" + suffix))
        encoders.append(enc)
    unet = UNet2DConditionModel(**sd_unet_config(xl, tiny))
    unet.save_pretrained(os.path.join(path, "unet"))
    vae = AutoencoderKL(**vae_config(xl, tiny))
    vae.save_pretrained(os.path.join(path, "vae"))
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.save_pretrained(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"}, f)
    if student:
        tch = add.Teacher(unet, sched.alphas_cumprod.double(), "epsilon", path, vae=vae, encoders=encoders)
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        spec = argparse.Namespace(student_timesteps=[999, 749, 499, 249], resolution=res)
        add.export_student(tch, unet, spec, (4, res // f, res // f), student)


def build_dino(path, tiny):
    """DINOv2 ViT-S/14 (add.py --disc-backbone PATH): hidden 384, 12 layers, 6 heads, patch 14, MLP ratio 4."""
    from transformers import Dinov2Config, Dinov2Model
    cfg = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, mlp_ratio=4,
               image_size=518, layerscale_value=1.0)
    if tiny:
        cfg.update(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, patch_size=4, image_size=16)
    Dinov2Model(Dinov2Config(**cfg)).save_pretrained(path)


def build_data(path, res, n=8):
    """add.py --data: n random RGB images of res x res, each with a caption beside it."""
    import numpy as np
    from PIL import Image
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((res, res, 3)) * 255).astype(np.uint8)).save(os.path.join(path, f"{i}.png"))
        with open(os.path.join(path, f"{i}.txt"), "w") as f:
            f.write(PROMPTS[i % len(PROMPTS)])


PROMPTS = ["a cat on a red sofa", "a lighthouse at dusk", "a bowl of fruit", "two dogs in the snow"]


def model_paths(work):
    """{name: its path under WORK/models} for every model, student and data set the rows use."""
    return {**{k: os.path.join(work, "models", k) for k in BUILD_EST_S},
            "prompts": os.path.join(work, "models", "prompts.txt")}


def prepare(work, needs, tiny, res):
    """Build what the selected rows need (skipping what WORK already holds; a build is marked done by a
    .done file). -> {name: path}. Models are initialised on the GPU when there is one (fast), saved in fp32."""
    paths = model_paths(work)
    builders = {
        "in64": lambda: build_in64(paths["in64"], tiny, paths["in64_student"] if "in64_student" in needs else None),
        "sd15": lambda: build_sd(paths["sd15"], False, tiny, paths["sd15_student"] if "sd15_student" in needs
                                 else None, res),
        "sdxl": lambda: build_sd(paths["sdxl"], True, tiny, paths["sdxl_student"] if "sdxl_student" in needs
                                 else None, res),
        "dino": lambda: build_dino(paths["dino"], tiny),
        "data": lambda: build_data(paths["data"], res),
    }
    wanted = {n.replace("_student", "") for n in needs} - {"prompts"}
    os.makedirs(os.path.join(work, "models"), exist_ok=True)
    with open(paths["prompts"], "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    sys.path.insert(0, ROOT)
    for name in sorted(wanted):
        student = name + "_student"
        done = os.path.join(work, "models", name + ".done")
        if os.path.exists(done) and (student not in needs or os.path.exists(paths[student])):
            continue
        t0 = time.time()
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            builders[name]()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()   # the rows' own processes need the GPU memory the build held
        open(done, "w").close()
        print(f"built {name} in {time.time() - t0:.0f} s -> {paths[name]}", flush=True)
    return paths


# ----------------------------------------------------------------------------------------------------------
# 2. Run: each command through benchmark/probe.py
# ----------------------------------------------------------------------------------------------------------
def batch_of(row, tiny):
    """(global batch, micro-batch) of a row; a default micro-batch is the scripts' rule: the largest divisor of
    the (one-device) batch <= 32."""
    b, m = row.tiny if tiny else (row.batch, row.micro)
    return b, m or max(d for d in range(1, min(32, b) + 1) if b % d == 0)


def command(row, paths, out, tiny, scale):
    """The row's user command, formatted for this run (--tiny leaves out --compile: inductor alone would take
    minutes on a CPU)."""
    b, m = row.tiny if tiny else (row.batch, row.micro)
    cmd = row.cmd.format(b=b, m=m, out=out, **paths, **scale)
    return cmd.replace(" --compile", "") if tiny else cmd


def run_probe(cmd, json_path, log_path, stop_after, timeout, in_process):
    """Run `cmd` (python SCRIPT ARGS) through the probe; -> (its measurements or None, its stdout + stderr).
    A subprocess runs in its own session, so a timeout ends it and every process it started."""
    argv = shlex.split(cmd)[1:]
    if in_process:
        import contextlib
        import io

        from benchmark import probe
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rec = probe.measure(os.path.join(ROOT, argv[0]), argv[1:], stop_after)
        text = buf.getvalue()
    else:
        full = [sys.executable, os.path.join(ROOT, "benchmark", "probe.py"), "--out", json_path, "--stop-after",
                str(stop_after), "--", os.path.join(ROOT, argv[0]), *argv[1:]]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(full, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        text = open(log_path).read()
        rec = json.load(open(json_path)) if os.path.exists(json_path) else None
        if rec is None:
            return None, text + ("\n[timeout]" if proc.returncode == -signal.SIGKILL else "")
    with open(log_path, "w") as log:
        log.write(text)
    with open(json_path, "w") as f:
        json.dump(rec, f, indent=1)
    return rec, text


def status_of(rec, text):
    """'ok', 'oom', 'timeout' or 'error: <the last line of the log>'."""
    if rec is None:
        return "timeout" if text.endswith("[timeout]") else "error: no measurements (see the log)"
    if rec["error"].startswith("oom") or "OutOfMemoryError" in text:
        return "oom"
    if rec["exit"] not in (0, None) or rec["error"]:
        last = rec["error"] or next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), "")
        return "error: " + last.strip()[:150]
    return "ok"


def training_metrics(rec, steps, warmup):
    """Median seconds per update over the timed updates: update k took stamps[k-1] - stamps[k-2] (1-based);
    update 1 (start-up) and update flops_step (counted) are left out, then `warmup` more."""
    stamps = rec["stamps"]
    first = max(2, rec["flops_step"]) + warmup + 1
    times = [stamps[k - 1] - stamps[k - 2] for k in range(first, len(stamps) + 1)]
    return statistics.median(times) if times else None


def latency_results(rec, text):
    """eval.py latency's lines -> [(variant, batch, seconds per call)]: its batch-1 median, and its
    throughput batch when that is not 1."""
    out = []
    for name, ms1, ips, bsz in re.findall(r"^(\w+): ([\d.]+) ms/image at batch 1; ([\d.]+) images/s at batch (\d+)",
                                          text, re.M):
        out.append((name, 1, float(ms1) / 1e3))
        if int(bsz) != 1:
            out.append((name, int(bsz), int(bsz) / float(ips)))
    return out


def cpu_peak_flops():
    """On a CPU, MFU's denominator: the measured FLOP/s of a float32 1024 x 1024 x 1024 matmul."""
    a = torch.randn(1024, 1024)
    a @ a
    t0 = time.perf_counter()
    for _ in range(3):
        a @ a
    return 3 * 2 * 1024 ** 3 / (time.perf_counter() - t0)


def peak_flops(override):
    if override:
        return override * 1e12
    if not torch.cuda.is_available():
        return cpu_peak_flops()
    name = torch.cuda.get_device_name()
    for key, tf in PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    fail(f"no peak FLOP/s known for {name}: pass --peak-tflops")


def measure_row(row, args, paths, scale, deadline, peak):
    """Run one row -> its CSV records (one, or one per latency variant / batch)."""
    import diffusers
    out = os.path.join(args.work, "runs", row.name)
    cmd = command(row, paths, out, args.tiny, scale)
    b, m = batch_of(row, args.tiny)
    base = {"row": row.name, "command": cmd.replace(args.work, "WORK"), "gpu": gpu_name(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "batch": b, "micro_batch": m}
    os.makedirs(os.path.join(args.work, "logs"), exist_ok=True)
    stop = 0 if row.latency else 2 + args.warmup + args.steps
    timeout = None if deadline is None else max(30.0, deadline - time.time())
    print(f"[{row.name}] {cmd}", flush=True)
    rec, text = run_probe(cmd, os.path.join(args.work, "logs", row.name + ".json"),
                          os.path.join(args.work, "logs", row.name + ".log"), stop, timeout, args.in_process)
    status = status_of(rec, text)
    if status == "ok" and row.latency:
        found = latency_results(rec, text)
        if not found:
            return [{**base, "status": "error: no latency lines in the output"}]
        return [metrics({**base, "row": f"{row.name}-{v}-b{n}", "batch": n, "micro_batch": n}, s, n,
                        rec["peak_bytes"], rec["flops_per_call"].get(str(n)), peak) for v, n, s in found]
    if status == "ok":
        s = training_metrics(rec, args.steps, args.warmup)
        if s is None:
            return [{**base, "status": f"error: {len(rec['stamps'])} updates recorded, too few to time"}]
        return [metrics(base, s, b, rec["peak_bytes"], rec["flops_per_update"], peak)]
    return [{**base, "status": status}]


def metrics(base, s, batch, peak_bytes, flops, peak):
    """A finished CSV record from seconds per step, batch, peak bytes and FLOPs per step."""
    return {**base, "s_per_step": f"{s:.4g}", "img_per_s": f"{batch / s:.4g}",
            "peak_gib": f"{peak_bytes / 2 ** 30:.3g}",
            "mfu": "" if not flops else f"{flops / s / peak:.3g}",
            "tflop_per_step": "" if not flops else f"{flops / 1e12:.4g}", "status": "ok"}


def gpu_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------------------
# 3. Report
# ----------------------------------------------------------------------------------------------------------
def markdown(records):
    """The results as a markdown table."""
    head = ("| row | batch | micro | s/step | img/s | peak GiB | MFU | status |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    lines = [f"| {r['row']} | {r['batch']} | {r['micro_batch']} | {r.get('s_per_step', '')} | {r.get('img_per_s', '')} "
             f"| {r.get('peak_gib', '')} | {r.get('mfu', '')} | {r['status']} |" for r in records]
    return "\n".join([head, *lines])


def write_csv(records, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in COLUMNS} for r in records)


def run_plan(args, t_start):
    """--plan: the rows planned from fake tensors (plan.plan) to a CSV and a table; --plan-check: real commands on
    this CPU beside their plan (plan.check)."""
    plan = plan_module()
    if args.plan_check:
        records = plan.check(work=os.path.join(args.work, "plan-check"), workers=args.workers)
        path, columns = os.path.join(RESULTS, "plan_check.csv"), plan.CHECK_COLUMNS
    else:
        records = plan.plan(args.selected, args.tiny, "fp32" if args.tiny else "bf16",
                            os.path.join(args.work, "plan"), args.workers)
        path = os.path.join(args.work, "plan_tiny.csv") if args.tiny else os.path.join(RESULTS, "plan.csv")
        columns = plan.COLUMNS
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(records)
    print("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    print("\n".join("| " + " | ".join(str(r.get(k, "")) for k in columns) + " |" for r in records))
    print(f"{len(records)} rows -> {path} ({(time.time() - t_start) / 60:.1f} min)")
    return records


def main(argv=None):
    args = parse_args(argv)
    scale = dict(res=16, disc=16, pairs=4, lat="--warmup 1 --repeats 2") if args.tiny else \
        dict(res=512, disc=224, pairs=64, lat="--warmup 3 --repeats 10")
    t_start = time.time()
    if args.plan or args.plan_check:
        return run_plan(args, t_start)
    deadline = t_start + 60 * args.max_minutes if args.max_minutes else None
    needs = sorted({n for r in args.selected for n in r.needs})
    if args.dry_run:
        paths = model_paths("WORK")
        records = [{"row": r.name, "command": command(r, paths, os.path.join("WORK", "runs", r.name), args.tiny,
                                                      scale), "batch": batch_of(r, args.tiny)[0],
                    "micro_batch": batch_of(r, args.tiny)[1], "status": "not measured"} for r in args.selected]
        print("\n".join(f"{r['row']}: {r['command']}" for r in records))
        print(markdown(records))
        return records
    peak = peak_flops(args.peak_tflops)
    paths = prepare(args.work, needs, args.tiny, scale["res"])
    records = []
    for row in args.selected:
        if deadline and time.time() + (0 if args.tiny else row.est_s) > deadline:
            b, m = batch_of(row, args.tiny)
            cmd = command(row, paths, os.path.join(args.work, "runs", row.name), args.tiny, scale)
            records.append({"row": row.name, "command": cmd.replace(args.work, "WORK"), "gpu": gpu_name(),
                            "batch": b, "micro_batch": m, "status": "skipped: time budget"})
            continue
        records += measure_row(row, args, paths, scale, deadline, peak)
        write_csv(records, args.csv)
    write_csv(records, args.csv)
    print(markdown(records))
    print(f"{len(records)} rows -> {args.csv} ({(time.time() - t_start) / 60:.1f} min)")
    return records


if __name__ == "__main__":
    main()
