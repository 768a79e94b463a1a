"""add.py's levers for the later student steps (issue 37): pairs along the teacher's ODE (--pair-steps all), the
anchors (--anchor ode | recon | distill), backward simulation (--backward-sim) and the student's EMA (--ema)."""
from types import SimpleNamespace

import pytest
import torch
from test_add import run_add

import add

TS = [999, 749, 499, 249]


class ToyNet(torch.nn.Module):
    """A deterministic stand-in student / teacher: its output depends on x_t, t and the class label."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x_t, t, class_labels=None):
        c = 0 if class_labels is None else class_labels.view(-1, 1, 1, 1) / 10
        return SimpleNamespace(sample=self.w * x_t + t.view(-1, 1, 1, 1) / 1000 + c)


def toy_teacher():
    from diffusers import DDPMScheduler
    abar = DDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True).alphas_cumprod.double()
    return add.Teacher(ToyNet(), abar, "v_prediction", "toy", num_classes=3)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_backward_simulation_is_samples_chain_renoised_without_gradient(k):
    """Rows at student step k get sample()'s chain through the first k steps from the same pure noise, re-noised
    at step k with the next noise draw, as inference makes that step's input; no gradient reaches the student."""
    tch, net = toy_teacher(), ToyNet()
    z, cond = torch.randn(3, 1, 4, 4), {"labels": torch.tensor([0, 1, 2])}
    torch.manual_seed(5)
    chain = add.sample(tch, net, z, cond, TS[:k], 4)
    want = add.add_noise(chain, torch.randn_like(chain), tch.zt_alpha[TS[k]], tch.zt_sigma[TS[k]])
    torch.manual_seed(5)
    got = add.backward_simulation(tch, net, z, cond, TS, torch.full((3,), k), 4)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not got.requires_grad and got.grad_fn is None
    # the student's output on that input: its gradient comes from the last step alone
    loss = tch.x0(net, got, torch.full((3,), TS[k]), cond, 4).sum()
    (g,) = torch.autograd.grad(loss, net.w)
    a, s = tch.alpha[TS[k]], tch.sigma[TS[k]]
    torch.testing.assert_close(g, (-s * got).sum())   # v-prediction x0 = a x_t - s v, v = w x_t + ...: d/dw = -s x_t
    assert a > 0


def test_backward_simulation_rows_of_mixed_steps():
    """Rows at different steps each get a chain of their own length: a row at step 1 equals the chain of its own
    row alone (the first noise draw is shared), and the rows' pure-noise inputs are left alone."""
    tch, net = toy_teacher(), ToyNet()
    z, cond = torch.randn(2, 1, 4, 4), {"labels": torch.tensor([1, 2])}
    torch.manual_seed(0)
    got = add.backward_simulation(tch, net, z, cond, TS, torch.tensor([1, 3]), 4)
    torch.manual_seed(0)
    x_hat = tch.x0(net, z, torch.full((2,), 999), cond, 4)
    first = add.add_noise(x_hat, torch.randn_like(x_hat), tch.zt_alpha[749], tch.zt_sigma[749])
    torch.testing.assert_close(got[0], first[0], rtol=0, atol=0)
    assert not torch.equal(got[1], first[1])   # row 1 went on to step 3


def test_anchors_move_only_the_rows_they_name():
    """--anchor ode | recon | distill: rows at the pure-noise step (or holding a pair) get no gradient from the
    anchor, whatever their target; the named rows do. recon weights its rows by alpha_s^2."""
    tch = toy_teacher()
    steps = torch.tensor([0, 1, 2, 3])
    later = torch.tensor([False, True, True, True])
    torch.manual_seed(0)
    x0 = torch.randn(4, 1, 4, 4)
    x_s = add.add_noise(x0, torch.randn_like(x0), tch.zt_alpha[torch.tensor(TS)[steps]].view(-1, 1, 1, 1),
                        tch.zt_sigma[torch.tensor(TS)[steps]].view(-1, 1, 1, 1))
    cond = {"labels": torch.tensor([0, 1, 2, 0])}
    for anchor in ("ode", "recon"):
        args = SimpleNamespace(anchor=anchor, student_timesteps=TS, anchor_ode_steps=6)
        target, weight = add.anchor_target(tch, args, x_s, x0, x0, steps, later, cond)
        x_hat = torch.randn(4, 1, 4, 4, requires_grad=True)
        (g,) = torch.autograd.grad(add.paired_loss(x_hat, target, weight > 0, weight), x_hat)
        assert g[0].abs().sum() == 0 and all(g[i].abs().sum() > 0 for i in (1, 2, 3)), anchor
        if anchor == "recon":
            torch.testing.assert_close(target, x0)
            torch.testing.assert_close(weight, later.float() * tch.zt_alpha[torch.tensor(TS)] ** 2)
        else:   # each row's own ODE end: the same rows alone give the same targets
            one = add.teacher_ode_from(tch, x_s[2:3], 499, {"labels": cond["labels"][2:3]}, 6, TS)
            torch.testing.assert_close(target[2:3], one)
    # distill: Eq. 4 with c(t) zeroed on the pure-noise row
    x_hat = torch.randn(4, 1, 4, 4, requires_grad=True)
    c = add.distillation_weight("exp", torch.full((4, 1, 1, 1), 0.5), torch.full((4, 1, 1, 1), 0.8))
    loss = add.score_distillation_loss(x_hat, torch.randn(4, 1, 4, 4), c * later.view(-1, 1, 1, 1))
    (g,) = torch.autograd.grad(loss, x_hat)
    assert g[0].abs().sum() == 0 and g[1:].abs().sum() > 0
    # no rows named: no target at all
    args = SimpleNamespace(anchor="ode", student_timesteps=TS, anchor_ode_steps=6)
    assert add.anchor_target(tch, args, x_s, x0, x0, steps, torch.zeros(4, dtype=torch.bool), cond) == (None, None)


def test_ode_levels_pass_through_the_student_levels():
    levels = add.ode_levels(0.01, 100.0, 8, [19.3, 0.95])
    assert levels[0] == pytest.approx(100.0) and levels[-1] == 0.0 and 19.3 in levels and 0.95 in levels
    assert levels == sorted(levels, reverse=True) and len(levels) == 8 + 2 + 1
    # heun_ode_levels on the Karras levels alone is dmd.py's heun_ode
    z = torch.randn(2, 1, 3, 3)

    def denoise(x, r):
        return 0.3 * x / (1 + r)
    plain = add.ode_levels(0.01, 100.0, 8)
    y, kept = add.heun_ode_levels(denoise, z * 100.0, plain, [plain[3]])   # heun_ode starts at z r_max
    torch.testing.assert_close(y, add.heun_ode(denoise, z, 0.01, 100.0, 8), rtol=0, atol=0)
    assert len(kept) == 1 and kept[0].shape == z.shape


def test_ode_states_integrate_to_their_pairs_y(tiny_add_world):
    """--pair-steps all: the state kept at each later student step is on the pair's trajectory: the teacher's ODE
    from it (teacher_ode_from, the --anchor ode target) ends at the pair's y. A state kept at the wrong level or
    in the wrong variables (x~ instead of x_s = alpha_s x~) would not."""
    w = tiny_add_world
    tch = add.load_teacher(add.parse_args(["--teacher", w["pix"], "--data", w["cls"]]), torch.device("cpu"))
    z, cond = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), {"labels": torch.tensor([0, 1, 2])}
    out = add.teacher_ode_trajectory(tch, z, cond, 6, TS)
    assert out["states"].shape == (3, 3, 1, 8, 8)
    for k in (1, 2, 3):
        y = add.teacher_ode_from(tch, out["states"][:, k - 1], TS[k], cond, 6, TS)
        torch.testing.assert_close(y, out["y"], rtol=1e-4, atol=1e-4)
    # the states have the student's input statistics at s: x_s = alpha_s x_0 + sigma_s eps has std ~ sigma_s
    # at s = 749 (alpha_s ~ 0.05); the ODE's x~ there would have std ~ r_s ~ 19
    assert 0.5 < out["states"][:, 0].std().item() < 1.5


@pytest.mark.slow
def test_pair_steps_all_builds_states_and_refuses_old_pairs(tiny_add_world, tmp_path, capsys):
    """A run with --pair-steps all keeps the states in its shards and feeds them to the later rows; a pair folder
    built without states (--pair-steps T) is refused in one line."""
    common = ["--max-steps", "1", "--loss", "adv", "--lambda-pair", "1", "--pairs", "12", "--ode-steps", "2",
              "--shard-size", "12", "--pairs-dir", str(tmp_path / "pairs")]
    h = run_add(tiny_add_world, tmp_path / "all", "pix", "cls", *common, "--pair-steps", "all")
    s = torch.load(tmp_path / "pairs" / "shard_00000.pt", weights_only=True)
    assert s["states"].shape == (12, 3, 1, 8, 8) and s["states_at"] == TS and h[0]["loss_pair"] > 0
    run_add(tiny_add_world, tmp_path / "t", "pix", "cls", *common[:-1], str(tmp_path / "pairs_t"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_add(tiny_add_world, tmp_path / "again", "pix", "cls", *common[:-1], str(tmp_path / "pairs_t"),
                "--pair-steps", "all")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "with ODE states at steps None" in err and len(err.splitlines()) == 1, err


def test_pair_sampler_gives_each_row_its_state():
    shard = {"z": torch.arange(4.0).view(4, 1, 1, 1), "y": -torch.arange(4.0).view(4, 1, 1, 1), "ids": None,
             "states": 10 * torch.arange(4.0).view(4, 1, 1, 1, 1) + torch.arange(1, 4.0).view(1, 3, 1, 1, 1)}
    sampler = add.PairSampler([shard], 4, 0)
    torch.manual_seed(0)
    z, y, x = sampler.draw([None] * 4, torch.tensor([0, 1, 2, 3]))
    i = z.view(-1).long()
    torch.testing.assert_close(y.view(-1), -z.view(-1))
    torch.testing.assert_close(x.view(-1)[0], z.view(-1)[0])                  # step 0: the pair's noise
    torch.testing.assert_close(x.view(-1)[1:], 10 * i[1:].float() + torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--anchor", "ode", "--anchor-ode-steps", "3"], ["--anchor", "recon"],
                                   ["--anchor", "distill", "--lambda-anchor", "2.5"],
                                   ["--backward-sim", "--anchor", "ode", "--anchor-ode-steps", "3"]])
def test_anchor_and_backward_sim_runs(tiny_add_world, tmp_path, extra):
    h = run_add(tiny_add_world, tmp_path, "pix", "cls", "--max-steps", "1", "--loss", "adv", "--batch-size", "4",
                "--student-timestep-probs", "0.25", "0.25", "0.25", "0.25", *extra)
    assert h[0]["loss_anchor"] > 0 and h[0]["loss_distill"] == 0


@pytest.mark.slow
def test_ema_is_the_moving_average_and_resumes_exactly(tiny_add_world, tmp_path):
    """--ema 0.9: after each update ema <- 0.9 ema + 0.1 student (from the teacher's weights); the exported student
    is the EMA; a resumed run continues it bit for bit."""
    run_add(tiny_add_world, tmp_path / "a", "pix", "cls", "--ema", "0.9", "--ckpt-every", "1")
    ck = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    prev = torch.load(tmp_path / "a" / "checkpoint.prev.pt", weights_only=True)
    from diffusers import UNet2DModel
    teacher = UNet2DModel.from_pretrained(tiny_add_world["pix"], subfolder="unet").state_dict()
    exported = UNet2DModel.from_pretrained(tmp_path / "a" / "student").state_dict()
    for k in teacher:
        torch.testing.assert_close(prev["ema"][k], 0.9 * teacher[k] + 0.1 * prev["student"][k])
        torch.testing.assert_close(ck["ema"][k], 0.9 * prev["ema"][k] + 0.1 * ck["student"][k])
        torch.testing.assert_close(exported[k], ck["ema"][k], rtol=0, atol=0)
    assert any(not torch.equal(ck["ema"][k], ck["student"][k]) for k in teacher)
    run_add(tiny_add_world, tmp_path / "b", "pix", "cls", "--ema", "0.9", "--max-steps", "1")
    run_add(tiny_add_world, tmp_path / "b", "pix", "cls", "--ema", "0.9", "--resume")
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for k in teacher:
        torch.testing.assert_close(cb["ema"][k], ck["ema"][k], rtol=0, atol=0)


@pytest.mark.parametrize("case", ["pair_steps", "anchor_pairs", "anchor_distill", "backward_keep", "ema",
                                  "anchor_text", "disc_cond_text", "backward_recon"])
def test_lever_mistakes_are_one_line_exit_2(tiny_add_world, tmp_path, capsys, case):
    w = tiny_add_world
    pix = ["--teacher", w["pix"], "--data", w["cls"]]
    argv, msg = {"pair_steps": (pix + ["--pair-steps", "all"], "--pair-steps all needs --lambda-pair"),
                 "anchor_pairs": (pix + ["--lambda-pair", "1", "--pair-steps", "all", "--anchor", "ode"],
                                  "every row already has its pair's target"),
                 "anchor_distill": (pix + ["--anchor", "distill"], "Eq. 4 already acts on every row"),
                 "backward_keep": (pix + ["--backward-sim", "--img-cond-at-noise", "keep"], "--backward-sim makes"),
                 "backward_recon": (pix + ["--backward-sim", "--anchor", "recon"], "whose x_0 would not be"),
                 "ema": (pix + ["--ema", "1"], "0 <= --ema < 1"),
                 "anchor_text": (["--teacher", w["sd"], "--data", w["caps"], "--anchor", "ode"], "pixel teachers"),
                 "disc_cond_text": (["--teacher", w["pix"].replace("pix", "pix_uncond"), "--data", w["cls"],
                                     "--disc-cond", "text"], "this teacher is unconditional")}[case]
    if case == "disc_cond_text":
        import shutil

        from diffusers import UNet2DModel
        shutil.copytree(w["pix"], w["pix"].replace("pix", "pix_uncond"), dirs_exist_ok=True)
        cfg = dict(UNet2DModel.load_config(w["pix"], subfolder="unet"), num_class_embeds=None)
        UNet2DModel.from_config(cfg).save_pretrained(w["pix"].replace("pix", "pix_uncond") + "/unet")
    with pytest.raises(SystemExit) as e:
        add.main([*argv, "--disc-backbone", w["dino"], "--device", "cpu", "--output-dir", str(tmp_path / "o"),
                  "--resolution", "16", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_shipped_teacher_runs_the_recipe_and_paper_losses_restores_the_paper():
    """--teacher fmnist brings the CPU defaults and the recipe (printed at the start, listed in --help);
    --paper-losses keeps the CPU defaults but the paper's losses; any flag given still wins."""
    recipe = add.parse_args(["--teacher", "fmnist"])
    for k, v in add.CPU_RECIPE.items():
        assert getattr(recipe, k) == v, k
    assert recipe.loss == "adv" and recipe.lambda_pair > 0 and recipe.score_num == 2000
    paper = add.parse_args(["--teacher", "fmnist", "--paper-losses"])
    assert (paper.loss, paper.lambda_pair, paper.pair_steps, paper.anchor, paper.backward_sim, paper.ema) == \
        ("both", 0.0, "T", "none", False, 0.0)
    assert paper.batch_size == recipe.batch_size == 32 and paper.disc_backbone == "efficientnet-lite0"
    assert add.parse_args(["--teacher", "fmnist", "--ema", "0.5"]).ema == 0.5
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        add.parse_args(["--help"])
    assert add.flags_of(add.CPU_RECIPE) in " ".join(out.getvalue().split())


@pytest.mark.parametrize("argv,msg", [(["--paper-losses"], "--paper-losses is for the shipped teachers"),
                                      (["--score-num", "10"], "--score-num scores against Fashion-MNIST")])
def test_recipe_flags_refused_elsewhere(tiny_add_world, argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        add.parse_args(["--teacher", tiny_add_world["pix"], "--data", tiny_add_world["cls"], *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
