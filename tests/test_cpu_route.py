"""The reader without a GPU: the README's CPU commands run as written (at tiny size), a missing folder is named at
once by the script that was called, and no run is lost by running again into its folder."""
import concurrent.futures
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dmd

ROOT = Path(__file__).resolve().parents[1]
TINY = {"dmd.py": "--max-steps 2 --num-pairs 4 --ode-steps 2 --shard-size 4 --batch-size 4 --sample-every 1",
        "add.py": "--max-steps 2 --batch-size 4 --disc-size 32 --sample-every 1 --pairs 40 --shard-size 40 "
                  "--ode-steps 2 --score-num 8"}


def readme_cpu_commands():
    """The lines of the first bash block under '## Without a GPU' in the README, comments dropped."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Without a GPU\n.*?```bash\n(.*?)```", text, re.S).group(1)
    return [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.strip()]


@pytest.mark.slow
def test_readme_cpu_commands_run_as_written_at_tiny_size(tmp_path):
    """Each command, copied from the README, with only tiny sizes added (fewer steps, samples and pairs), in a fresh
    folder: every one exits 0, the trainings print the lines that score them (add.py: its recipe, then its scores at
    1 and 4 steps), and the scores come out. (add.py runs beside the DMD commands, which run in order.)"""
    cmds = readme_cpu_commands()
    assert [c.split()[1] for c in cmds] == ["dmd.py", "eval.py", "eval.py", "sample.py", "add.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def argv(cmd):
        script = cmd.split()[1]
        for big, tiny in (("--num 2000", "--num 8"), ("--ref-num 2000", "--ref-num 8"), ("--num 16", "--num 4")):
            cmd = cmd.replace(big, tiny)
        return [sys.executable, str(ROOT / script), *cmd.split()[2:], *TINY.get(script, "").split()]

    def chain(cmds):   # in order: each command needs the one before
        outs = []
        for cmd in cmds:
            r = subprocess.run(argv(cmd), cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
            assert r.returncode == 0, f"{cmd}\n{r.stderr[-2000:]}"
            outs.append(r.stdout)
        return outs

    with concurrent.futures.ThreadPoolExecutor(1) as pool:   # ADD (it scores itself) beside DMD's chain
        add = pool.submit(chain, cmds[4:])
        dmd = chain(cmds[:4])
        add = add.result(timeout=600)[0]
    score = r"FD_FMNIST [0-9.]+ PRECISION [0-9.]+ RECALL [0-9.]+ ACCURACY [0-9.]+"
    assert "score it: python eval.py generate --generator runs/dmd/generator" in dmd[0] and re.search(score, dmd[2])
    assert (tmp_path / "runs" / "dmd" / "sneakers" / "grid.png").exists()
    assert "--teacher fmnist: the CPU recipe --loss adv" in add and "--paper-losses" in add
    for n in ("1 step", "4 steps"):
        assert re.search(rf"student at {n} \(8 samples vs as many test images\): {score}", add), add


def test_a_missing_local_folder_is_named_at_once_by_the_script_called(tmp_path):
    """For each script, a --teacher / --generator / --student-init path that looks local and is not there: one line
    naming the script and "no such folder", exit 2, in under 5 s (before any hub lookup). One at a time (beside a
    pytest -n 2 worker: two processes on two cores)."""
    cases = [["dmd.py", "--teacher", "./nope"], ["add.py", "--teacher", "runs/teacher"],
             ["sample.py", "--generator", "runs/x/generator"],
             ["eval.py", "generate", "--teacher", "./nope", "--out", "x.npz"],
             ["sample.py", "--teacher", "nope/a/b"], ["add.py", "--teacher", "fmnist", "--student-init", "./nope"]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for pair in ([c] for c in cases):
        t0 = time.time()
        procs = [subprocess.Popen([sys.executable, str(ROOT / c[0]), *c[1:]], cwd=tmp_path, stderr=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, text=True, env=env) for c in pair]
        for c, p in zip(pair, procs):
            err = p.communicate(timeout=60)[1].strip()
            assert p.returncode == 2 and time.time() - t0 < 5, (c, time.time() - t0, err)
            assert err.startswith(f"{c[0]}: error: ") and "no such folder" in err and len(err.splitlines()) == 1, err


def run(out, teacher, *extra):
    argv = ["--teacher", teacher, "--output-dir", str(out), "--reg-loss", "l2", "--max-steps", "2", "--batch-size", "2",
            "--num-pairs", "4", "--shard-size", "4", "--ode-steps", "2", "--sample-every", "1", "--device", "cpu",
            *extra]
    return dmd.train(dmd.parse_args(argv))


@pytest.mark.slow
def test_a_used_output_dir_needs_resume_or_overwrite(tiny_teachers, tmp_path, capsys):
    """A second run into a folder that holds a checkpoint, without --resume or --overwrite: exit 2 in one line, the
    first run's checkpoint byte for byte as it was; --overwrite starts afresh (old grids, log, exports gone)."""
    out = tmp_path / "run"
    run(out, tiny_teachers["vp_class"])
    before = (out / "checkpoint.pt").read_bytes()
    (out / "samples_0000099.png").write_bytes(b"an old grid")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(out, tiny_teachers["vp_class"], "--max-steps", "1")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "add --resume to continue it, or --overwrite" in err and len(err.splitlines()) == 1
    assert (out / "checkpoint.pt").read_bytes() == before and (out / "samples_0000099.png").exists()
    history = run(out, tiny_teachers["vp_class"], "--max-steps", "1", "--overwrite")
    assert [h["step"] for h in history] == [1]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
    assert sorted(p.name for p in out.glob("samples_*.png")) == ["samples_0000001.png"]
    assert (out / "pairs").is_dir()   # the reusable regression pairs stay


@pytest.mark.slow
def test_a_fresh_run_in_a_folder_without_checkpoint_removes_stale_grids(tiny_teachers, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "samples_0000500.png").write_bytes(b"left by a run stopped before its first checkpoint")
    run(out, tiny_teachers["vp_class"], "--max-steps", "1")
    assert sorted(p.name for p in out.glob("samples_*.png")) == ["samples_0000001.png"]
