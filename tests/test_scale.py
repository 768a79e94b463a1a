"""benchmark/scale.py on --tiny configs: the real commands (dmd.py, eval.py latency) run end to end through
benchmark/probe.py, in this process, and the CSV holds finite numbers; the FLOP count is checked against DMD's
update (11 forward passes' worth per sample)."""
import csv
import math

import pytest

from benchmark import scale


@pytest.mark.slow
def test_tiny_rows_end_to_end(tmp_path):
    out = tmp_path / "scale.csv"
    scale.main(["--tiny", "--in-process", "--rows", "dmd-in64-b336,lat-in64", "--work", str(tmp_path / "w"),
                "--csv", str(out)])
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == scale.COLUMNS
    assert [r["row"] for r in rows] == ["dmd-in64-b336", "lat-in64-eager-b1", "lat-in64-eager-b4"]
    for r in rows:
        assert r["status"] == "ok" and r["gpu"] and r["torch"] and r["diffusers"]
        for k in ("s_per_step", "img_per_s", "peak_gib", "mfu", "tflop_per_step"):
            assert math.isfinite(float(r[k])) and float(r[k]) > 0, (r["row"], k)
        assert float(r["img_per_s"]) == pytest.approx(int(r["batch"]) / float(r["s_per_step"]), rel=1e-3)
    dmd, lat1, lat4 = rows
    assert dmd["command"].startswith("python dmd.py --teacher WORK/models/in64 --batch-size 4 ")
    assert (dmd["batch"], dmd["micro_batch"]) == ("4", "4")
    fwd = float(lat1["tflop_per_step"])          # one forward pass of the student (= teacher) UNet, batch 1
    assert float(lat4["tflop_per_step"]) == pytest.approx(4 * fwd, rel=1e-3)
    # DMD update per sample: generator fwd + bwd on a fresh and a paired sample (2 x 3), real and fake score
    # forward (2), fake-score fwd + bwd (3) = 11 forward passes; the first conv needs no input gradient
    assert 10.5 * 4 * fwd < float(dmd["tflop_per_step"]) <= 11 * 4 * fwd * 1.001


def test_training_metrics_leave_out_startup_counted_and_warmup_updates():
    rec = {"stamps": [0.0, 10.0, 30.0, 31.0, 33.0, 34.5, 36.5], "flops_step": 2}
    # updates 3 .. 7 took 20, 1, 2, 1.5, 2; update 2 (20 s) was FLOP-counted, update 3 is the warm-up
    assert scale.training_metrics(rec, steps=4, warmup=1) == pytest.approx(1.75)
    assert scale.training_metrics(rec, steps=5, warmup=0) == pytest.approx(2.0)


def test_row_selection_and_dry_run(capsys):
    assert [r.name for r in scale.select_rows("add-sdxl-*-lora64,lat-sd15")] == \
        ["add-sdxl-b2-lora64", "add-sdxl-b4-lora64", "add-sdxl-b8-lora64", "lat-sd15"]
    records = scale.main(["--dry-run", "--rows", "dmd-in64-b336"])
    assert records[0]["status"] == "not measured" and records[0]["micro_batch"] == 28   # dmd.py's default
    assert "| dmd-in64-b336 | 336 | 28 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        scale.main(["--dry-run", "--rows", "nope"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "no row matches 'nope'" in err


def test_a_failing_command_and_the_time_budget_become_statuses(tmp_path):
    from benchmark import probe
    rec = probe.measure(f"{scale.ROOT}/dmd.py", ["--teacher", str(tmp_path), "--output-dir", str(tmp_path / "o"),
                                                 "--device", "cpu"], stop_after=3)
    assert rec["exit"] == 2 and not rec["stopped"] and rec["stamps"] == []
    assert scale.status_of(rec, "dmd.py: error: no diffusers model there\n") == \
        "error: dmd.py: error: no diffusers model there"
    records = scale.main(["--tiny", "--in-process", "--rows", "lat-in64", "--max-minutes", "1e-6",
                          "--work", str(tmp_path / "w"), "--csv", str(tmp_path / "s.csv")])
    assert [r["status"] for r in records] == ["skipped: time budget"]


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    """`scale.py --plan --tiny` once (a DMD, an ADD-LoRA, a latency and a default row; one trace process): its
    records and its folder (the traces cached there)."""
    work = tmp_path_factory.mktemp("plan")
    rows = "dmd-in64-b336,add-sdxl-b2-lora64,lat-sd15,add-sdxl-default"
    return scale.main(["--plan", "--tiny", "--rows", rows, "--work", str(work), "--workers", "1"]), work


@pytest.mark.slow
def test_plan_counts_weights_gradients_and_adamw_state_exactly(tiny_plan):
    """--plan on the tiny configs (fake tensors): the weights, gradients and AdamW state of DMD (generator and fake
    score trained, the teacher frozen) and of ADD with LoRA (the adapters and the heads trained) against counts of
    the real tiny models: 4 + 4 + 8 bytes a trained float32 parameter, 4 a frozen one, and a 4-byte AdamW step per
    trained tensor."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    import add
    from benchmark import plan
    rows, cache = {r.name: r for r in scale.ROWS}, str(tiny_plan[1] / "plan" / "traces.json")
    dmd = plan.row_spec(rows["dmd-in64-b336"], tiny=True, precision="fp32")
    c = plan.compose(dmd, plan.traces(plan.trace_keys(dmd), cache, workers=1))
    unet = UNet2DModel(**scale.in64_config(True))
    n, tensors = sum(p.numel() for p in unet.parameters()), len(list(unet.parameters()))
    assert c["weights"] == 3 * 4 * n and c["grads"] == 2 * 4 * n and c["opt"] == 2 * (8 * n + 4 * tensors)
    assert 0 < c["saved"] and c["peak"] > c["weights"] + c["grads"] + c["opt"]
    lora = plan.row_spec(rows["add-sdxl-b2-lora64"], tiny=True, precision="fp32")
    c = plan.compose(lora, plan.traces(plan.trace_keys(lora), cache, workers=1))
    student = add.add_lora(UNet2DConditionModel(**scale.sd_unet_config(True, True)), 64)
    adapters = [p for k, p in student.named_parameters() if "lora_" in k]
    heads = [p for _ in range(4) for p in add.StyleGANTHead(16, 32).parameters()]
    trained = sum(p.numel() for p in adapters + heads)
    assert c["grads"] == 4 * trained and c["opt"] == 8 * trained + 4 * len(adapters + heads)
    assert c["by_network"]["student"] == 4 * sum(p.numel() for p in student.parameters())


@pytest.mark.slow
def test_plan_writes_every_row_marked_planned(tiny_plan):
    records, work = tiny_plan
    names = ["dmd-in64-b336", "add-sdxl-b2-lora64", "lat-sd15", "add-sdxl-default"]
    assert [r["row"] for r in records] == names
    rows = list(csv.DictReader(open(work / "plan_tiny.csv")))
    assert [r["row"] for r in rows] == names and all(r["status"] == "planned (fake tensors)" for r in rows)
    for r in rows:
        assert float(r["peak_gib"]) >= float(r["weights_gib"]) > 0 and float(r["tflop_per_update"]) > 0, r
        assert float(r["s_at_40_mfu"]) == pytest.approx(2.5 * float(r["s_at_100_mfu"]), rel=0.01)


def test_live_memory_and_the_cuda_autocast_emulation():
    """probe.LiveMemory counts what an operation creates while it lives (a linear layer's output: exactly its bytes,
    the weight's view not counted); plan.cuda_autocast casts as CUDA's autocast: convolutions to bf16 (the weight's
    cast cached), group norm back to float32, sums in float32."""
    import torch

    from benchmark import plan, probe
    lin, x = torch.nn.Linear(64, 32), torch.randn(8, 64)
    live = probe.LiveMemory()
    live.ignore([*lin.parameters(), x])
    with live:
        y = lin(x)
        assert live.now == y.numel() * 4
        del y
    assert live.now == 0 and live.peak == 8 * 32 * 4
    conv, gn = torch.nn.Conv2d(4, 4, 3), torch.nn.GroupNorm(2, 4)
    with plan.cuda_autocast(torch.bfloat16) as amp:
        h = conv(torch.randn(1, 4, 8, 8))
        assert h.dtype == torch.bfloat16 and gn(h).dtype == torch.float32 and h.sum().dtype == torch.float32
        assert conv(h).dtype == torch.bfloat16 and len(amp.cache) == 2   # conv weight and bias, cast once
