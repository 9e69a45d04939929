"""launch/bench_data.py and launch/bench_tokenizer.py: the synthetic shards are what data.py reads,
both benchmarks run end to end on tiny inputs and print their tables, bad arguments are one line."""

import io
import json

import bench_data
import bench_tokenizer
import pytest
from PIL import Image
from runs import PY, run

import data
import shards


def _run(script, *args):
    return run([PY, f"launch/{script}", *map(str, args)], timeout=300)


def _first_shard(spec: str) -> bytes:
    with open(spec.replace("{00000..00000}", "00000"), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return bench_data.make_synthetic_shards(str(tmp_path_factory.mktemp("synth")), n=12, size=(200, 150))


def test_synth_writes_photo_like_shards(synth):
    assert synth.endswith("{00000..00000}.tar")
    src = shards.resolve(synth)
    recs = [r for p in src.shards for r in shards.read_shard(p, src)]
    assert [r.key for r in recs] == [f"{i:09d}" for i in range(12)] and all(r.reason is None for r in recs)
    assert data.dataset_stats(synth)["skipped"] == 0
    img = Image.open(io.BytesIO(recs[0].image))
    assert img.size == (200, 150) and img.format == "JPEG"


@pytest.mark.slow
def test_synth_cli_prints_the_spec_of_the_same_bytes(synth, tmp_path):
    """Another process, the same seed: the same bytes."""
    r = _run("bench_data.py", "synth", tmp_path, "--n", 12, "--size", "200x150")
    assert r.returncode == 0, r.stderr
    spec = r.stdout.strip()
    assert spec == str(tmp_path / "{00000..00000}.tar")
    assert _first_shard(spec) == _first_shard(synth)


@pytest.mark.slow
def test_bench_data_cli_prints_its_table(synth):
    r = _run(
        "bench_data.py",
        "bench",
        synth,
        "--image-size",
        32,
        "--n",
        12,
        "--batch-size",
        4,
        "--repeats",
        1,
        "--workers",
        1,
        "--model",
        "ViT-Test-8-CL16",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().split("\n")
    assert lines[0].split() == ["pipeline", "images/s/core"]
    assert lines[1].startswith("ours (draft decode, uint8)") and float(lines[1].split()[-1]) > 0
    assert lines[2].startswith("OpenCLIP-style (full decode, f32)") and float(lines[2].split()[-1]) > 0
    res = json.loads(lines[-1])
    assert (res["images"], res["source_size"], res["loader_workers"]) == (12, [200, 150], 1)
    assert res["loader_images_per_s"] > 0 and f"speedup {res['speedup']}x" in r.stdout


def test_bench_data_bad_arguments_are_one_line(synth, tmp_path, capsys):
    for args, msg in [
        (["bench", str(tmp_path / "none-{0..3}.tar")], "no such file"),
        (["bench", synth, "--model", "ViT-Nope"], "unknown model"),
        (["bench", synth, "--n", "0"], "must be >= 1"),
        (["synth", str(tmp_path), "--size", "big"], "--size must look like 400x300"),
    ]:
        assert bench_data.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_bench_tokenizer_cli_prints_a_row_per_tokenizer():
    r = _run("bench_tokenizer.py", "--n", 200, "--batch", 64)
    assert r.returncode == 0, r.stderr
    rows = {}
    for line in r.stdout.split("\n"):
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "tokenizer / strategy":
            rows[tuple(cells[:2])] = tuple(float(c.replace(",", "")) for c in cells[2:])
    ours = [
        f"ours {tk} {red} (ctx {ctx})"
        for tk, ctx in (("clip_bpe", 16), ("clip_bpe", 8), ("wordpiece", 32))
        for red in ("truncate", "random", "block", "syntax", "frequency")
    ]
    refs = ["open_clip SimpleTokenizer (ctx 16)", "open_clip HFTokenizer, v2 config (ctx 32)"]
    unicode = ["ours clip_bpe truncate (ctx 16)", "ours wordpiece truncate (ctx 32)"] + refs
    want = [(name, "ascii") for name in ours + refs] + [(name, "non-ascii") for name in unicode]
    assert set(want) <= set(rows), sorted(rows)
    assert all(b > 0 and s > 0 for b, s in rows.values())
    assert r.stdout.startswith("200 synthetic captions of ")


def test_bench_tokenizer_bad_arguments_are_one_line(capsys):
    assert bench_tokenizer.main(["--n", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --n and --batch must be >= 1\n"


def test_synthetic_captions_are_alt_text_like():
    rare = bench_tokenizer.rare_words(k=50)
    caps = bench_tokenizer.synthetic_captions(300, seed=4, rare_words=rare)
    assert caps == bench_tokenizer.synthetic_captions(300, seed=4, rare_words=rare)
    lengths = [len(c.split()) for c in caps]
    assert min(lengths) >= 10 and max(lengths) <= 21
    assert 0.3 < sum(any(w in c.split() for w in rare) for c in caps) / len(caps) < 0.7
    assert all(not c.isascii() for c in bench_tokenizer.synthetic_captions(50, non_ascii=True))
    assert all(len(w) > 3 and w.isalpha() for w in rare) and len(set(rare)) == 50
