"""benchmark/fmnist.py: the orchestration (stages, skip-if-done, CSV rows, figures), with each repository
command replaced by a stand-in that writes what the real command would (the real commands have their own tests)."""
import csv
import json
import os
import re
import zlib

import numpy as np
import pytest
import torch

from benchmark import fmnist


def fake_run(calls, threads=None, stable=False):
    """A stand-in for fmnist.run. stable: FD_FMNIST from the sample file's name instead of the call count, so that
    stages run in any order (--jobs) score alike and pick the same FID rows."""
    def run(cmd, log, n_threads=0):
        calls.append(cmd)
        if threads is not None:
            threads[cmd] = n_threads
        if cmd.startswith("eval.py domain"):   # FD falls with the sampling steps and with the call count
            npz = re.search(r"--samples (\S+)", cmd).group(1)
            steps = int(re.search(r"_(\d+)\.npz", npz).group(1))
            extra = zlib.crc32(os.path.basename(npz).encode()) % 97 if stable else len(calls)
            return 1.0, f"SPREAD 0.05000\nFD_FMNIST {10.0 / steps + extra:.4f} PRECISION 0.7000 RECALL 0.6000 " \
                        "ACCURACY 0.9000\n"
        if cmd.startswith("eval.py fid"):
            return 1.0, f"FID {100.0 + len(calls):.4f}\n"
        out = re.search(r"--out(?:put-dir)? (\S+)", cmd).group(1)
        if cmd.startswith(("teacher.py", "dmd.py", "add.py")):
            sub = {"teacher.py": "unet", "dmd.py": "generator", "add.py": "student"}[cmd.split()[0]]
            os.makedirs(os.path.join(out, sub), exist_ok=True)
            steps = re.findall(r"--max-steps (\d+)", cmd)[-1]   # the last one wins, as in argparse
            return 12.5, f"saved to {out} (step {steps})\n"
        if cmd.startswith("eval.py stats"):
            np.savez(out, mu=np.zeros(2048), sigma=np.eye(2048))
            return 1.0, ""
        rng = np.random.default_rng(len(calls))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        np.savez(out, images=(rng.random((60, 32, 32)) * 255).astype(np.uint8), labels=np.arange(60) % 10)
        return 3.0, f"60 samples -> {out}\n"
    return run


ALL_ROWS = {("teacher", "full", s) for s in (1, 2, 4, 8, 16, 32)} | {("add", "full", 4)} \
    | {("dmd", v, 1) for v in ("full", "no_reg", "no_dm")} | {("add", v, 1) for v in ("full", "adv", "distill")}


@pytest.mark.slow
def test_benchmark_runs_every_stage_once_and_writes_the_table(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fmnist, "run", fake_run(calls))
    argv = ["--scale", "cpu", "--out", str(tmp_path / "w"), "--results", str(tmp_path / "r"), "--retrain-teacher"]
    fmnist.main(argv)
    trains = [c for c in calls if not c.startswith("eval.py")]
    assert [c.split()[0] for c in trains] == ["teacher.py", "dmd.py"] + ["add.py"] * 3 + ["dmd.py"] * 3
    assert trains[1].endswith("--max-steps 0")   # the regression pairs, built once for DMD full and --no-dm
    assert sum("--no-reg" in c for c in trains) == 1 and sum("--no-dm" in c for c in trains) == 1
    assert [re.search(r"--loss (\w+)", c).group(1) for c in trains[2:5]] == ["both", "adv", "distill"]
    gens = [c for c in calls if c.startswith("eval.py generate")]
    assert len(gens) == 13 and all("--num 2000 --seed 0" in c for c in gens)
    doms = [c for c in calls if c.startswith("eval.py domain")]
    assert len(doms) == 13 and all("--ref fashion-mnist-test --ref-num 2000 --crop 28" in c for c in doms)
    fids = [c for c in calls if c.startswith("eval.py fid")]   # CPU: the best teacher row and the full rows
    assert len(fids) == 3 and all("--crop 28" in c for c in fids)
    rows = list(csv.DictReader(open(tmp_path / "r" / "fmnist.csv")))
    best = min((r for r in rows if r["method"] == "teacher"), key=lambda r: float(r["fd_fmnist"]))
    assert f"teacher_full_{best['steps']}.npz" in fids[0] and "dmd_full_1" in fids[1] and "add_full_1" in fids[2]
    assert list(rows[0]) == fmnist.FIELDS
    assert {(r["method"], r["variant"], int(r["steps"])) for r in rows} == ALL_ROWS
    dmd_full = next(r for r in rows if r["method"] == "dmd" and r["variant"] == "full")
    assert dmd_full["train_steps"] == "1200" and dmd_full["wall_s"] == "12.5" and dmd_full["device"] == "cpu"
    assert dmd_full["seed"] == "0" and dmd_full["teacher"] == "retrained-seed0" and dmd_full["recall"] == "0.6000"
    assert float(dmd_full["fd_fmnist"]) == 10.0 + calls.index(doms[6]) + 1
    assert float(dmd_full["fid"]) == 100.0 + calls.index(fids[1]) + 1
    assert sum(r["fid"] != "" for r in rows) == 3
    assert (tmp_path / "r" / "fmnist_samples.png").exists() and (tmp_path / "r" / "fmnist_fd_vs_steps.png").exists()
    n = len(calls)
    fmnist.main(argv)          # a re-run finds every stage done
    assert len(calls) == n
    # a stage whose output is gone trains again, and only its own rows are scored again
    state_path = tmp_path / "w" / "state.json"
    state = json.load(open(state_path))
    del state["dmd_no_reg"]
    json.dump(state, open(state_path, "w"))
    fmnist.main(argv)
    assert [c.split()[:2] for c in calls[n:]] == [["dmd.py", "--output-dir"], ["eval.py", "domain"]]
    assert "--no-reg" in calls[n] and "dmd_no_reg" in calls[n + 1]


@pytest.mark.slow
def test_shipped_teacher_is_used_and_a_second_seed_adds_its_own_rows(tmp_path, monkeypatch):
    """With benchmark/models/fmnist-cpu/ present, no teacher.py runs: the students train on the shipped folder
    and the teacher rows carry its steps and name. --seed 1 trains the students again in their own folder and
    adds seed-1 student rows beside the seed-0 ones (the shipped teacher's rows are scored once)."""
    calls = []
    monkeypatch.setattr(fmnist, "run", fake_run(calls))
    models = tmp_path / "models"
    (models / "fmnist-cpu").mkdir(parents=True)
    json.dump({"train_steps": 6000, "wall_s": 7000.0, "seed": 0, "command": "teacher.py ..."},
              open(models / "fmnist-cpu" / "teacher_info.json", "w"))
    monkeypatch.setattr(fmnist, "MODELS", str(models))
    res = ["--scale", "cpu", "--results", str(tmp_path / "r")]
    fmnist.main([*res, "--out", str(tmp_path / "w0"), "--teacher-only"])   # the teacher's rows alone first
    assert [c.split()[1] for c in calls] == ["generate", "domain"] * 6 + ["stats", "fid"]
    fmnist.main([*res, "--out", str(tmp_path / "w0")])
    assert not any(c.startswith("teacher.py") for c in calls)
    assert sum(c.startswith("eval.py generate --teacher") for c in calls) == 6     # not scored twice
    assert all(f"--teacher {models / 'fmnist-cpu'}" in c for c in calls if c.startswith(("add.py", "dmd.py")))
    fmnist.main([*res, "--out", str(tmp_path / "w1"), "--seed", "1"])
    rows = list(csv.DictReader(open(tmp_path / "r" / "fmnist.csv")))
    teacher = [r for r in rows if r["method"] == "teacher"]
    assert len(teacher) == 6 and {(r["teacher"], r["train_steps"], r["seed"]) for r in teacher} == \
        {("fmnist-cpu", "6000", "0")}
    students = [r for r in rows if r["method"] != "teacher"]
    assert sorted(r["seed"] for r in students) == ["0"] * 7 + ["1"] * 7
    assert sum(r["fid"] != "" for r in rows) == 3 + 2     # seed 1: its two full rows


@pytest.mark.slow
def test_parallel_stages_and_skip_fid(tmp_path, monkeypatch):
    """--jobs 3 runs the same commands (in another order); --skip-fid trains only, a later run scores."""
    calls = []
    monkeypatch.setattr(fmnist, "run", fake_run(calls, stable=True))
    argv = ["--scale", "cpu", "--out", str(tmp_path / "w"), "--results", str(tmp_path / "r"), "--jobs", "3",
            "--retrain-teacher"]
    fmnist.main([*argv, "--skip-fid"])
    assert len(calls) == 8 and not any(c.startswith("eval.py") for c in calls)
    assert not (tmp_path / "r" / "fmnist.csv").exists()
    fmnist.main(argv)
    assert sum(c.startswith("eval.py generate") for c in calls) == 13 and len(calls) == 8 + 13 + 13 + 1 + 3
    rows = list(csv.DictReader(open(tmp_path / "r" / "fmnist.csv")))
    assert [(r["method"], r["variant"], r["steps"]) for r in rows][:7] == \
        [("teacher", "full", str(s)) for s in (1, 2, 4, 8, 16, 32)] + [("dmd", "full", "1")]
    sequential = []
    monkeypatch.setattr(fmnist, "run", fake_run(sequential, stable=True))
    fmnist.main(["--scale", "cpu", "--out", str(tmp_path / "s"), "--results", str(tmp_path / "rs"),
                 "--retrain-teacher"])
    assert sorted(calls) == sorted(c.replace(str(tmp_path / "s"), str(tmp_path / "w")) for c in sequential)


@pytest.mark.slow
def test_parallel_stages_share_the_cpu_threads(tmp_path, monkeypatch):
    """--jobs N gives each of the N concurrent stages cores / N threads; stages that run alone keep the default."""
    calls, threads = [], {}
    monkeypatch.setattr(fmnist, "run", fake_run(calls, threads))
    monkeypatch.setattr(fmnist.os, "cpu_count", lambda: 6)
    fmnist.main(["--scale", "cpu", "--out", str(tmp_path / "w"), "--results", str(tmp_path / "r"), "--jobs", "3",
                 "--retrain-teacher"])
    alone = [c for c in calls if c.startswith(("teacher.py", "eval.py stats")) or c.endswith("--max-steps 0")]
    assert len(alone) == 3 and all(threads[c] == 0 for c in alone)
    shared = [c for c in calls if c not in alone]
    assert len(shared) == 6 + 13 + 13 + 3 and all(threads[c] == 2 for c in shared)
    calls.clear()
    fmnist.main(["--scale", "cpu", "--out", str(tmp_path / "s"), "--results", str(tmp_path / "rs"), "--jobs", "1",
                 "--retrain-teacher"])
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


@pytest.mark.slow
def test_benchmark_refuses_a_stage_trained_with_other_arguments(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(fmnist, "run", fake_run(calls))
    argv = ["--scale", "cpu", "--out", str(tmp_path / "w"), "--results", str(tmp_path / "r"), "--retrain-teacher"]
    fmnist.main(argv)
    n = len(calls)
    monkeypatch.setitem(fmnist.SCALES["cpu"], "dmd", fmnist.SCALES["cpu"]["dmd"] + " --lambda-reg 1")
    with pytest.raises(SystemExit) as e:
        fmnist.main(argv)
    assert e.value.code == 2 and len(calls) == n
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dmd_full was trained with other arguments" in err


@pytest.mark.slow
def test_sample_figure_with_few_samples_per_class(tmp_path):
    """A small --num leaves some classes with fewer than 6 samples: the figure pads them, it does not fail."""
    args = fmnist.parse_args(["--scale", "cpu", "--out", str(tmp_path), "--results", str(tmp_path / "r")])
    rows = {}
    for m, v, s in [("teacher", "full", 32), ("dmd", "full", 1), ("add", "full", 1), ("add", "full", 4)]:
        os.makedirs(tmp_path / "samples", exist_ok=True)
        np.savez(tmp_path / "samples" / f"{m}_{v}_{s}.npz", images=np.full((13, 32, 32), 200, np.uint8),
                 labels=np.arange(13) % 10)
        rows[(m, v, s, 0)] = {"fd_fmnist": "1.0", "recall": "0.5"}
    rows[("teacher", "full", 1, 0)] = {"fd_fmnist": "2.0", "recall": "0.1"}
    args.num = 13
    fmnist.figures(rows, args)
    assert (tmp_path / "r" / "fmnist_samples.png").exists() and (tmp_path / "r" / "fmnist_fd_vs_steps.png").exists()


@pytest.mark.parametrize("flags", [["--jobs", "0"], ["--jobs", "-2"], ["--num", "3"], ["--scale", "tpu"]])
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


@pytest.mark.slow
def test_ship_teacher_writes_fp16_weights_that_load_as_the_same_fp32_model(tmp_path, monkeypatch):
    from diffusers import DDPMScheduler, UNet2DModel
    from safetensors.torch import load_file
    run_dir = tmp_path / "run"
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=10)
    unet.save_pretrained(run_dir / "unet")
    DDPMScheduler(prediction_type="v_prediction").save_pretrained(run_dir / "scheduler")
    (run_dir / "log.csv").write_text("step,loss\n50,0.2\n100,0.1\n")
    monkeypatch.setattr(fmnist, "MODELS", str(tmp_path / "models"))
    fmnist.main(["--scale", "cpu", "--ship-teacher", str(run_dir), "--teacher-command", "teacher.py --x",
                 "--teacher-wall-s", "60"])
    dest = tmp_path / "models" / "fmnist-cpu"
    info = json.load(open(dest / "teacher_info.json"))
    assert info["train_steps"] == 100 and info["command"] == "teacher.py --x" and info["wall_s"] == 60
    assert all(v.dtype == torch.float16 for v in load_file(dest / "unet" / "diffusion_pytorch_model.safetensors")
               .values())
    back = UNet2DModel.from_pretrained(dest / "unet")
    for (k, a), b in zip(unet.state_dict().items(), back.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a.half().float(), b), k
    assert (dest / "scheduler" / "scheduler_config.json").exists()
    fmnist.main(["--scale", "cpu", "--ship-teacher", str(run_dir), "--teacher-command", "teacher.py --unconditional",
                 "--teacher-wall-s", "60", "--ship-as", "fmnist-cpu-uncond"])   # beside it, under its own name
    assert json.load(open(tmp_path / "models" / "fmnist-cpu-uncond" / "teacher_info.json"))["command"] == \
        "teacher.py --unconditional" and json.load(open(dest / "teacher_info.json"))["command"] == "teacher.py --x"
