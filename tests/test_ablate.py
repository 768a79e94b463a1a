"""benchmark/ablate.py: a named run's command, its exports scored once each, rows kept across runs; each repository
command replaced by a stand-in that writes what the real one would (the real commands have their own tests)."""
import csv
import json
import os
import re
import sys

import numpy as np
import pytest

from benchmark import ablate


def fake_run(calls):
    def run(cmd, log, threads=0):
        calls.append(cmd)
        if cmd.startswith("eval.py domain"):
            with np.load(re.search(r"--samples (\S+)", cmd).group(1)) as d:
                tail = "ACCURACY 0.9000" if "labels" in d else "COVERAGE 0.4000"
            return 1.0, f"SPREAD 0.05000\nCLASS SHARES {' '.join(['0.100'] * 10)} (predicted classes 0-9)\n" \
                f"FD_FMNIST {len(calls):.4f} PRECISION 0.7000 RECALL 0.6000 {tail}\n"
        if cmd.startswith("eval.py generate"):   # a teacher named *uncond*: samples without labels
            rng = np.random.default_rng(len(calls))
            np.savez(re.search(r"--out (\S+)", cmd).group(1), **({} if "uncond" in cmd else
                                                                  {"labels": np.arange(60) % 10}),
                     images=(rng.random((60, 32, 32)) * 255).astype(np.uint8))
            return 1.0, ""
        out = re.search(r"--output-dir (\S+)", cmd).group(1)
        sub = "generator" if cmd.startswith("dmd.py") else "student"
        steps = int(re.findall(r"--max-steps (\d+)", cmd)[-1])   # the last one wins, as in argparse
        os.makedirs(os.path.join(out, sub), exist_ok=True)
        every = re.findall(r"--export-every (\d+)", cmd)
        for s in range(int(every[0]), steps, int(every[0])) if every and steps else []:
            os.makedirs(os.path.join(out, f"{sub}_{s:07d}"), exist_ok=True)
        with open(os.path.join(out, "log.csv"), "w") as f:
            f.write("step,loss\n" + "".join(f"{s},0.1\n" for s in range(1, steps + 1)))
        return 20.0, f"saved (step {steps})\n"
    return run


def patch_run(monkeypatch, calls):
    """Stand-ins for ablate.py's training commands and for the scoring commands it runs through fmnist.py."""
    fake = fake_run(calls)
    monkeypatch.setattr(ablate, "run", fake)
    monkeypatch.setattr(sys.modules[ablate.domain_scores.__module__], "run", fake)


@pytest.mark.slow
def test_a_run_scores_every_export_once_and_keeps_other_rows(tmp_path, monkeypatch):
    calls = []
    patch_run(monkeypatch, calls)
    csv_path = tmp_path / "ablations.csv"
    common = ["--out", str(tmp_path / "runs"), "--results", str(csv_path)]
    ablate.main(["dmd", "no_reg", "--every", "2", *common, "--", "--no-reg", "--max-steps", "5"])
    train = [c for c in calls if c.startswith("dmd.py") and "--max-steps 0" not in c]
    assert len(train) == 1 and train[0].endswith("--export-every 2 --no-reg --max-steps 5")   # extra flags last
    assert any("--max-steps 0" in c and "--pairs-dir" in c for c in calls)   # the shared regression pairs, built once
    rows = list(csv.DictReader(open(csv_path)))
    assert [(r["name"], r["train_steps"], r["sampling_steps"]) for r in rows] == \
        [("no_reg", "2", "1"), ("no_reg", "4", "1"), ("no_reg", "5", "1")]
    assert rows[-1]["wall_s"] == "20.0" and rows[0]["wall_s"] == "" and "--no-reg" in rows[0]["flags"]
    assert (tmp_path / "ablations_curves.png").exists()   # three exports of one run: a curve
    assert (tmp_path / "ablations_samples.png").exists()   # and its final samples in the figure
    n = len(calls)
    ablate.main(["dmd", "no_reg", "--every", "2", *common, "--", "--no-reg", "--max-steps", "5"])
    assert len(calls) == n   # trained and scored: nothing runs again
    ablate.main(["add", "full", "--sampling-steps", "1", "4", "--seed", "1", *common, "--", "--max-steps", "3"])
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 5 and [(r["method"], r["seed"], r["sampling_steps"]) for r in rows[3:]] == \
        [("add", "1", "1"), ("add", "1", "4")]
    assert not any("--pairs-dir" in c for c in calls[n:])
    n = len(calls)   # pairs of a longer ODE: their own folder, built with that --ode-steps
    ablate.main(["dmd", "ode32", *common, "--", "--ode-steps", "32", "--max-steps", "3"])
    build = [c for c in calls[n:] if "--max-steps 0" in c]
    assert len(build) == 1 and "dmd_pairs_ode32 " in build[0] and build[0].endswith("--ode-steps 32 --max-steps 0")
    train = [c for c in calls[n:] if c.startswith("dmd.py") and "--max-steps 0" not in c]
    assert "dmd_pairs_ode32 " in train[0] and train[0].endswith("--ode-steps 32 --max-steps 3")
    ablate.main(["dmd", "few", "--every", "2", "--score-every", "4", *common, "--", "--max-steps", "7"])
    rows = list(csv.DictReader(open(csv_path)))   # exports at 2, 4, 6 and the final 7: only 4 and 7 scored
    assert [r["train_steps"] for r in rows if r["name"] == "few"] == ["4", "7"]


@pytest.mark.slow
def test_another_teacher_has_its_own_folders_pairs_and_rows_with_coverage(tmp_path, monkeypatch):
    calls = []
    patch_run(monkeypatch, calls)
    teacher = tmp_path / "fmnist-cpu-uncond"
    (teacher / "unet").mkdir(parents=True)
    json.dump({"train_steps": 7}, open(teacher / "teacher_info.json", "w"))
    csv_path = tmp_path / "ablations.csv"
    common = ["--out", str(tmp_path / "runs"), "--results", str(csv_path)]
    ablate.main(["teacher", "heun", "--sampling-steps", "2", "4", "--teacher", str(teacher), *common])
    ablate.main(["dmd", "full", "--teacher", str(teacher), *common, "--", "--max-steps", "3"])
    ablate.main(["dmd", "full", *common, "--", "--max-steps", "3"])   # the same name on the default teacher
    rows = list(csv.DictReader(open(csv_path)))
    assert [(r["method"], r["train_steps"], r["sampling_steps"], r["teacher"]) for r in rows] == \
        [("teacher", "7", "2", "fmnist-cpu-uncond"), ("teacher", "7", "4", "fmnist-cpu-uncond"),
         ("dmd", "3", "1", "fmnist-cpu-uncond"), ("dmd", "3", "1", "fmnist-cpu")]
    assert [(r["accuracy"], r["coverage"]) for r in rows] == [("", "0.4000")] * 3 + [("0.9000", "")]
    assert rows[2]["class_shares"] == " ".join(["0.100"] * 10)
    gen = [c for c in calls if c.startswith("eval.py generate")]
    assert gen[0].startswith(f"eval.py generate --teacher {teacher} --steps 2")   # the teacher itself, no training
    pairs = [re.search(r"--pairs-dir (\S+)", c).group(1) for c in calls if "--max-steps 0" in c]
    assert [os.path.basename(p) for p in pairs] == ["dmd_pairs_fmnist-cpu-uncond", "dmd_pairs"]   # one set each
    assert (tmp_path / "runs" / "dmd_full_fmnist-cpu-uncond_seed0" / "generator").exists()
    assert (tmp_path / "ablations_samples_fmnist-cpu-uncond.png").exists()   # rows = predicted classes


@pytest.mark.slow
def test_a_continued_run_scores_its_new_final_export_with_new_samples(tmp_path, monkeypatch):
    """Continuing a finished run to more steps (its final export renamed generator_STEP, --max-steps raised) must
    not score the new final export with the old one's cached samples."""
    calls = []
    patch_run(monkeypatch, calls)
    common = ["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "a.csv")]
    ablate.main(["dmd", "full", *common, "--", "--max-steps", "3"])
    run_dir = tmp_path / "runs" / "dmd_full_seed0"
    os.rename(run_dir / "generator", run_dir / "generator_0000003")
    (run_dir / "checkpoint.pt").write_text("")
    (run_dir / "scores" / "generator_0000002_1step.npz").write_text("")   # a numbered export's samples: kept
    ablate.main(["dmd", "full", *common, "--", "--max-steps", "5"])
    assert (run_dir / "scores" / "generator_0000002_1step.npz").exists()
    final = [c for c in calls if c.startswith(f"eval.py generate --generator {run_dir / 'generator'} ")]
    assert len(final) == 2 and "--resume" in [c for c in calls if c.startswith("dmd.py")][-1]
    rows = list(csv.DictReader(open(tmp_path / "a.csv")))
    assert [r["train_steps"] for r in rows] == ["3", "5"] and rows[0]["fd_fmnist"] != rows[1]["fd_fmnist"]


@pytest.mark.parametrize("argv,msg", [(["dmd", "a b"], "letters, digits"), (["sgd", "x"], "invalid choice"),
                                      (["add", "x", "--teacher", "/nonexistent"], "no unet/ folder")])
def test_bad_input_is_one_line_exit_2(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        ablate.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, err


def test_the_script_entry_point_comes_after_every_definition():
    """`python benchmark/ablate.py` runs main() at import time of the last statement: a helper defined after it
    would be missing when main() calls it (this happened once)."""
    import ast
    tree = ast.parse(open(ablate.__file__).read())
    assert isinstance(tree.body[-1], ast.If) and "__main__" in ast.unparse(tree.body[-1].test)
