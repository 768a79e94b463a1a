"""Ablation rows at the CPU scale of benchmark/fmnist.py: one named training, each of its exports scored.

  python benchmark/ablate.py dmd full                          # DMD with the CPU scale's arguments
  python benchmark/ablate.py dmd no_reg -- --no-reg            # anything after -- is added to them
  python benchmark/ablate.py add full --sampling-steps 1 4     # ADD, scored at 1 and 4 steps
  python benchmark/ablate.py dmd full --seed 1 --every 200     # a second seed, a curve point every 200 steps
  python benchmark/ablate.py teacher heun --sampling-steps 16 32 --teacher benchmark/models/fmnist-cpu-uncond
                                                                # a teacher's own rows (no training)

Each run trains in runs/ablate/METHOD_NAME_seedS (dmd.py or add.py with the shipped CPU teacher, the CPU scale's
arguments of benchmark/fmnist.py, then the extra flags, resuming if interrupted), exports the model every --every
steps (--export-every) and at the end; every export is scored at each of --sampling-steps: eval.py generate
(--num samples, fixed seed) and eval.py domain against as many Fashion-MNIST test images. One row per (export,
sampling steps) goes to benchmark/results/cpu/ablations.csv; a row already there is not scored again. DMD runs
share one set of regression pairs per teacher (runs/ablate/dmd_pairs, seed 0), ADD runs with --lambda-pair one per
pair count and ODE steps (runs/ablate/add_pairs4096_ode32; _all with --pair-steps all). Another --teacher works in
folders named after it (runs/ablate/dmd_full_fmnist-cpu-uncond_seed0); an unconditional teacher's rows carry class
coverage (and the predicted-class shares) instead of class accuracy. Set OMP_NUM_THREADS to run two at once. The figures
beside the CSV: _curves.png (every run with two or more exports), _add_curves.png (the ADD levers), _samples.png
and _add_samples.png (final exports, six samples per class, beside the teacher); _add_steps.png and
_add_steps_samples.png: the later student steps' levers (issue 37).
"""
import argparse
import csv
import fcntl
import functools
import glob
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fmnist import MODELS, ROOT, SCALES, class_grid, domain_scores, run  # noqa: E402

FIELDS = ["method", "name", "seed", "train_steps", "sampling_steps", "fd_fmnist", "precision", "recall", "accuracy",
          "spread", "coverage", "class_shares", "wall_s", "teacher", "flags"]
DEFAULT_TEACHER = "fmnist-cpu"
CSV = os.path.join(ROOT, "benchmark", "results", "cpu", "ablations.csv")


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
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = Parser(description=__doc__.split("\n\n")[0],
               epilog="Flags after -- go to dmd.py / add.py after the CPU scale's own (a later flag wins).")
    p.add_argument("method", choices=["dmd", "add", "teacher"], help="which script trains (teacher: none, the "
                   "teacher itself is scored at --sampling-steps Heun steps)")
    p.add_argument("name", help="the row's name, e.g. full, no_reg, diffaug_none (letters, digits, _ and -)")
    p.add_argument("--seed", type=int, default=0, help="training seed (the scoring seed stays 0)")
    p.add_argument("--every", type=int, default=0, help="export and score every N training steps as well (a curve)")
    p.add_argument("--score-every", type=int, default=0,
                   help="score only the exports at multiples of N steps, and the final one (default: every export; "
                        "scoring 2000 samples at 1, 2 and 4 steps takes about 5 minutes on one core)")
    p.add_argument("--sampling-steps", type=int, nargs="+", default=[1], help="student steps to score each export at")
    p.add_argument("--num", type=int, default=2000, help="samples per row, and test images they are compared with")
    p.add_argument("--teacher", default=os.path.join(MODELS, "fmnist-cpu"), help="teacher folder")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "ablate"), help="working folder")
    p.add_argument("--results", default=CSV, help="the CSV the rows are added to")
    args = p.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.name):
        p.error(f"name {args.name!r}: use letters, digits, _ and - only")
    if args.every < 0 or args.score_every < 0 or args.num < 4 or min(args.sampling_steps) < 1:
        p.error("need --every >= 0, --score-every >= 0, --num >= 4 and --sampling-steps >= 1")
    if not os.path.exists(os.path.join(args.teacher, "unet")):
        p.error(f"--teacher {args.teacher}: no unet/ folder there")
    args.extra = " ".join(extra)
    args.teacher_name = os.path.basename(os.path.normpath(args.teacher))
    return args


def read_rows(path):
    return list(csv.DictReader(open(path))) if os.path.exists(path) else []


def key(r):
    return (r["method"], r["name"], str(r["seed"]), str(r["train_steps"]), str(r["sampling_steps"]),
            r.get("teacher") or DEFAULT_TEACHER)


def tagged(args, name):
    """A working folder's name: NAME for the default teacher, NAME_TEACHER for another."""
    return name if args.teacher_name == DEFAULT_TEACHER else f"{name}_{args.teacher_name}"


def score(args, model, steps, npz, info):
    """eval.py generate + domain for one export (a student folder, or the teacher) at `steps` steps -> a CSV row
    (dict): class accuracy and spread for class-conditional samples, coverage and class shares for unconditional."""
    source = f"--teacher {model}" if args.method == "teacher" else f"--generator {model}"
    d = domain_scores(source, steps, args.num, 0, 250, npz, npz.replace(".npz", ".log"))
    return dict(method=args.method, name=args.name, seed=args.seed, sampling_steps=steps, teacher=args.teacher_name,
                **d, **info)


def main(argv=None):
    args = parse_args(argv)
    cfg = SCALES["cpu"]
    run_dir = os.path.join(args.out, tagged(args, f"{args.method}_{args.name}") + f"_seed{args.seed}")
    final = os.path.join(run_dir, "generator" if args.method == "dmd" else "student")
    flags = cfg[args.method] + (f" --export-every {args.every}" if args.every else "") + \
        (f" {args.extra}" if args.extra else "")
    if args.method == "teacher":   # no training: the teacher's own rows, at its trained step count
        info = os.path.join(args.teacher, "teacher_info.json")
        steps = json.load(open(info))["train_steps"] if os.path.exists(info) else 0
        return score_all(args, [(steps, args.teacher)], "", run_dir, "")
    if args.method == "dmd":
        ode = re.findall(r"--ode-steps[ =](\d+)", args.extra)   # pairs of another ODE: a folder of their own
        pairs = os.path.join(args.out, tagged(args, "dmd_pairs" + (f"_ode{ode[-1]}" if ode else "")))
        if not os.path.exists(os.path.join(pairs, "done")):   # the regression pairs (teacher ODE), built once
            run(f"dmd.py --teacher {args.teacher} --pairs-dir {pairs} --output-dir {pairs} --seed 0 {cfg['dmd']} "
                + (f"--ode-steps {ode[-1]} " if ode else "") + "--max-steps 0",
                os.path.join(args.out, "logs", f"{os.path.basename(pairs)}.log"))
            open(os.path.join(pairs, "done"), "w").write("built\n")
        cmd = f"dmd.py --teacher {args.teacher} --pairs-dir {pairs}"
    else:
        cmd = f"add.py --teacher {args.teacher} --data fashion-mnist"
        if "--lambda-pair" in args.extra:   # ADD's pairs: one set per teacher, pair count and ODE steps (seed 0)
            n, ode = (re.findall(rf"--{f}[ =](\d+)", args.extra) for f in ("pairs", "ode-steps"))
            name = f"add_pairs{n[-1] if n else 10000}_ode{ode[-1] if ode else 32}" + \
                ("_all" if re.search(r"--pair-steps[ =]all", args.extra) else "")   # pairs with their ODE states
            cmd += f" --pairs-dir {os.path.join(args.out, tagged(args, name))}"
    wall_file = os.path.join(run_dir, "wall_s")
    if not os.path.exists(final):
        resume = " --resume" if os.path.exists(os.path.join(run_dir, "checkpoint.pt")) else ""
        wall, _ = run(f"{cmd} --output-dir {run_dir} --seed {args.seed} {flags}{resume}",
                      os.path.join(args.out, "logs", f"{os.path.basename(run_dir)}.log"))
        prev = float(open(wall_file).read()) if resume and os.path.exists(wall_file) else 0.0
        open(wall_file, "w").write(f"{prev + wall:.1f}\n")
        for old in glob.glob(os.path.join(run_dir, "scores", os.path.basename(final) + "_*step.npz")):
            if re.fullmatch(r"\d+step\.npz", os.path.basename(old).split("_", 1)[1]):   # not the numbered exports'
                os.remove(old)   # samples of an earlier final export (a run continued to more steps): not this one
    wall = float(open(wall_file).read()) if os.path.exists(wall_file) else ""
    final_steps = max(int(r["step"]) for r in csv.DictReader(open(os.path.join(run_dir, "log.csv"))))
    exports = [(int(p.rsplit("_", 1)[1]), p) for p in sorted(glob.glob(final + "_*"))] + [(final_steps, final)]
    exports = [e for e in exports if not args.score_every or e[0] % args.score_every == 0 or e[1] == final]
    score_all(args, exports, final, run_dir, wall, flags)


def score_all(args, exports, final, run_dir, wall, flags=""):
    """Score each (train steps, folder) export not yet in the CSV at each --sampling-steps, then redraw."""
    rows = read_rows(args.results)
    done = {key(r) for r in rows}
    for train_steps, model in exports:
        for s in args.sampling_steps:
            info = dict(train_steps=train_steps, wall_s=wall if model == final else "", flags=flags)
            row = dict(method=args.method, name=args.name, seed=args.seed, sampling_steps=s,
                       teacher=args.teacher_name, **info)
            if key({k: str(v) for k, v in row.items()}) in done:
                continue
            npz = os.path.join(run_dir, "scores", f"{os.path.basename(model)}_{s}step.npz")
            os.makedirs(os.path.dirname(npz), exist_ok=True)
            row = score(args, model, s, npz, info)
            kind = f"accuracy {row['accuracy']}" if row["accuracy"] else \
                f"coverage {row['coverage']} (class shares {row['class_shares']})"
            print(f"{args.method} {args.name} seed {args.seed} ({args.teacher_name}), {train_steps} training steps, "
                  f"{s} step(s): FD_FMNIST {row['fd_fmnist']}, precision {row['precision']}, recall {row['recall']}, "
                  f"{kind}", flush=True)
            os.makedirs(os.path.dirname(args.results), exist_ok=True)
            with open(args.results + ".lock", "w") as lock:   # two runs at once: one writer at a time
                fcntl.flock(lock, fcntl.LOCK_EX)
                rows = read_rows(args.results) + [row]   # re-read: another run may have added rows meanwhile
                with open(args.results + ".tmp", "w", newline="") as f:
                    w = csv.DictWriter(f, FIELDS)
                    w.writeheader()
                    w.writerows(rows)
                os.replace(args.results + ".tmp", args.results)
    rows = read_rows(args.results)
    curve_figure([r for r in rows if not (r["method"] == "add" and r["name"] in ADD_STEPS and
                                          (r["method"], r["name"]) not in ADD_CURVES)],   # those: _add_steps.png
                 args.results.replace(".csv", "_curves.png"))
    curve_figure([r for r in rows if (r["method"], r["name"]) in ADD_CURVES],
                 args.results.replace(".csv", "_add_curves.png"))   # the ADD levers' curves alone, readable
    lever_figure(rows, args.results.replace(".csv", "_add_steps.png"))   # issue 37: the later steps' levers
    sample_figure(args, args.results.replace(".csv", "_samples.png"))
    sample_figure(args, args.results.replace(".csv", "_add_samples.png"), ADD_FIGURE)
    sample_figure(args, args.results.replace(".csv", "_add_steps_samples.png"), ADD_STEPS_FIGURE)
    print(f"rows in {args.results} ({time.strftime('%H:%M:%S')})")


def lever_figure(rows, path):
    """ADD_STEPS' runs (seed 0 solid, seed 1 dashed): FD_FMNIST and recall at 1 and 4 sampling steps against
    training steps, the teacher's best row as a line: whether a lever's four steps keep improving or decay."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [(n, s) for n in ADD_STEPS for s in ("0", "1") if any(r["name"] == n and r["seed"] == s for r in rows)]
    if not runs:
        return
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), squeeze=False)
    colours = plt.get_cmap("tab20")
    for name, seed in runs:
        for col, steps in enumerate(("1", "4")):
            pts = sorted((int(r["train_steps"]), float(r["fd_fmnist"]), float(r["recall"])) for r in rows
                         if r["method"] == "add" and r["name"] == name and r["seed"] == seed and
                         r["sampling_steps"] == steps)
            style = dict(color=colours(ADD_STEPS.index(name) % 20), ls="-" if seed == "0" else "--", marker="o", ms=3,
                         label=f"{name}, seed {seed}")
            axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], **style)
            axes[1][col].plot([p[0] for p in pts], [p[2] for p in pts], **style)
    for col, steps in enumerate(("1 step", "4 steps")):
        axes[0][col].axhline(TEACHER_BEST[0], color="k", lw=0.8, ls=":", label="teacher, 64 Heun steps")
        axes[1][col].axhline(TEACHER_BEST[1], color="k", lw=0.8, ls=":")
        axes[0][col].set_title(f"ADD at {steps}", fontsize=9)
        axes[0][col].set_yscale("log")
        axes[0][col].set_ylabel("FD_FMNIST (2000 vs 2000)")
        axes[1][col].set_ylabel("recall (k = 3)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("training steps")
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curve_figure(rows, path):
    """FD_FMNIST and recall against training steps, one line per (method, name, seed, sampling steps) with at
    least two exports (whether more steps would help); one row of panels per teacher."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = {}
    for r in rows:
        series.setdefault((r.get("teacher") or DEFAULT_TEACHER, r["method"], r["name"], r["seed"],
                           r["sampling_steps"]), []).append(r)
    series = {k: sorted(v, key=lambda r: int(r["train_steps"])) for k, v in series.items() if len(v) > 1}
    teachers = sorted({k[0] for k in series}, key=lambda t: (t != DEFAULT_TEACHER, t))   # the default one first
    if not teachers:
        return
    fig, axes = plt.subplots(len(teachers), 2, figsize=(13, 3.8 * len(teachers)), squeeze=False)
    for row, teacher in zip(axes, teachers):
        lines = sorted(k for k in series if k[0] == teacher)
        colours = plt.get_cmap("tab20" if len(lines) > 10 else "tab10")
        for n, k in enumerate(lines):
            _, method, name, seed, steps = k
            x = [int(r["train_steps"]) for r in series[k]]
            label = f"{method.upper()} {name}, seed {seed}, {steps} step{'s' if steps != '1' else ''}"
            style = dict(color=colours(n % 20), marker="os^D"[n // 20 % 4], ls=("-", "--", ":", "-.")[n // 20 % 4],
                         ms=4, label=label)   # past 20 lines the colours repeat with another marker and dash
            row[0].plot(x, [float(r["fd_fmnist"]) for r in series[k]], **style)
            row[1].plot(x, [float(r["recall"]) for r in series[k]], **style)
        row[0].set_yscale("log")
        row[0].set_title(f"teacher {teacher}", fontsize=9)
        for ax, name in zip(row, ("FD_FMNIST (2000 vs 2000)", "recall (k = 3)")):
            ax.set_xlabel("training steps")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        row[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


ADD_FIGURE = [("add", "t1d_full", 1), ("add", "t1d_full", 4), ("add", "adv", 1), ("add", "adv", 4),
              ("add", "pair_full", 1), ("add", "pair_full", 4), ("add", "pair_adv", 1), ("add", "pair_adv", 4)]
ADD_CURVES = {("add", n) for n in ("t1d_full", "pair_full", "pair_adv", "pairT_full", "dupd4_full")}
ADD_STEPS = ["pair_adv", "pair_adv_recon", "pair_adv_eq4late", "pair_adv_ode16", "pair_adv_bsim_ode16",
             "pair_adv_traj", "pair_adv_traj_ema", "pair_full_traj", "recipe_p1024", "pair_adv_traj_l4",
             "pair_adv_traj_t04"]   # issue 37: the later steps
ADD_STEPS_FIGURE = [("add", "pair_adv_recon", 4), ("add", "pair_adv_ode16", 4), ("add", "pair_adv_traj", 1),
                    ("add", "pair_adv_traj", 2), ("add", "pair_adv_traj", 4), ("add", "pair_adv_traj_ema", 4),
                    ("add", "recipe_p1024", 4)]
TEACHER_BEST = (51.742, 0.5535)   # the shipped teacher at 64 Heun steps: FD_FMNIST, recall
FIGURE = [("dmd", "full", 1), ("dmd", "no_reg", 1), ("dmd", "no_dm", 1), ("dmd", "ode32", 1), ("dmd", "ode32_noreg", 1),
          ("add", "full", 1), ("add", "full", 4), ("add", "adv", 1), ("add", "adv", 4), ("add", "distill", 1),
          ("add", "from_dmd", 1), ("add", "teacher_backbone", 1)]


@functools.cache
def domain_classifier():
    """eval.py and its Fashion-MNIST classifier, loaded once for all the figure's columns."""
    sys.path.insert(0, ROOT)
    import eval as ev
    return ev, ev.load_classifier(ev.CLASSIFIERS["fashion-mnist"])


def predicted_classes(ims):
    """The domain classifier's classes of uint8 (N, 32, 32[, 1]) samples (centre 28 x 28): rows for the sample
    figure of an unconditional teacher, whose samples carry no labels."""
    ev, classifier = domain_classifier()
    return ev.domain_features(classifier, ev.center_crop(ims, 28))[1]


def sample_figure(args, path, figure=FIGURE):
    """Six final-export samples per class (rows) for each seed-0 run of FIGURE that exists, beside the teacher's 32
    Heun steps: for the default teacher where benchmark/fmnist.py left them (runs/fmnist-cpu/samples), for another
    teacher its `ablate.py teacher` rows (the most steps), in PATH_TEACHER.png. Rows of unconditional samples are
    the classes the domain classifier sees: a dropped class is a black row."""
    import matplotlib
    import numpy as np
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if args.teacher_name == DEFAULT_TEACHER:   # benchmark/fmnist.py's teacher samples, else `ablate.py teacher`'s
        cols = [(os.path.join(ROOT, "runs", "fmnist-cpu", "samples", "teacher_full_32.npz"), "teacher, 32 steps"),
                (os.path.join(args.out, "teacher_heun_seed0", "scores", "fmnist-cpu_32step.npz"), "teacher, 32 steps")]
        cols = [c for c in cols if os.path.exists(c[0])][:1]
    else:
        path = path.replace(".png", f"_{args.teacher_name}.png")

        def steps_of(npz):
            return int(re.search(r"_(\d+)step\.npz$", npz).group(1))
        found = glob.glob(os.path.join(args.out, tagged(args, "teacher_*") + "_seed0", "scores", "*step.npz"))
        cols = [(p, f"teacher, {steps_of(p)} steps") for p in sorted(found, key=steps_of)[-1:]]
    for method, name, steps in figure:
        final = "generator" if method == "dmd" else "student"
        npz = os.path.join(args.out, tagged(args, f"{method}_{name}") + "_seed0", "scores", f"{final}_{steps}step.npz")
        cols.append((npz, f"{method.upper()} {name}, {steps} step{'s' if steps > 1 else ''}"))
    cols = [c for c in cols if os.path.exists(c[0])]
    if not cols:
        return
    fig, axes = plt.subplots(1, len(cols), figsize=(2.1 * len(cols), 3.4), squeeze=False)
    for ax, (npz, title) in zip(axes[0], cols):
        with np.load(npz) as d:
            ims = d["images"]
            given = "labels" in d
            labels = d["labels"] if given else predicted_classes(ims)
        ax.imshow(class_grid(ims, labels), cmap="gray", vmin=0, vmax=255)
        ax.set_title(title + ("" if given else "\n(rows: classifier's class)"), fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
