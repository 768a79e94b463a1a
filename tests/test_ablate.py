"""benchmark/ablate.py: a named run's command, its exports scored once each, rows kept across runs; each repository
command replaced by a stand-in that writes what the real one would (the real commands have their own tests)."""
import csv
import os
import re

import numpy as np
import pytest

from benchmark import ablate


def fake_run(calls):
    def run(cmd, log, threads=0):
        calls.append(cmd)
        if cmd.startswith("eval.py domain"):
            return 1.0, f"SPREAD 0.05000\nFD_FMNIST {len(calls):.4f} PRECISION 0.7000 RECALL 0.6000 ACCURACY 0.9000\n"
        if cmd.startswith("eval.py generate"):
            rng = np.random.default_rng(len(calls))
            np.savez(re.search(r"--out (\S+)", cmd).group(1), labels=np.arange(60) % 10,
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


def test_a_run_scores_every_export_once_and_keeps_other_rows(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ablate, "run", fake_run(calls))
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
