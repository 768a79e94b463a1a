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
