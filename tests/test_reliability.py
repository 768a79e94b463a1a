"""Runs that survive (issue 17): non-finite losses, damaged checkpoints, pre-emption, safe loading, bad input.
Exit codes: 2 a user mistake (one line), 3 non-finite losses, 143 pre-empted (checkpointed)."""
import ast
import csv
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import add
import dmd
import teacher

ROOT = Path(__file__).resolve().parents[1]
TEACHER_TINY = ["--dataset", "fashion-mnist", "--limit", "16", "--batch-size", "2", "--channels", "8", "16",
                "--layers-per-block", "1", "--attention", "lowest", "--ema", "0.9", "--log-every", "1",
                "--sample-every", "100", "--grid-steps", "1", "--ckpt-every", "1", "--device", "cpu"]


def dmd_argv(tiny_teachers, out, *extra):
    """The cheapest DMD run: unconditional EDM teacher, no regression pairs, batch 2."""
    return ["--teacher", tiny_teachers["edm_uncond"], "--output-dir", str(out), "--no-reg", "--max-steps", "2",
            "--batch-size", "2", "--log-every", "1", "--sample-every", "100", "--ckpt-every", "1", "--device", "cpu",
            *extra]


def add_argv(w, out, *extra):
    return ["--teacher", w["pix"], "--data", w["cls"], "--disc-backbone", w["dino"], "--output-dir", str(out),
            "--max-steps", "2", "--batch-size", "2", "--log-every", "1", "--sample-every", "100", "--ckpt-every", "1",
            "--device", "cpu", "--resolution", "16", "--loss", "distill", *extra]


def exits(main, argv, capsys):
    """Run main(argv), which must exit: -> (exit code, the last stderr line, all stderr)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    return e.value.code, err.strip().splitlines()[-1], err


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- 1. non-finite losses
@pytest.mark.slow
def test_huge_learning_rate_stops_with_exit_3_keeps_the_checkpoint_and_exports_nothing(tiny_teachers, tmp_path,
                                                                                        capsys):
    """--lr 1e4: step 1 is finite, its update blows the fake score up, so step 2 on is nan: no update, and the
    second bad step in a row (more than --max-bad-steps 1) ends the run with exit code 3."""
    code, line, err = exits(dmd.main, dmd_argv(tiny_teachers, tmp_path, "--max-steps", "10", "--lr", "1e4",
                                               "--warmup", "1", "--max-bad-steps", "1"), capsys)
    assert code == 3 and "step 3: loss_dm is not finite, 2 steps in a row" in line and "step 1" in line, err
    assert "Traceback" not in err
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 1 and all(torch.isfinite(v).all() for v in ck["gen"].values())
    assert not (tmp_path / "generator").exists()
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [(r["step"], r["skipped"]) for r in rows] == [("1", "0"), ("2", "1"), ("3", "2")]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["add", "teacher"])
def test_a_nan_loss_applies_no_update_and_stops_add_and_teacher(tiny_add_world, tmp_path, capsys, monkeypatch,
                                                                 script):
    """A nan loss (injected) with --max-bad-steps 0: exit code 3 at step 1, no checkpoint and no export."""
    if script == "add":
        monkeypatch.setattr(add, "score_distillation_loss", lambda x, t, c: (x * float("nan")).mean())
        main, argv, export = add.main, add_argv(tiny_add_world, tmp_path, "--max-bad-steps", "0"), "student"
    else:
        real = teacher.F.mse_loss
        monkeypatch.setattr(teacher.F, "mse_loss", lambda a, b: real(a, b) * float("nan"))
        main, argv, export = teacher.main, [*TEACHER_TINY, "--output-dir", str(tmp_path), "--max-steps", "3",
                                            "--max-bad-steps", "0"], "unet"
    code, line, err = exits(main, argv, capsys)
    assert code == 3 and "step 1: loss" in line and "no checkpoint" in line, err
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / export).exists()


# ---------------------------------------------------------------- 2. checkpoints that can always be resumed
@pytest.mark.slow
def test_damaged_or_mismatched_checkpoint_is_one_line_and_the_prev_fallback_resumes(tiny_teachers, tmp_path, capsys):
    first = dmd.train(dmd.parse_args(dmd_argv(tiny_teachers, tmp_path)))
    capsys.readouterr()
    ckpt, prev = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    assert torch.load(prev, weights_only=True)["step"] == 1 and torch.load(ckpt, weights_only=True)["step"] == 2
    # another teacher, or networks of another shape (an EMA the checkpoint has not got): named, exit 2
    code, line, err = exits(dmd.main, dmd_argv(tiny_teachers, tmp_path, "--resume", "--teacher",
                                               tiny_teachers["vp_class"]), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(ckpt) in line and "--teacher" in line, err
    code, line, err = exits(dmd.main, dmd_argv(tiny_teachers, tmp_path, "--resume", "--ema", "0.9"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not fit this run" in line, err
    # a truncated checkpoint.pt: one line that names checkpoint.prev.pt and the flag that resumes from it
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    code, line, err = exits(dmd.main, dmd_argv(tiny_teachers, tmp_path, "--resume"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"cannot resume from {ckpt}: unreadable" in line and f"--resume-from {prev}" in line, err
    # ... which repeats step 2 exactly
    again = dmd.train(dmd.parse_args(dmd_argv(tiny_teachers, tmp_path, "--resume-from", str(prev))))
    assert again == first and len(again) == 2


# ---------------------------------------------------------------- 3. pre-emption
@pytest.mark.slow
def test_sigterm_mid_run_checkpoints_exits_143_and_resume_is_exact(tiny_teachers, tmp_path):
    """A subprocess gets SIGTERM after its first step: it finishes the step, checkpoints (RNG included), exports
    nothing and exits 143; --resume then gives the losses and weights of an uninterrupted run, bit for bit."""
    extra = ["--max-steps", "3", "--ckpt-every", "100", "--ema", "0.9", "--lr-fake", "1e-3"]
    argv = dmd_argv(tiny_teachers, tmp_path / "b", *extra)
    with open(tmp_path / "err.txt", "w") as err:
        p = subprocess.Popen([sys.executable, "dmd.py", *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        while not (tmp_path / "b" / "log.csv").exists() and p.poll() is None:
            time.sleep(0.01)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    err = (tmp_path / "err.txt").read_text()
    assert p.returncode == dmd.EXIT_PREEMPTED == 143 and "SIGTERM: stopped after step" in err, err
    assert "Traceback" not in err and not (tmp_path / "b" / "generator").exists()
    k = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"]
    assert 1 <= k < 3
    resumed = dmd.train(dmd.parse_args([*argv, "--resume"]))
    straight = dmd.train(dmd.parse_args(dmd_argv(tiny_teachers, tmp_path / "a", *extra)))
    assert resumed == straight and len(straight) == 3
    ca, cb = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in "ab")
    assert all(same_weights(ca[n], cb[n]) for n in ("gen", "fake", "ema"))
    # 4. the export is safetensors only
    files = os.listdir(tmp_path / "b" / "generator")
    assert "diffusion_pytorch_model.safetensors" in files and not any(f.endswith(".bin") for f in files)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["add", "teacher"])
def test_sigusr1_checkpoints_and_resume_is_exact_add_and_teacher(tiny_add_world, tmp_path, monkeypatch, capsys,
                                                                  script):
    """SIGUSR1 during step 1 (sent from inside the loop): exit 143 after that step; resumed == straight."""
    mod = add if script == "add" else teacher
    argv = (lambda out, *x: add_argv(tiny_add_world, out, *x)) if script == "add" else \
        (lambda out, *x: [*TEACHER_TINY, "--output-dir", str(out), "--max-steps", "2", *x])
    real, calls = mod.nonfinite, []

    def signal_once(*a):   # the first check of step 1 sends the signal to this very process
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(*a)
    monkeypatch.setattr(mod, "nonfinite", signal_once)
    code, line, _ = exits(mod.main, argv(tmp_path / "b"), capsys)
    assert code == 143 and "SIGUSR1: stopped after step 1" in line
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL   # handlers restored
    monkeypatch.setattr(mod, "nonfinite", real)
    resumed, straight = mod.main(argv(tmp_path / "b", "--resume")), mod.main(argv(tmp_path / "a"))
    assert resumed == straight and len(straight) == 2
    ca, cb = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in "ab")
    assert all(same_weights(ca[n], cb[n]) for n in (("student", "heads") if script == "add" else ("unet", "ema")))


def test_a_signal_before_the_first_step_exits_143_at_once(capsys):
    """Loading or building regression pairs: nothing to checkpoint, so the signal ends the process right away."""
    with pytest.raises(SystemExit) as e, dmd.Preemption():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)   # the handler runs first
    assert e.value.code == 143 and "SIGTERM before the first training step" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ---------------------------------------------------------------- 4. safe loading
def test_every_torch_load_in_the_project_passes_weights_only_true():
    calls = []
    for path in ROOT.rglob("*.py"):
        if ".git" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", ok))
    assert len(calls) >= 8 and [c for c, ok in calls if not ok] == []


# ---------------------------------------------------------------- 5. bad input: one line, exit 2, nothing lost
@pytest.mark.slow
def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_old_checkpoint(tiny_teachers, tmp_path, capsys,
                                                                                monkeypatch):
    real = torch.save

    def full_disk(obj, f, *a, **k):   # the second checkpoint finds the disk full half-way
        if str(f).endswith("checkpoint.pt.tmp") and (tmp_path / "checkpoint.pt").exists():
            Path(f).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    code, line, err = exits(dmd.main, dmd_argv(tiny_teachers, tmp_path, "--max-steps", "3"), capsys)
    assert code == 2 and "No space left on device" in line and "untouched" in line and "Traceback" not in err, err
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


@pytest.mark.parametrize("case", ["dmd_out", "add_out", "teacher_out", "add_bad_image", "teacher_bad_image",
                                  "add_no_images", "teacher_no_images", "no_prompts", "binary_prompts"])
def test_bad_input_is_one_line_exit_2(tiny_teachers, tiny_add_world, tmp_path, capsys, case):
    (tmp_path / "a_file").write_text("not a folder")
    out = str(tmp_path / "a_file" / "out")
    bad = tmp_path / "imgs" / "0"
    bad.mkdir(parents=True)
    if "bad_image" in case:
        Image = pytest.importorskip("PIL.Image")
        Image.new("L", (10, 10)).save(bad / "good.png")
        (bad / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "prompts.txt").write_bytes(b"\xff\xfe\x00\x81" if case == "binary_prompts" else b"\n  \n")
    argv = {"dmd_out": (dmd.main, dmd_argv(tiny_teachers, out), "--output-dir"),
            "add_out": (add.main, add_argv(tiny_add_world, out), "--output-dir"),
            "teacher_out": (teacher.main, [*TEACHER_TINY, "--output-dir", out], "--output-dir"),
            "add_bad_image": (add.main, add_argv(tiny_add_world, tmp_path / "o", "--data", str(bad.parent)),
                              "broken.png"),
            "teacher_bad_image": (teacher.main, [*TEACHER_TINY, "--output-dir", str(tmp_path / "o"), "--dataset",
                                                 str(bad.parent)], "broken.png"),
            "add_no_images": (add.main, add_argv(tiny_add_world, tmp_path / "o", "--data", str(bad.parent)),
                              "no images"),
            "teacher_no_images": (teacher.main, [*TEACHER_TINY, "--output-dir", str(tmp_path / "o"), "--dataset",
                                                 str(tmp_path / "imgs")], "no images"),
            "no_prompts": (dmd.main, ["--teacher", tiny_teachers["sd"], "--prompts", str(tmp_path / "prompts.txt"),
                                      "--output-dir", str(tmp_path / "o"), "--device", "cpu"], "has no prompts"),
            "binary_prompts": (dmd.main, ["--teacher", tiny_teachers["sd"], "--prompts",
                                          str(tmp_path / "prompts.txt"), "--output-dir", str(tmp_path / "o"),
                                          "--device", "cpu"], "not a readable UTF-8")}
    main, args, msg = argv[case]
    code, line, err = exits(main, args, capsys)
    assert code == 2 and msg in line and len(err.strip().splitlines()) == 1, err
