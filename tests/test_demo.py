"""The README's first command: launch/demo.py drives the real train.py and eval_zeroshot.py."""

import json
import statistics

import pytest
from runs import PY, run

pytestmark = pytest.mark.slow


def _demo(out, *extra):
    cmd = [
        PY,
        "launch/demo.py",
        "--out",
        str(out),
        "--n-train",
        "640",
        "--n-val",
        "72",
        "--pretrain-samples",
        "64",
        "--finetune-samples",
        "32",
        "--only",
        "clipa_syntax,clipa_sigmoid,baseline_same_compute",
        *extra,
    ]
    return run(cmd, timeout=900)


def test_demo_end_to_end_table_json_png_and_reuse(tmp_path):
    r = _demo(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[demo] 3/3 results" in r.stdout
    res = json.load(open(tmp_path / "results.json"))
    rows = {row["key"]: row for row in res["results"]}
    assert set(rows) == {"clipa_syntax", "clipa_sigmoid", "baseline_same_compute"}
    clipa, base = rows["clipa_syntax"], rows["baseline_same_compute"]
    # token counts come from the resolved stages: I17/T8 pre-train, then 64 px with 30% masking
    assert clipa["tokens"] == "I17/T8 -> I45/T32" and base["tokens"] == "I65/T32"
    assert clipa["samples"] == 96
    # the baseline gets whole batches of CLIPA's FLOPs, never more
    assert base["train_gflops"] <= clipa["train_gflops"] or base["samples"] == 32
    for row in rows.values():
        assert 0.0 <= row["top1"] <= row["top5"] <= 100.0
        assert 0.0 <= row["i2t_r1"] <= 100.0 and 0.0 <= row["t2i_r1"] <= 100.0  # retrieval column
        assert row["curve"] and all(p["loss"] > 0 for p in row["curve"])
        assert row["label"] in res["table"]
    assert (tmp_path / "results.png").stat().st_size > 10_000
    # a second run reuses the data and the finished variants instead of training again
    r2 = _demo(tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("reusing the finished run") == 3
    assert "stage pretrain" not in r2.stdout


def test_demo_seeds_give_each_row_its_mean_and_std(tmp_path):
    r = _demo(tmp_path, "--only", "clipa_syntax", "--seeds", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.load(open(tmp_path / "results.json"))
    (row,) = res["results"]
    runs = row["runs"]
    assert [x["seed"] for x in runs] == [0, 1]
    for m in ("top1", "top5", "i2t_r1", "t2i_r1"):
        vals = [x[m] for x in runs]
        assert row[m] == pytest.approx(statistics.fmean(vals)) and row[m + "_std"] == pytest.approx(
            statistics.stdev(vals)
        )
    assert f"{row['top1']:.1f} +- {row['top1_std']:.1f}" in res["table"] and "mean +- sample std" in res["table"]
    # seed 0 keeps the one-seed demo's directory and command; seed 1 is its own run, trained differently
    first = json.load(open(tmp_path / "clipa_syntax" / "result.json"))
    second = json.load(open(tmp_path / "clipa_syntax_seed1" / "result.json"))
    assert "--seed" not in first["argv"] and second["argv"][-2:] == ["--seed", "1"]
    assert [p["loss"] for p in first["curve"]] != [p["loss"] for p in second["curve"]]
