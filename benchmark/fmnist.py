"""Offline end-to-end benchmark: a Fashion-MNIST teacher, distilled by DMD and ADD, scored with the standard FID.

  python benchmark/fmnist.py --scale gpu      # benchmark/results/: one GPU, about 8 minutes of training
  python benchmark/fmnist.py --scale cpu      # benchmark/results/cpu/: 2 CPU cores, about 2.5 hours
  python benchmark/fmnist.py --scale gpu --skip-fid   # train only; a later run (same --out) scores
  python benchmark/fmnist.py --scale cpu --out runs/fmnist-cpu   # re-run: finished stages are skipped

Every stage is a plain command of this repository (printed before it runs, its output in OUT/logs/):
  1. teacher.py trains the class-conditional teacher (DDPM, zero terminal SNR, v-prediction).
  2. dmd.py --max-steps 0 builds the regression pairs (teacher Heun ODE), shared by DMD full and --no-dm.
  3. dmd.py: full, --no-reg, --no-dm (DMD Table 2); add.py: --loss both (full), --loss adv, --loss distill
     (ADD Table 1d). --jobs N runs N of these six at once on the one device (the GPU scale: all six).
  4. eval.py stats: Inception statistics of the Fashion-MNIST test split (the reference).
  5. eval.py generate ... --ref REF --crop 28, the same command for every row: the teacher at 1, 2, 4, 8, 16
     and 32 Heun steps, DMD at one step, ADD at one and four steps (the CPU scale scores the two ADD
     ablations at one step only).
Rows land in RESULTS/fmnist.csv (method,variant,steps,fid,train_steps,wall_s,device); wall_s is the training
command's wall time (teacher rows: the teacher's; shared devices make the GPU scale's student times
concurrent, not exclusive), train_steps the step it stopped at. Then the sample figure and the FID-vs-steps
plot are drawn. Stages are skipped when their output exists; an interrupted training stage resumes from its
checkpoint.
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
        fid_num=500, ref_num=2000, add_ablation_steps=[1], jobs=1, gen_batch=250),
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
        fid_num=10000, ref_num=10000, add_ablation_steps=[1, 4], jobs=6, gen_batch=1000),
}
DMD_VARIANTS = {"full": "", "no_reg": "--no-reg", "no_dm": "--no-dm"}
ADD_VARIANTS = {"full": "--loss both", "adv": "--loss adv", "distill": "--loss distill"}
FIELDS = ["method", "variant", "steps", "fid", "train_steps", "wall_s", "device"]


# Copied from dmd.py: Parser
class Parser(argparse.ArgumentParser):
    """argparse, with user mistakes reported in one line (exit code 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scale", choices=list(SCALES), default=None, help="gpu if CUDA is visible, else cpu")
    p.add_argument("--out", default=None, help="working folder (default runs/fmnist-SCALE)")
    p.add_argument("--results", default=None, help="where fmnist.csv and the figures go (default: "
                   "benchmark/results for the GPU scale, benchmark/results/cpu for the CPU scale)")
    p.add_argument("--fid-num", type=int, default=None, help="samples per FID row (default: the scale's)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--jobs", type=int, default=None, help="stages run at once after the teacher (the six "
                   "trainings, then the FID rows) sharing the device, each with CPU cores / N threads (default: "
                   "the scale's: cpu 1, gpu 6)")
    p.add_argument("--skip-fid", action="store_true", help="train (and build the DMD pairs), then stop")
    args = p.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.fid_num is not None and args.fid_num < 2:
        p.error("--fid-num must be >= 2 (FID needs a covariance)")
    import torch
    args.cuda = torch.cuda.is_available()
    args.scale = args.scale or ("gpu" if args.cuda else "cpu")
    args.out = args.out or os.path.join(ROOT, "runs", f"fmnist-{args.scale}")
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
            for k in [k for k in rows if k[:2] == key]:
                del rows[k]
        resume = " --resume" if os.path.exists(os.path.join(out_dir, "checkpoint.pt")) else ""
        wall, out = run(f"{script} --output-dir {out_dir} --seed {args.seed} {extra}{resume}",
                        os.path.join(args.out, "logs", f"{name}.log"), threads)
        steps = int(re.findall(r"step (\d+)\)", out)[-1])   # the step it stopped at (--max-minutes can end it early)
        with LOCK:
            state[name] = {"wall_s": round(wall, 1), "train_steps": steps, "args": extra}   # wall: the last invocation
            json.dump(state, open(os.path.join(args.out, "state.json"), "w"), indent=1)
    return state[name]


def fid_row(rows, key, source, steps, args, info):
    """One FID row: eval.py generate (fixed seed and count) against the reference statistics."""
    if key in rows:
        return
    method, variant = key[0], key[1]
    npz = os.path.join(args.out, "samples", f"{method}_{variant}_{steps}.npz")
    _, out = run(f"eval.py generate {source} --steps {steps} --num {args.fid_num} --seed {args.seed} "
                 f"--batch-size {args.gen_batch} --crop 28 --ref {args.ref} --out {npz}",
                 os.path.join(args.out, "logs", f"fid_{method}_{variant}_{steps}.log"), args.threads)
    fid = float(re.findall(r"FID ([0-9.]+)", out)[-1])
    with LOCK:
        rows[key] = dict(method=method, variant=variant, steps=steps, fid=round(fid, 2),
                         train_steps=info["train_steps"], wall_s=info["wall_s"], device=args.device)
        print(f"  {method} {variant} {steps} step(s): FID {fid:.2f}", flush=True)
        write_csv(rows, args)


def write_csv(rows, args):
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "fmnist.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(sorted(rows.values(), key=row_order))


def row_order(r):
    """Table order: teacher, dmd, add; variants as listed; then sampling steps."""
    variants = list(dict.fromkeys([*DMD_VARIANTS, *ADD_VARIANTS]))   # full, no_reg, no_dm, adv, distill
    return ["teacher", "dmd", "add"].index(r["method"]), variants.index(r["variant"]), int(r["steps"])


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
    return {(r["method"], r["variant"], int(r["steps"])): r for r in csv.DictReader(open(path))}


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


def write_spread(rows, args):
    """results/fmnist_spread.csv: within_class_spread of every row's FID samples (mode collapse shows as ~0)."""
    with open(os.path.join(args.results, "fmnist_spread.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "variant", "steps", "spread"])
        for m, v, s in rows:
            with np.load(os.path.join(args.out, "samples", f"{m}_{v}_{s}.npz")) as d:
                w.writerow([m, v, s, f"{within_class_spread(d['images'], d['labels']):.4f}"])


def figures(rows, args):
    """results/fmnist_samples.png (per class: teacher 32 steps | DMD 1 | ADD 1 | ADD 4) and
    results/fmnist_fid_vs_steps.png (teacher FID against Heun steps, one-step students marked)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(args.results, exist_ok=True)
    cols = [("teacher", "full", max(TEACHER_STEPS), f"teacher, {max(TEACHER_STEPS)} steps"),
            ("dmd", "full", 1, "DMD, 1 step"), ("add", "full", 1, "ADD, 1 step"), ("add", "full", 4, "ADD, 4 steps")]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.6))
    for ax, (m, v, s, title) in zip(axes, cols):
        with np.load(os.path.join(args.out, "samples", f"{m}_{v}_{s}.npz")) as d:
            ims, labels = d["images"], d["labels"]
        ims = ims[..., 0] if ims.ndim == 4 else ims                          # grey: (N, H, W) or (N, H, W, 1)
        blank = np.zeros((6, 28, 28), ims.dtype)   # a class with fewer than 6 samples is padded with black
        pick = [np.flatnonzero(labels == c)[:6] for c in range(10)]      # 6 samples of each class, one row each
        grid = np.concatenate([np.concatenate(list(np.concatenate([ims[i][:, 2:30, 2:30], blank])[:6]), 1)
                               for i in pick], 0)
        ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{title}\nFID {float(rows[(m, v, s)]['fid']):.1f}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(args.results, "fmnist_samples.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ts = [s for s in TEACHER_STEPS if ("teacher", "full", s) in rows]
    ax.plot(ts, [float(rows[("teacher", "full", s)]["fid"]) for s in ts], "o-", color="k", label="teacher (Heun)")
    marks = [("dmd", "full", 1, "DMD", "C0", "s"), ("add", "full", 1, "ADD 1 step", "C1", "^"),
             ("add", "full", 4, "ADD 4 steps", "C2", "v")]
    for m, v, s, lab, c, mk in marks:
        if (m, v, s) in rows:
            ax.plot([s], [float(rows[(m, v, s)]["fid"])], mk, color=c, ms=9, label=lab)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(f"FID ({args.fid_num} samples)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.results, "fmnist_fid_vs_steps.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    cfg = SCALES[args.scale]
    args.fid_num = args.fid_num or cfg["fid_num"]
    args.jobs = args.jobs or cfg["jobs"]
    args.gen_batch = cfg["gen_batch"]
    # N stages at once share the CPU cores: each gets cores / N threads. Two CPU trainings that each took both
    # cores ran 30x slower than one alone (their threads spin-wait on each other); with one thread each, 1.7x.
    args.threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0
    os.makedirs(args.out, exist_ok=True)
    state_path = os.path.join(args.out, "state.json")
    state = json.load(open(state_path)) if os.path.exists(state_path) else {}
    rows = read_csv(args)
    t_dir = os.path.join(args.out, "teacher")
    # 1. train everything: the teacher, the DMD regression pairs, then the six students (--jobs at once)
    trained = {("teacher", "full"): train_stage("teacher", "teacher.py", t_dir,
                                                "--dataset fashion-mnist " + cfg["teacher"], args, state,
                                                rows, ("teacher", "full"))}
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
    if args.skip_fid:
        print(f"trained: {', '.join(st[0] for st in stages)} (--skip-fid: no FID rows)")
        return
    # 2. the reference statistics, then one FID row per (model, sampling steps)
    args.ref = os.path.join(args.out, f"ref_fmnist_test{cfg['ref_num']}.npz")
    if not os.path.exists(args.ref):
        run(f"eval.py stats fashion-mnist-test --num {cfg['ref_num']} --out {args.ref}",
            os.path.join(args.out, "logs", "ref.log"))
    todo = [(("teacher", "full", s), f"--teacher {t_dir}", s) for s in TEACHER_STEPS]
    todo += [(("dmd", v, 1), f"--generator {args.out}/dmd_{v}/generator", 1) for v in DMD_VARIANTS]
    todo += [(("add", v, s), f"--generator {args.out}/add_{v}/student", s) for v in ADD_VARIANTS
             for s in ([1, 4] if v == "full" else cfg["add_ablation_steps"])]
    parallel(args.jobs, [lambda t=t: fid_row(rows, t[0], t[1], t[2], args, trained[t[0][:2]]) for t in todo])
    write_csv(rows, args)
    write_spread(rows, args)
    figures(rows, args)
    print(f"results: {os.path.join(args.results, 'fmnist.csv')}, fmnist_spread.csv, fmnist_samples.png, "
          "fmnist_fid_vs_steps.png")
    for r in sorted(rows.values(), key=row_order):
        print(",".join(str(r[k]) for k in FIELDS))


if __name__ == "__main__":
    main()
