"""launch/sweep.py: the grid it runs, the table's mean +- std over seeds, its one-line errors, and (slow) a
tiny grid through the real train.py and eval_zeroshot.py, resumed."""

import csv
import json
import os
import statistics

import numpy as np
import pytest
import sweep
from runs import PY, run

import model as M


def _grid(**kw):
    base = dict(
        sizes=["S", "M", "L"],
        image_px=[16, 32, 64],
        text_tokens=[4, 8, 16, 32],
        reductions=["syntax", "truncate", "frequency"],
        seeds=[0, 1, 2],
        ref_px=32,
        ref_text=16,
    )
    return sweep.Grid(**{**base, **kw})


def test_default_grid_moves_one_factor_at_a_time():
    cs = sweep.cells(_grid())
    points = {c.point for c in cs}
    # per size: 3 image sizes at T16; T4/T8/T16/T32 at 32 px (T16 shared); 2 more reductions at T4/T8/T16
    assert len(points) == 3 * (3 + 3 + 2 * 3)
    assert len(cs) == 3 * len(points) and len({c.key for c in cs}) == len(cs)
    for size in "SML":
        assert {(p[1], p[2]) for p in points if p[0] == size and p[3] == "syntax"} == {
            (16, 16),
            (32, 16),
            (64, 16),
            (32, 4),
            (32, 8),
            (32, 32),
        }
        # the other reductions only below the longest text (there captions fit and reductions agree)
        assert {(p[1], p[2]) for p in points if p[0] == size and p[3] == "truncate"} == {(32, 4), (32, 8), (32, 16)}
    # seed by seed, the slowest cells first in each
    assert [c.seed for c in cs] == sorted(c.seed for c in cs) and cs[0].size == "L" and cs[len(cs) // 3 - 1].size == "S"
    assert sweep.Cell("M", 64, 8, "syntax", 0).image_tokens == 65


def test_factorial_grid_is_the_whole_product():
    g = _grid(sizes=["S"], image_px=[16, 32], text_tokens=[4, 8], reductions=["syntax", "truncate"], seeds=[0])
    # the axes: 16 and 32 px at T16 is not in this grid's text lengths, so ref_text=8 here
    g = sweep.Grid(**{**g.__dict__, "ref_text": 8})
    assert {c.point for c in sweep.cells(g)} == {
        ("S", 16, 8, "syntax"),
        ("S", 32, 8, "syntax"),
        ("S", 32, 4, "syntax"),
        ("S", 32, 4, "truncate"),
    }
    gf = sweep.Grid(**{**g.__dict__, "factorial": True})
    assert {c.point for c in sweep.cells(gf)} == {
        ("S", px, t, r) for px in (16, 32) for t in (4, 8) for r in ("syntax", "truncate") if r == "syntax" or t == 4
    }


def test_train_argv_is_the_demo_pretrain_stage_with_the_cells_overrides():
    c = sweep.Cell("M", 16, 4, "frequency", 2)
    argv = sweep.train_argv(c, "/d/{0..1}.tar", 640, 32, "/d/counts.json")
    assert argv[:4] == ["--cfg", "demo", "--stage", "pretrain"] and argv[argv.index("--seed") + 1] == "2"
    sets = dict(argv[i + 1].split("=", 1) for i, x in enumerate(argv) if x == "--set")
    assert sets == {
        "pretrain.model": "ViT-ToyM-8-CL16-GAP",
        "pretrain.image_size": "16",
        "pretrain.context_length": "4",
        "pretrain.text_reduction": "frequency",
        "pretrain.batch_size": "32",
        "pretrain.train_num_samples": "640",
        "pretrain.word_counts": "/d/counts.json",
    }
    assert "pretrain.word_counts" not in " ".join(
        sweep.train_argv(sweep.Cell("M", 16, 4, "syntax", 0), "d", 64, 32, "c")
    )


def test_toy_ladder_grows_in_width_and_depth():
    cfgs = [M.get_model_config(sweep.toy_model(s)) for s in sweep.TOY_SIZES]
    assert len(cfgs) >= 3
    for small, big in zip(cfgs, cfgs[1:]):
        assert big.vision.width > small.vision.width and big.vision.layers > small.vision.layers
        assert big.text.width > small.text.width and big.text.layers > small.text.layers
        assert M.count_flops(big)["total_gflops"] > M.count_flops(small)["total_gflops"]


def _cell(size, top1, seed, px=32, t=16, red="syntax"):
    return dict(
        size=size,
        model=sweep.toy_model(size),
        image_px=px,
        image_tokens=(px // 8) ** 2 + 1,
        text_tokens=t,
        reduction=red,
        seed=seed,
        train_gflops=1.0,
        train_s=2.0 * (seed + 1),
        top1=top1,
        top5=top1 * 2,
    )


def test_aggregation_is_mean_and_sample_std_over_seeds():
    res = [_cell("S", v, i) for i, v in enumerate((10.0, 12.5, 20.0))] + [_cell("M", 7.0, 0)]
    rows = sweep.aggregate(res)
    assert [(r["size"], r["seeds"]) for r in rows] == [("S", 3), ("M", 1)]
    s = rows[0]
    assert s["top1"] == pytest.approx(np.mean([10, 12.5, 20]))
    assert s["top1_std"] == pytest.approx(np.std([10, 12.5, 20], ddof=1))  # sample std, as the table says
    assert s["top5_std"] == pytest.approx(2 * np.std([10, 12.5, 20], ddof=1))
    assert s["train_s"] == pytest.approx(4.0)
    assert rows[1]["top1"] == 7.0 and rows[1]["top1_std"] == 0.0
    assert "| 14.2 +- 5.2 |" in sweep.markdown(rows)


def test_drops_are_against_the_longest_budget_of_each_axis():
    g = _grid(sizes=["S"], image_px=[16, 32], text_tokens=[8, 16], reductions=["syntax"], seeds=[0, 1])
    res = [
        _cell("S", 30.0, 0, px=32, t=16),
        _cell("S", 34.0, 1, px=32, t=16),
        _cell("S", 20.0, 0, px=16, t=16),
        _cell("S", 20.0, 1, px=16, t=16),
        _cell("S", 25.0, 0, px=32, t=8),
        _cell("S", 27.0, 1, px=32, t=8),
    ]
    d = sweep.drops(sweep.aggregate(res), g)
    full_std = statistics.stdev([30, 34])
    ((tok, lost, std),) = d["image"]["S"]
    assert (tok, lost) == (5, 12.0) and std == pytest.approx(full_std)
    ((tok, lost, std),) = d["text"]["S"]
    assert (tok, lost) == (8, 6.0) and std == pytest.approx(np.hypot(full_std, statistics.stdev([25, 27])))


@pytest.mark.parametrize(
    "bad, says",
    [
        (["--sizes", "S,Q"], "unknown size 'Q'"),
        (["--image-px", "12"], "not a positive multiple of the patch size"),
        (["--image-px", "a,b"], "comma-separated integers"),
        (["--text-tokens", "2"], "text length 2 out of range"),
        (["--reductions", "syntax,nope"], "unknown reduction 'nope'"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--samples", "16"], "--samples (16) must be >= --batch-size (32)"),
        (["--jobs", "0"], "--jobs must be >= 1"),
        (["--workers", "-1"], "--workers must be >= 0"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_flags_are_one_line_exit_2(capsys, tmp_path, bad, says):
    try:
        rc = sweep.main(["--out", str(tmp_path / "o"), *bad])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and says in err and not out, err
    assert not (tmp_path / "o").exists()  # nothing written before the flags are checked


def test_out_that_is_a_file_is_refused(capsys, tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    assert sweep.main(["--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err


def _sweep(out, *extra):
    cmd = [PY, "launch/sweep.py", "--out", str(out), "--sizes", "S", "--image-px", "16", "--ref-px", "16"]
    cmd += ["--text-tokens", "4", "--ref-text", "4", "--reductions", "syntax", "--seeds", "2"]
    cmd += ["--samples", "64", "--n-train", "320", *extra]
    return run(cmd, timeout=900)


@pytest.mark.slow
def test_tiny_grid_end_to_end_table_plots_and_resume(tmp_path):
    r = _sweep(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 cells (1 sizes x 1 points x 2 seeds): 0 finished and reused, 2 to run" in r.stdout
    assert "ETA" in r.stdout
    res = json.load(open(tmp_path / "results.json"))
    cells = {c["key"]: c for c in res["cells"]}
    assert set(cells) == {"S_px16_T4_syntax_seed0", "S_px16_T4_syntax_seed1"}
    (row,) = res["rows"]
    tops = [c["top1"] for c in cells.values()]
    assert row["seeds"] == 2 and row["top1"] == pytest.approx(np.mean(tops))
    assert row["top1_std"] == pytest.approx(np.std(tops, ddof=1))
    for c in cells.values():
        assert c["samples"] == 64 and c["image_tokens"] == 5 and 0 <= c["top1"] <= c["top5"] <= 100
        # the real scripts ran: train.py's log and eval_zeroshot.py's output, checkpoints removed after scoring
        d = tmp_path / "cells" / c["key"]
        assert "stage pretrain done" in (d / "train.log").read_text()
        assert json.load(open(d / "zeroshot.json"))["context_length"] == 4
        assert not (d / "checkpoints").exists()
    assert f"{row['top1']:.1f} +- {row['top1_std']:.1f}" in (tmp_path / "results.md").read_text()
    assert [dict(x) for x in csv.DictReader(open(tmp_path / "results.csv"))][0]["seeds"] == "2"
    assert (tmp_path / "inverse_scaling.png").stat().st_size > 10_000

    # a rerun reuses both finished cells; one whose result is gone (unfinished) runs again, alone
    done = tmp_path / "cells" / "S_px16_T4_syntax_seed0" / "result.json"
    kept = tmp_path / "cells" / "S_px16_T4_syntax_seed1" / "train.log"
    stamp = os.stat(kept).st_mtime_ns
    os.remove(done)
    r2 = _sweep(tmp_path)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "1 finished and reused, 1 to run" in r2.stdout
    assert "1/1 S_px16_T4_syntax_seed0" in r2.stdout and done.exists()
    assert os.stat(kept).st_mtime_ns == stamp  # the reused cell was not trained again
    r3 = _sweep(tmp_path)
    assert "2 finished and reused, 0 to run" in r3.stdout and r3.returncode == 0


@pytest.mark.slow  # matplotlib: about 2-3 s
def test_report_only_writes_table_and_plots_from_finished_cells(tmp_path, capsys):
    flags = ["--out", str(tmp_path), "--sizes", "S,M", "--image-px", "16,32", "--text-tokens", "8,16"]
    flags += ["--reductions", "syntax,truncate", "--seeds", "2", "--report-only"]
    assert sweep.main(flags) == 2  # nothing finished yet: one line, nothing trained
    assert "no finished cells" in capsys.readouterr().err
    g = sweep.parse_grid(sweep.build_parser().parse_args(flags))
    for i, c in enumerate(sweep.cells(g)[:-3]):  # a sweep stopped early: the last cells are missing
        r = dict(_cell(c.size, 10.0 + i % 5, c.seed, c.image_px, c.text_tokens, c.reduction), key=c.key)
        (tmp_path / "cells" / c.key).mkdir(parents=True)
        (tmp_path / "cells" / c.key / "result.json").write_text(json.dumps(r))
    assert sweep.main(flags) == 0
    res = json.load(open(tmp_path / "results.json"))
    assert len(res["cells"]) == len(sweep.cells(g)) - 3
    assert {r["seeds"] for r in res["rows"]} == {1, 2}
    assert (tmp_path / "results.md").read_text().count("\n") == len(res["rows"]) + 2
    assert (tmp_path / "inverse_scaling.png").stat().st_size > 10_000
    assert (tmp_path / "text_reductions.png").stat().st_size > 5_000
