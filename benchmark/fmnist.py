"""Offline end-to-end benchmark: a Fashion-MNIST teacher, distilled by DMD and ADD, scored in a Fashion-MNIST
classifier's features (FD, precision, recall, class accuracy) and with the standard Inception FID.

  python benchmark/fmnist.py --scale gpu      # benchmark/results/: one GPU, about 8 minutes of training
  python benchmark/fmnist.py --scale cpu      # benchmark/results/cpu/: 2 CPU cores, about 2.5 hours
  python benchmark/fmnist.py --scale gpu --skip-fid   # train only; a later run (same --out) scores
  python benchmark/fmnist.py --scale cpu --out runs/fmnist-cpu   # re-run: finished stages are skipped
  python benchmark/fmnist.py --scale cpu --seed 1     # a second training seed: its own folder, its own rows

Every stage is a plain command of this repository (printed before it runs, its output in OUT/logs/):
  1. The teacher: the one shipped in benchmark/models/fmnist-SCALE/ (fp16, with the command that trained it in
     its teacher_info.json), else (or with --retrain-teacher) teacher.py trains one (DDPM, zero terminal SNR,
     v-prediction).
  2. dmd.py --max-steps 0 builds the regression pairs (teacher Heun ODE), shared by DMD full and --no-dm.
  3. dmd.py: full, --no-reg, --no-dm (DMD Table 2); add.py: --loss both (full), --loss adv, --loss distill
     (ADD Table 1d). --jobs N runs N of these six at once on the one device (the GPU scale: all six).
  4. eval.py generate, the same command for every row (same seed, same count): the teacher at 1, 2, 4, 8, 16
     and 32 Heun steps, DMD at one step, ADD at one and four steps (the CPU scale scores the two ADD
     ablations at one step only); then eval.py domain on each row's samples against as many test images.
  5. Inception FID (eval.py stats of the test split, then eval.py fid): every row at the GPU scale; at the CPU
     scale (Inception runs at ~5 images/s there) the best teacher row and each method's full one-step row.
Rows land in RESULTS/fmnist.csv (FIELDS below); wall_s is the training command's wall time (teacher rows: the
teacher's; shared devices make the GPU scale's student times concurrent, not exclusive), train_steps the step
it stopped at, seed the training seed. Then the sample figure and the FD-vs-steps plot are drawn. Stages are
skipped when their output exists; an interrupted training stage resumes from its checkpoint.
"""
import argparse
import csv
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmark", "results")
TEACHER_STEPS = [1, 2, 4, 8, 16, 32]

# Per scale: the extra arguments of each script. The CPU scale is what fits 2 cores in about 2.5 hours:
# a 0.7M-parameter UNet, 600 ADD and 1200 DMD steps, FID on 500 samples against 2000 test images, the ADD
# ablations at one step only. The GPU scale is what fits a 15-minute loan of one GPU: a 3.9M-parameter UNet
# trained for 2.5 minutes, then the six students for 3 minutes each, all at once (--max-minutes: the steps
# reached depend on the GPU), FID on 10k samples against the 10k test images. DMD's --lr-fake 1e-3 (10x the
# generator's) is a deviation: see the README.
SCALES = {
    "cpu": dict(
        teacher="--channels 16 32 64 --layers-per-block 1 --attention lowest --batch-size 64 --lr 1e-3 --warmup 100 "
                "--ema 0.998 --max-steps 1200 --sample-every 400 --grid-steps 20 --ckpt-every 200",
        dmd="--reg-loss l2 --num-pairs 2000 --ode-steps 18 --batch-size 32 --lr 1e-4 --lr-fake 1e-3 --warmup 50 "
            "--ema 0.99 --max-steps 1200 --log-every 10 --sample-every 100 --ckpt-every 100",
        add="--resolution 32 --disc-backbone efficientnet-lite0 --disc-size 64 --batch-size 32 --lr 1e-4 "
            "--lr-disc 1e-3 --max-steps 600 --log-every 10 --sample-every 100 --ckpt-every 100",
        num=2000, add_ablation_steps=[1], jobs=1, gen_batch=250, fid_rows="headline"),
    "gpu": dict(
        teacher="--channels 32 64 128 --layers-per-block 2 --attention lowest --batch-size 512 --lr 5e-4 "
                "--warmup 200 --ema 0.999 --max-steps 100000 --max-minutes 2.5 --mixed-precision no --log-every 50 "
                "--sample-every 1000 --ckpt-every 500",
        dmd="--reg-loss l2 --num-pairs 10000 --ode-steps 18 --batch-size 128 --micro-batch 128 --lr 1e-4 "
            "--lr-fake 1e-3 --warmup 50 --ema 0.99 --max-steps 100000 --max-minutes 3 --mixed-precision no "
            "--log-every 20 --sample-every 500 --ckpt-every 250",
        add="--resolution 32 --disc-backbone efficientnet-lite0 --disc-size 64 --batch-size 128 --micro-batch 128 "
            "--lr 1e-4 --lr-disc 1e-3 --max-steps 100000 --max-minutes 3 --mixed-precision no --log-every 20 "
            "--sample-every 500 --ckpt-every 250",
        num=10000, add_ablation_steps=[1, 4], jobs=6, gen_batch=1000, fid_rows="all"),
}
DMD_VARIANTS = {"full": "", "no_reg": "--no-reg", "no_dm": "--no-dm"}
ADD_VARIANTS = {"full": "--loss both", "adv": "--loss adv", "distill": "--loss distill"}
FIELDS = ["method", "variant", "steps", "seed", "teacher", "fd_fmnist", "precision", "recall", "accuracy",
          "coverage", "spread", "fid", "train_steps", "wall_s", "device"]
MODELS = os.path.join(ROOT, "benchmark", "models")   # the shipped teachers: MODELS/fmnist-SCALE


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
    p.add_argument("--scale", choices=list(SCALES), default=None, help="gpu if CUDA is visible, else cpu")
    p.add_argument("--out", default=None, help="working folder (default runs/fmnist-SCALE)")
    p.add_argument("--results", default=None, help="where fmnist.csv and the figures go (default: "
                   "benchmark/results for the GPU scale, benchmark/results/cpu for the CPU scale)")
    p.add_argument("--num", type=int, default=None, help="samples per row, and test images they are compared "
                   "with (default: the scale's: cpu 2000, gpu 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (training and sampling); a seed other "
                   "than 0 works in its own --out folder and adds its own rows")
    p.add_argument("--retrain-teacher", action="store_true", help="train the teacher with teacher.py even where "
                   "benchmark/models/ ships one for this scale")
    p.add_argument("--jobs", type=int, default=None, help="stages run at once after the teacher (the six "
                   "trainings, then the FID rows) sharing the device, each with CPU cores / N threads (default: "
                   "the scale's: cpu 1, gpu 6)")
    p.add_argument("--skip-fid", action="store_true", help="train (and build the DMD pairs), then stop")
    p.add_argument("--teacher-only", action="store_true", help="score the teacher's rows (1-32 Heun steps, and FID "
                   "of the best) and stop: no DMD or ADD")
    p.add_argument("--ship-teacher", default=None, metavar="RUN_DIR", help="copy a teacher.py run's EMA weights "
                   "(fp16 safetensors), its scheduler and how it was trained to benchmark/models/fmnist-SCALE, "
                   "then stop (needs --teacher-command and --teacher-wall-s)")
    p.add_argument("--teacher-command", default=None, help="with --ship-teacher: the teacher.py command(s) that "
                   "trained it, recorded in teacher_info.json")
    p.add_argument("--teacher-wall-s", type=float, default=None, help="with --ship-teacher: its training wall time")
    p.add_argument("--ship-as", default=None, help="with --ship-teacher: the folder under benchmark/models/ "
                   "(default: fmnist-SCALE, the one this script uses; e.g. fmnist-cpu-uncond for benchmark/ablate.py)")
    args = p.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.num is not None and args.num < 4:
        p.error("--num must be >= 4 (k = 3 neighbours for precision and recall)")
    import torch
    args.cuda = torch.cuda.is_available()
    args.scale = args.scale or ("gpu" if args.cuda else "cpu")
    args.out = args.out or os.path.join(ROOT, "runs", f"fmnist-{args.scale}" + (f"-seed{args.seed}" if args.seed
                                                                                  else ""))
    args.device = torch.cuda.get_device_name(0) if args.cuda else "cpu"
    args.results = args.results or (RESULTS if args.scale == "gpu" else os.path.join(RESULTS, "cpu"))
    return args


LOCK = threading.Lock()   # guards rows, state and their files when stages run at once


def run(cmd, log, threads=0):
    """Run one repository command (a string), its output to log; -> (wall seconds, stdout text). threads > 0
    caps its CPU threads (OMP_NUM_THREADS, MKL_NUM_THREADS), unless the caller's environment already sets them."""
    print("$ " + cmd, flush=True)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    env = dict(os.environ)
    if threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(k, str(threads))
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, *shlex.split(cmd)], cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True,
                           env=env)
        f.write(r.stdout)
    if r.returncode:
        print(f"benchmark: failed (exit {r.returncode}); the last lines of {log}:\n" +
              "".join(open(log).readlines()[-15:]), file=sys.stderr)
        sys.exit(2)
    return time.time() - t0, r.stdout


def train_stage(name, script, out_dir, extra, args, state, rows, key, threads=0):
    """Train once (resuming if interrupted); remember wall time and steps in OUT/state.json (the wall time of
    the invocation that finished: a resumed stage counts only its resumed part). A stage that trains drops
    its model's old FID rows, so they are scored again."""
    done = os.path.join(out_dir, "generator" if script == "dmd.py" else "student" if script == "add.py" else "unet")
    with LOCK:
        stale = name in state and state[name].get("args") != extra
    if stale:
        print(f"benchmark: error: {out_dir} was trained with other arguments than this version's; move it (and "
              f"its entry in {args.out}/state.json) away, or use another --out", file=sys.stderr)
        sys.exit(2)
    if name not in state or not os.path.exists(done):
        with LOCK:
            for k in [k for k in rows if k[:2] == key and k[3] == args.seed]:
                del rows[k]
        resume = " --resume" if os.path.exists(os.path.join(out_dir, "checkpoint.pt")) else ""
        wall, out = run(f"{script} --output-dir {out_dir} --seed {args.seed} {extra}{resume}",
                        os.path.join(args.out, "logs", f"{name}.log"), threads)
        steps = int(re.findall(r"step (\d+)\)", out)[-1])   # the step it stopped at (--max-minutes can end it early)
        with LOCK:
            state[name] = {"wall_s": round(wall, 1), "train_steps": steps, "args": extra}   # wall: the last invocation
            json.dump(state, open(os.path.join(args.out, "state.json"), "w"), indent=1)
    return state[name]


def domain_scores(source, steps, num, seed, gen_batch, npz, log, threads=0):
    """eval.py generate (SOURCE: --teacher or --generator FOLDER, fixed seed and count; skipped if NPZ exists),
    then eval.py domain against as many Fashion-MNIST test images -> dict of strings: fd_fmnist, precision,
    recall, accuracy and spread (class-conditional samples) or coverage and class_shares (unconditional), '' where
    absent. The one place both benchmark scripts read eval.py's output."""
    if not os.path.exists(npz):
        run(f"eval.py generate {source} --steps {steps} --num {num} --seed {seed} --batch-size {gen_batch} "
            f"--out {npz}", log, threads)
    _, out = run(f"eval.py domain --samples {npz} --ref fashion-mnist-test --ref-num {num} --crop 28",
                 log.replace(".log", "_domain.log"), threads)
    m = re.search(r"FD_FMNIST ([0-9.]+) PRECISION ([0-9.]+) RECALL ([0-9.]+) (ACCURACY|COVERAGE) ([0-9.]+)", out)
    spread, shares = re.search(r"SPREAD ([0-9.]+)", out), re.search(r"CLASS SHARES ([0-9. ]+?) \(", out)
    cond = m.group(4) == "ACCURACY"
    return dict(fd_fmnist=str(round(float(m.group(1)), 3)), precision=m.group(2), recall=m.group(3),
                accuracy=m.group(5) if cond else "", coverage="" if cond else m.group(5),
                spread=spread.group(1) if spread else "", class_shares=shares.group(1) if shares else "")


def score_row(rows, key, source, steps, args, info):
    """One row: eval.py generate (fixed seed and count), then eval.py domain on those samples against as many
    Fashion-MNIST test images (FD_FMNIST, precision, recall, class accuracy, within-class spread)."""
    if key in rows:
        return
    method, variant = key[0], key[1]
    npz = sample_path(args, method, variant, steps)
    log = os.path.join(args.out, "logs", f"score_{method}_{variant}_{steps}.log")
    d = domain_scores(source, steps, args.num, args.seed, args.gen_batch, npz, log, args.threads)
    with LOCK:
        rows[key] = dict(method=method, variant=variant, steps=steps, seed=key[3], teacher=args.teacher_name,
                         fd_fmnist=float(d["fd_fmnist"]), precision=d["precision"], recall=d["recall"],
                         accuracy=d["accuracy"], coverage=d["coverage"], spread=d["spread"], fid="",
                         train_steps=info["train_steps"], wall_s=info["wall_s"], device=args.device)
        print(f"  {method} {variant} {steps} step(s): FD_FMNIST {float(d['fd_fmnist']):.3f}, precision "
              f"{d['precision']}, recall {d['recall']}, accuracy {d['accuracy']}", flush=True)
        write_csv(rows, args)


def fid_row(rows, key, args):
    """Inception FID of a scored row's samples against the reference statistics of as many test images."""
    if rows[key].get("fid"):
        return
    _, out = run(f"eval.py fid --samples {sample_path(args, *key[:3])} --ref {args.ref} --crop 28",
                 os.path.join(args.out, "logs", f"fid_{key[0]}_{key[1]}_{key[2]}.log"), args.threads)
    fid = float(re.findall(r"FID ([0-9.]+)", out)[-1])
    with LOCK:
        rows[key]["fid"] = round(fid, 2)
        print(f"  {key[0]} {key[1]} {key[2]} step(s): FID {fid:.2f}", flush=True)
        write_csv(rows, args)


def fid_keys(rows, args, cfg):
    """The rows that get an Inception FID: all (GPU scale), or the best teacher row (lowest FD_FMNIST) and each
    method's full one-step row (CPU scale: Inception runs at ~5 images/s on 2 cores)."""
    mine = [k for k in rows if k[3] == args.seed]
    if cfg["fid_rows"] == "all":
        return mine
    teacher = [k for k in mine if k[0] == "teacher"]
    best = [min(teacher, key=lambda k: float(rows[k]["fd_fmnist"]))] if teacher else []
    return best + [k for k in mine if k[0] != "teacher" and k[1] == "full" and k[2] == 1]


def sample_path(args, method, variant, steps):
    return os.path.join(args.out, "samples", f"{method}_{variant}_{steps}.npz")


def write_csv(rows, args):
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "fmnist.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(sorted(rows.values(), key=row_order))


def row_order(r):
    """Table order: teacher, dmd, add; variants as listed; then sampling steps."""
    variants = list(dict.fromkeys([*DMD_VARIANTS, *ADD_VARIANTS]))   # full, no_reg, no_dm, adv, distill
    return (["teacher", "dmd", "add"].index(r["method"]), variants.index(r["variant"]), int(r["steps"]),
            int(r.get("seed") or 0))


def parallel(jobs, tasks):
    """Run the thunks `tasks`, `jobs` at a time; the first failure (a one-line exit) stops the benchmark."""
    if jobs <= 1:
        return [t() for t in tasks]
    with ThreadPoolExecutor(jobs) as ex:
        return [f.result() for f in [ex.submit(t) for t in tasks]]


def read_csv(args):
    path = os.path.join(args.results, "fmnist.csv")
    if not os.path.exists(path):
        return {}
    return {(r["method"], r["variant"], int(r["steps"]), int(r.get("seed") or 0)): r
            for r in csv.DictReader(open(path))}


def class_grid(ims, labels, per_class=6):
    """Samples (N, 32, 32) or (N, 32, 32, 1) grey, with labels (N,) -> a (10 * 28, per_class * 28) grid: one row per
    class of its first per_class samples, centre-cropped to 28x28; a class with fewer is padded with black."""
    ims = ims[..., 0] if ims.ndim == 4 else ims
    blank = np.zeros((per_class, 28, 28), ims.dtype)
    rows = [np.concatenate([ims[np.flatnonzero(labels == c)[:per_class]][:, 2:30, 2:30], blank])[:per_class]
            for c in range(10)]
    return np.concatenate([np.concatenate(list(r), 1) for r in rows], 0)


def figures(rows, args):
    """results/fmnist_samples.png (per class: teacher 32 steps | DMD 1 | ADD 1 | ADD 4) and
    results/fmnist_fd_vs_steps.png (teacher FD_FMNIST against Heun steps, one-step students marked)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(args.results, exist_ok=True)
    seed = args.seed
    cols = [("teacher", "full", max(TEACHER_STEPS), f"teacher, {max(TEACHER_STEPS)} steps"),
            ("dmd", "full", 1, "DMD, 1 step"), ("add", "full", 1, "ADD, 1 step"), ("add", "full", 4, "ADD, 4 steps")]
    cols = [c for c in cols if os.path.exists(sample_path(args, *c[:3]))]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.6), squeeze=False)
    for ax, (m, v, s, title) in zip(axes[0], cols):
        with np.load(sample_path(args, m, v, s)) as d:
            ims, labels = d["images"], d["labels"]
        ax.imshow(class_grid(ims, labels), cmap="gray", vmin=0, vmax=255)
        r = rows.get((m, v, s, seed), {})
        ax.set_title(f"{title}\nFD_FMNIST {float(r.get('fd_fmnist') or 'nan'):.2f}, recall "
                     f"{float(r.get('recall') or 'nan'):.2f}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(args.results, "fmnist_samples.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ts = [s for s in TEACHER_STEPS if ("teacher", "full", s, seed) in rows]
    ax.plot(ts, [float(rows[("teacher", "full", s, seed)]["fd_fmnist"]) for s in ts], "o-", color="k",
            label="teacher (Heun)")
    marks = [("dmd", "full", 1, "DMD", "C0", "s"), ("add", "full", 1, "ADD 1 step", "C1", "^"),
             ("add", "full", 4, "ADD 4 steps", "C2", "v")]
    for m, v, s, lab, c, mk in marks:
        if (m, v, s, seed) in rows:
            ax.plot([s], [float(rows[(m, v, s, seed)]["fd_fmnist"])], mk, color=c, ms=9, label=lab)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(f"FD_FMNIST ({args.num} samples)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.results, "fmnist_fd_vs_steps.png"), dpi=110)
    plt.close(fig)


def shipped_teacher(args, cfg):
    """-> (folder, info) of the teacher shipped for this scale, or (None, None) if there is none or
    --retrain-teacher. info: teacher_info.json (command, train_steps, wall_s, seed)."""
    folder = os.path.join(MODELS, f"fmnist-{args.scale}")
    if args.retrain_teacher or not os.path.exists(os.path.join(folder, "teacher_info.json")):
        return None, None
    return folder, json.load(open(os.path.join(folder, "teacher_info.json")))


def ship_teacher(args):
    """RUN_DIR/unet (EMA weights) -> MODELS/fmnist-SCALE/unet in fp16 safetensors (loaded back as fp32), the
    scheduler config, and teacher_info.json: the command, steps and wall time the CSV's teacher rows carry."""
    import shutil

    from diffusers import UNet2DModel
    if not (args.teacher_command and args.teacher_wall_s):
        sys.exit("benchmark: error: --ship-teacher needs --teacher-command and --teacher-wall-s")
    dest = os.path.join(MODELS, args.ship_as or f"fmnist-{args.scale}")
    unet = UNet2DModel.from_pretrained(os.path.join(args.ship_teacher, "unet"))
    unet.half().save_pretrained(os.path.join(dest, "unet"))
    shutil.copytree(os.path.join(args.ship_teacher, "scheduler"), os.path.join(dest, "scheduler"), dirs_exist_ok=True)
    steps = int(open(os.path.join(args.ship_teacher, "log.csv")).read().split()[-1].split(",")[0])
    info = dict(command=args.teacher_command, train_steps=steps, wall_s=args.teacher_wall_s, seed=0,
                parameters=sum(p.numel() for p in unet.parameters()), export="benchmark/fmnist.py --ship-teacher")
    json.dump(info, open(os.path.join(dest, "teacher_info.json"), "w"), indent=1)
    print(f"shipped {args.ship_teacher} (step {steps}) -> {dest}")


def main(argv=None):
    args = parse_args(argv)
    cfg = SCALES[args.scale]
    if args.ship_teacher:
        return ship_teacher(args)
    args.num = args.num or cfg["num"]
    args.jobs = args.jobs or cfg["jobs"]
    args.gen_batch = cfg["gen_batch"]
    # N stages at once share the CPU cores: each gets cores / N threads. Two CPU trainings that each took both
    # cores ran 30x slower than one alone (their threads spin-wait on each other); with one thread each, 1.7x.
    args.threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0
    os.makedirs(args.out, exist_ok=True)
    state_path = os.path.join(args.out, "state.json")
    state = json.load(open(state_path)) if os.path.exists(state_path) else {}
    rows = read_csv(args)
    # 1. the teacher (shipped, or trained), the DMD regression pairs, then the six students (--jobs at once)
    t_dir, t_info = shipped_teacher(args, cfg)
    args.teacher_name = os.path.basename(t_dir) if t_dir else f"retrained-seed{args.seed}"
    if t_dir is None:
        t_dir = os.path.join(args.out, "teacher")
        t_info = train_stage("teacher", "teacher.py", t_dir, "--dataset fashion-mnist " + cfg["teacher"], args,
                             state, rows, ("teacher", "full"))
    trained = {("teacher", "full"): t_info}
    stages = [] if args.teacher_only else students(args, cfg, t_dir, state, rows, trained)
    if args.skip_fid:
        print(f"trained: {', '.join(st[0] for st in stages)} (--skip-fid: no rows scored)")
        return
    # 2. one row per (model, sampling steps): samples, then the domain metrics (a shipped teacher's rows once)
    todo = [] if (args.seed and args.teacher_name != f"retrained-seed{args.seed}") else \
        [(("teacher", "full", s, args.seed), f"--teacher {t_dir}", s) for s in TEACHER_STEPS]
    if not args.teacher_only:
        todo += [(("dmd", v, 1, args.seed), f"--generator {args.out}/dmd_{v}/generator", 1) for v in DMD_VARIANTS]
        todo += [(("add", v, s, args.seed), f"--generator {args.out}/add_{v}/student", s) for v in ADD_VARIANTS
                 for s in ([1, 4] if v == "full" else cfg["add_ablation_steps"])]
    parallel(args.jobs, [lambda t=t: score_row(rows, t[0], t[1], t[2], args, trained[t[0][:2]]) for t in todo])
    # 3. Inception FID: the reference statistics of as many test images, then the scale's FID rows
    args.ref = os.path.join(args.out, f"ref_fmnist_test{args.num}.npz")
    if not os.path.exists(args.ref):
        run(f"eval.py stats fashion-mnist-test --num {args.num} --out {args.ref}",
            os.path.join(args.out, "logs", "ref.log"))
    parallel(args.jobs, [lambda k=k: fid_row(rows, k, args) for k in fid_keys(rows, args, cfg)])
    write_csv(rows, args)
    figures(rows, args)
    print(f"results: {os.path.join(args.results, 'fmnist.csv')}, fmnist_samples.png, fmnist_fd_vs_steps.png")
    for r in sorted(rows.values(), key=row_order):
        print(",".join(str(r.get(k, "")) for k in FIELDS))


def students(args, cfg, t_dir, state, rows, trained):
    """The DMD regression pairs, then the six students (--jobs at once); their infos go into `trained`."""
    pairs = os.path.join(args.out, "dmd_pairs")
    if not os.path.exists(os.path.join(pairs, "done")):
        wall, _ = run(f"dmd.py --teacher {t_dir} --pairs-dir {pairs} --output-dir {pairs} --seed {args.seed} "
                      f"{cfg['dmd']} --max-steps 0", os.path.join(args.out, "logs", "dmd_pairs.log"))
        open(os.path.join(pairs, "done"), "w").write(f"{wall:.1f}\n")   # its wall time, seconds
    stages = [(f"add_{v}", "add.py", f"--teacher {t_dir} --data fashion-mnist {flag} {cfg['add']}", ("add", v))
              for v, flag in ADD_VARIANTS.items()]
    stages += [(f"dmd_{v}", "dmd.py", f"--teacher {t_dir} --pairs-dir {pairs} {flag} {cfg['dmd']}", ("dmd", v))
               for v, flag in DMD_VARIANTS.items()]
    infos = parallel(args.jobs, [lambda st=st: train_stage(st[0], st[1], os.path.join(args.out, st[0]), st[2], args,
                                                           state, rows, st[3], args.threads) for st in stages])
    trained.update({st[3]: info for st, info in zip(stages, infos)})
    return stages


if __name__ == "__main__":
    main()
