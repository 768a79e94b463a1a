"""benchmark/fmnist.py: the orchestration (stages, skip-if-done, CSV rows, figures), with each repository
command replaced by a stand-in that writes what the real command would (the real commands have their own tests)."""
import csv
import json
import os
import re

import numpy as np
import pytest

from benchmark import fmnist


def fake_run(calls, threads=None):
    def run(cmd, log, n_threads=0):
        calls.append(cmd)
        if threads is not None:
            threads[cmd] = n_threads
        out = re.search(r"--out(?:put-dir)? (\S+)", cmd).group(1)
        if cmd.startswith(("teacher.py", "dmd.py", "add.py")):
            sub = {"teacher.py": "unet", "dmd.py": "generator", "add.py": "student"}[cmd.split()[0]]
            os.makedirs(os.path.join(out, sub), exist_ok=True)
            steps = re.findall(r"--max-steps (\d+)", cmd)[-1]   # the last one wins, as in argparse
            return 12.5, f"saved to {out} (step {steps})\n"
        if cmd.startswith("eval.py stats"):
            np.savez(out, mu=np.zeros(2048), sigma=np.eye(2048))
            return 1.0, ""
        steps = int(re.search(r"--steps (\d+)", cmd).group(1))
        rng = np.random.default_rng(len(calls))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        np.savez(out, images=(rng.random((60, 32, 32)) * 255).astype(np.uint8), labels=np.arange(60) % 10)
        return 3.0, f"60 samples -> {out}\nFID {100.0 / steps + len(calls):.4f}\n"
    return run


def test_benchmark_runs_every_stage_once_and_writes_the_table(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fmnist, "run", fake_run(calls))
    argv = ["--scale", "cpu", "--out", str(tmp_path / "w"), "--results", str(tmp_path / "r")]
    fmnist.main(argv)
    trains = [c for c in calls if not c.startswith("eval.py")]
    assert [c.split()[0] for c in trains] == ["teacher.py", "dmd.py"] + ["add.py"] * 3 + ["dmd.py"] * 3
    assert trains[1].endswith("--max-steps 0")   # the regression pairs, built once for DMD full and --no-dm
    assert sum("--no-reg" in c for c in trains) == 1 and sum("--no-dm" in c for c in trains) == 1
    assert [re.search(r"--loss (\w+)", c).group(1) for c in trains[2:5]] == ["both", "adv", "distill"]
    fids = [c for c in calls if c.startswith("eval.py generate")]
    assert len(fids) == 6 + 3 + 2 + 2 and all("--num 500 --seed 0" in c and "--crop 28" in c for c in fids)
    rows = list(csv.DictReader(open(tmp_path / "r" / "fmnist.csv")))
    assert list(rows[0]) == ["method", "variant", "steps", "fid", "train_steps", "wall_s", "device"]
    got = {(r["method"], r["variant"], int(r["steps"])) for r in rows}
    assert got == {("teacher", "full", s) for s in (1, 2, 4, 8, 16, 32)} | {("dmd", v, 1) for v in
               ("full", "no_reg", "no_dm")} | {("add", "full", 4)} | {("add", v, 1) for v in ("full", "adv", "distill")}
    dmd_full = next(r for r in rows if r["method"] == "dmd" and r["variant"] == "full")
    assert dmd_full["train_steps"] == "1200" and dmd_full["wall_s"] == "12.5" and dmd_full["device"] == "cpu"
    assert float(dmd_full["fid"]) == 100.0 + calls.index(fids[6]) + 1
    assert len(list(csv.DictReader(open(tmp_path / "r" / "fmnist_spread.csv")))) == len(rows)
    assert (tmp_path / "r" / "fmnist_samples.png").exists() and (tmp_path / "r" / "fmnist_fid_vs_steps.png").exists()
    n = len(calls)
    fmnist.main(argv)          # a re-run finds every stage done
    assert len(calls) == n
    # a stage whose output is gone trains again, and only its own rows are scored again
    state_path = tmp_path / "w" / "state.json"
    state = json.load(open(state_path))
    del state["dmd_no_reg"]
    json.dump(state, open(state_path, "w"))
    fmnist.main(argv)
    assert [c.split()[0] for c in calls[n:]] == ["dmd.py", "eval.py"] and "--no-reg" in calls[n]
    assert "dmd_no_reg" in calls[n + 1]


def test_parallel_stages_and_skip_fid(tmp_path, monkeypatch):
    """--jobs 3 runs the same commands (in another order); --skip-fid trains only, a later run scores."""
    calls = []
    monkeypatch.setattr(fmnist, "run", fake_run(calls))
    argv = ["--scale", "cpu", "--out", str(tmp_path / "w"), "--results", str(tmp_path / "r"), "--jobs", "3"]
    fmnist.main([*argv, "--skip-fid"])
    assert len(calls) == 8 and not any(c.startswith("eval.py") for c in calls)
    assert not (tmp_path / "r" / "fmnist.csv").exists()
    fmnist.main(argv)
    assert sum(c.startswith("eval.py generate") for c in calls) == 13 and len(calls) == 8 + 1 + 13
    rows = list(csv.DictReader(open(tmp_path / "r" / "fmnist.csv")))
    assert [(r["method"], r["variant"], r["steps"]) for r in rows][:7] == \
        [("teacher", "full", str(s)) for s in (1, 2, 4, 8, 16, 32)] + [("dmd", "full", "1")]
    sequential = []
    monkeypatch.setattr(fmnist, "run", fake_run(sequential))
    fmnist.main(["--scale", "cpu", "--out", str(tmp_path / "s"), "--results", str(tmp_path / "rs")])
    assert sorted(calls) == sorted(c.replace(str(tmp_path / "s"), str(tmp_path / "w")) for c in sequential)


def test_parallel_stages_share_the_cpu_threads(tmp_path, monkeypatch):
    """--jobs N gives each of the N concurrent stages cores / N threads; stages that run alone keep the default."""
    calls, threads = [], {}
    monkeypatch.setattr(fmnist, "run", fake_run(calls, threads))
    monkeypatch.setattr(fmnist.os, "cpu_count", lambda: 6)
    fmnist.main(["--scale", "cpu", "--out", str(tmp_path / "w"), "--results", str(tmp_path / "r"), "--jobs", "3"])
    alone = [c for c in calls if c.startswith(("teacher.py", "eval.py stats")) or c.endswith("--max-steps 0")]
    assert len(alone) == 3 and all(threads[c] == 0 for c in alone)
    shared = [c for c in calls if c not in alone]
    assert len(shared) == 6 + 13 and all(threads[c] == 2 for c in shared)
    calls.clear()
    fmnist.main(["--scale", "cpu", "--out", str(tmp_path / "s"), "--results", str(tmp_path / "rs"), "--jobs", "1"])
    assert all(threads[c] == 0 for c in calls)


def test_run_caps_the_threads_of_its_command(tmp_path, monkeypatch):
    """The real run(): threads > 0 sets OMP_NUM_THREADS / MKL_NUM_THREADS in the command's environment, unless
    the user set them; threads = 0 leaves the environment alone."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    show = "-c \"import os; print(os.environ.get('OMP_NUM_THREADS'), os.environ.get('MKL_NUM_THREADS'))\""
    assert fmnist.run(show, str(tmp_path / "a.log"), 3)[1].split() == ["3", "3"]
    assert fmnist.run(show, str(tmp_path / "b.log"))[1].split() == ["None", "None"]
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert fmnist.run(show, str(tmp_path / "c.log"), 3)[1].split() == ["5", "3"]


def test_benchmark_refuses_a_stage_trained_with_other_arguments(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(fmnist, "run", fake_run(calls))
    argv = ["--scale", "cpu", "--out", str(tmp_path / "w"), "--results", str(tmp_path / "r")]
    fmnist.main(argv)
    n = len(calls)
    monkeypatch.setitem(fmnist.SCALES["cpu"], "dmd", fmnist.SCALES["cpu"]["dmd"] + " --lambda-reg 1")
    with pytest.raises(SystemExit) as e:
        fmnist.main(argv)
    assert e.value.code == 2 and len(calls) == n
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dmd_full was trained with other arguments" in err


def test_sample_figure_with_few_samples_per_class(tmp_path):
    """A small --fid-num leaves some classes with fewer than 6 samples: the figure pads them, it does not fail."""
    args = fmnist.parse_args(["--scale", "cpu", "--out", str(tmp_path), "--results", str(tmp_path / "r")])
    rows = {}
    for m, v, s in [("teacher", "full", 32), ("dmd", "full", 1), ("add", "full", 1), ("add", "full", 4)]:
        os.makedirs(tmp_path / "samples", exist_ok=True)
        np.savez(tmp_path / "samples" / f"{m}_{v}_{s}.npz", images=np.full((13, 32, 32), 200, np.uint8),
                 labels=np.arange(13) % 10)
        rows[(m, v, s)] = {"fid": "1.0"}
    rows[("teacher", "full", 1)] = {"fid": "2.0"}
    args.fid_num = 13
    fmnist.figures(rows, args)
    assert (tmp_path / "r" / "fmnist_samples.png").exists()


def test_within_class_spread_matches_a_direct_pairwise_computation():
    rng = np.random.default_rng(0)
    ims, labels = (rng.random((30, 4, 4)) * 255).astype(np.uint8), rng.integers(0, 3, 30)
    x = ims.reshape(30, -1) / 255
    want = np.mean([np.mean([((x[i] - x[j]) ** 2).mean() for i in np.flatnonzero(labels == c)
                             for j in np.flatnonzero(labels == c) if i != j]) for c in range(3)])
    assert fmnist.within_class_spread(ims, labels) == pytest.approx(want, rel=1e-12)
    same = np.repeat(ims[:1], 30, 0)            # one template per class -> 0
    assert fmnist.within_class_spread(same, labels) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("flags", [["--jobs", "0"], ["--jobs", "-2"], ["--fid-num", "1"], ["--scale", "tpu"]])
def test_bad_flags_are_one_line_errors(flags, tmp_path, capsys, monkeypatch):
    """A bad flag stops before any stage runs (--jobs 0 used to fall back to the default and start training)."""
    def no_stage(cmd, log, threads=0):
        raise AssertionError(f"a stage ran: {cmd}")
    monkeypatch.setattr(fmnist, "run", no_stage)
    with pytest.raises(SystemExit) as e:
        fmnist.main(["--out", str(tmp_path / "w"), *flags])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "error" in err
    assert not (tmp_path / "w").exists()
