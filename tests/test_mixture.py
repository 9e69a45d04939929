"""Weighted data mixtures (--train-data 'A::B' --train-data-weights 3::1): the realised shares follow
the weights, an exhausted source starts a new (reshuffled) epoch of its own, sources may differ in
format (webdataset tars written by the webdataset library, TFRecords by TensorFlow's writer), a
resumed mixture yields the very batches an uninterrupted one does, bad weights are one-line errors,
and train.py trains on a mixture and resumes it bit for bit."""

import collections
import json

import pytest
import torch
from captioned import image_bytes, write_tfrecord, write_wds
from runs import losses, same_weights, tiny_demo_args, train

import config
import data
import train as train_py

BATCH = 8


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three sources, captions '<source> <index>': a (4 tar shards x 8), b (2 TFRecord shards x 8),
    c (2 tar shards x 8). Small JPEGs: the loader decodes them at 1/8 scale."""
    root = tmp_path_factory.mktemp("mix")
    specs = {}
    for name, fmt, n_shards in (("a", "wds", 4), ("b", "tfrecord", 2), ("c", "wds", 2)):
        (root / name).mkdir()
        for s in range(n_shards):
            samples = []
            for j in range(8):
                i = s * 8 + j
                jpg, cap = image_bytes(1000 * ord(name) + i, size=(40, 32)), f"{name} {i}"
                if fmt == "wds":
                    samples.append({"__key__": f"{s:03d}{j:03d}", "jpg": jpg, "txt": cap})
                else:
                    samples.append({"jpg": jpg, "txt": cap.encode()})
            ext = "tar" if fmt == "wds" else "tfrecord"
            (write_wds if fmt == "wds" else write_tfrecord)(root / name / f"{s:03d}.{ext}", samples)
        specs[name] = str(root / name / f"{{000..{n_shards - 1:03d}}}.{'tar' if fmt == 'wds' else 'tfrecord'}")
    return specs


def _loader(spec, weights, **kw):
    kw = {"num_workers": 0, "shuffle_buffer": 6, "seed": 5, **kw}
    return data.make_train_loader(spec, None, 16, BATCH, weights=weights, **kw)


def _take(loader, n):
    return [(x, caps) for _, (x, caps) in zip(range(n), loader)]


def _sources_of(batches):
    return collections.Counter(cap.split()[0] for _, caps in batches for cap in caps)


def test_realised_shares_follow_the_weights(sources):
    """Over 300 batches the share of each source is its weight to within a percent (each batch
    gives a source its expected rows rounded up or down), every batch has BATCH rows, and
    loader.shares reports what the batches held."""
    for names, weights in ((("a", "b"), (3, 1)), (("a", "b", "c"), (1, 2, 5))):
        loader = _loader("::".join(sources[n] for n in names), weights)
        batches = _take(loader, 300)
        assert all(x.shape == (BATCH, 3, 16, 16) and x.dtype == torch.uint8 and len(c) == BATCH for x, c in batches)
        got = _sources_of(batches)
        total = sum(weights)
        for n, w in zip(names, weights):
            assert got[n] / (300 * BATCH) == pytest.approx(w / total, abs=0.01), (names, weights, got)
        assert loader.shares == pytest.approx([got[n] / (300 * BATCH) for n in names])
        # no batch is further than one row from its expected rows per source
        for _, caps in batches:
            per = collections.Counter(cap.split()[0] for cap in caps)
            assert all(abs(per[n] - BATCH * w / total) < 1 for n, w in zip(names, weights)), per


def test_an_exhausted_source_starts_a_new_shuffled_epoch(sources):
    """b (16 samples) weighted 1::1 against a (32): b runs out first and starts its next epoch while
    a goes on; each of b's epochs holds each of its samples exactly once, in a new order."""
    loader = _loader(sources["a"] + "::" + sources["b"], (1, 1))
    batches = _take(loader, 40)  # 160 rows from b: 10 of its epochs, 5 of a's
    b_rows = [cap for _, caps in batches for cap in caps if cap.startswith("b ")]
    epochs = [b_rows[i : i + 16] for i in range(0, len(b_rows) - 15, 16)]
    assert len(epochs) >= 9
    assert all(sorted(e) == sorted(f"b {i}" for i in range(16)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == len(epochs)  # every epoch reshuffled
    assert loader.epochs[1] > loader.epochs[0] >= 4


def test_without_weights_the_sources_are_one_shard_list(sources):
    """'A::B' without weights stays what it was: one loader over both sources' shards."""
    loader = _loader(sources["a"] + "::" + sources["c"], None)
    assert isinstance(loader, data.TrainLoader)
    assert [s.rsplit("/", 2)[-2] for s in loader.src.shards] == ["a"] * 4 + ["c"] * 2
    assert sorted(_sources_of(_take(loader, 6)).items()) == [("a", 32), ("c", 16)]  # one epoch: all 48


@pytest.mark.parametrize(
    "workers,consumed",
    [(0, 7), (0, 22), pytest.param(2, 13, marks=pytest.mark.slow)],
)
def test_resume_is_exact(sources, workers, consumed):
    """A mixture of a tar and a TFRecord source saved after `consumed` batches (mid-batch in each
    source, past an epoch of b with 22) and resumed in a new loader from its JSON state yields the
    very batches, and shares, of the uninterrupted one."""
    spec = sources["a"] + "::" + sources["b"]
    kw = {"num_workers": workers}
    full_loader = _loader(spec, (3, 1), **kw)
    full = _take(full_loader, 30)
    loader = _loader(spec, (3, 1), **kw)
    it = iter(loader)
    head = [next(it) for _ in range(consumed)]
    state = json.loads(json.dumps(loader.state_dict()))  # plain JSON, as checkpoints keep it
    assert 0 < state["sources"][0]["used"] < BATCH or 0 < state["sources"][1]["used"] < BATCH
    resumed = _loader(spec, (3, 1), state=state, **kw)
    got = head + _take(resumed, 30 - consumed)
    assert [c for _, c in got] == [c for _, c in full]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, full))
    assert resumed.shares == full_loader.shares and resumed.samples == full_loader.samples


def test_a_state_of_all_ranks_picks_ours(sources):
    """The trainer saves the list of every rank's state: each rank resumes from its own."""
    spec = sources["a"] + "::" + sources["c"]
    ranks = [_loader(spec, (1, 1), rank=r, world_size=2) for r in range(2)]
    heads = [_take(lo, 1) for lo in ranks]  # within the first epoch of each source
    states = json.loads(json.dumps([lo.state_dict() for lo in ranks]))
    for r in range(2):
        want = _take(ranks[r], 4)
        got = _take(_loader(spec, (1, 1), rank=r, world_size=2, state=states), 4)
        assert [c for _, c in got] == [c for _, c in want]
    assert {c for _, cs in heads[0] for c in cs}.isdisjoint({c for _, cs in heads[1] for c in cs})


def test_mixture_counts_round_each_expected_count():
    cdf = [0.5, 0.75, 1.0]
    for u in (0.0, 0.3, 0.999):
        counts = data.mixture_counts(cdf, 10, u)
        assert sum(counts) == 10 and all(abs(n - 10 * w) < 1 for n, w in zip(counts, (0.5, 0.25, 0.25)))
    assert data.mixture_counts([1.0], 7, 0.5) == [7]
    assert data.mixture_counts([0.001, 1.0], 4, 0.0) == [1, 3] and data.mixture_counts([0.001, 1.0], 4, 0.5) == [0, 4]


def test_the_weights_are_a_stage_field(sources):
    """--train-data-weights sets every stage, --set one stage; they reach the stage as numbers."""
    spec = sources["a"] + "::" + sources["b"]
    _, stages, _ = config.parse_args(["--cfg", "demo", "--train-data", spec, "--train-data-weights", "3::1"])
    assert [s.mixture_weights for _, s in stages] == [(3.0, 1.0)] * 2
    argv = ["--cfg", "demo", "--train-data", spec, "--set", "finetune.train_data_weights=1::0.5"]
    _, stages, _ = config.parse_args(argv)
    assert [s.mixture_weights for _, s in stages] == [None, (1.0, 0.5)]


@pytest.mark.parametrize(
    "weights,needle",
    [
        ("3::1::1", "gives 3 weight(s) for 2 '::'-joined source(s)"),
        ("3", "gives 1 weight(s) for 2"),
        ("3::0", "give one positive number per source"),
        ("3::-1", "give one positive number per source"),
        ("3::", "give one positive number per source"),
        ("three::1", "give one positive number per source"),
        ("nan::1", "give one positive number per source"),
    ],
)
def test_bad_weights_are_one_line_errors(sources, tmp_path, capsys, weights, needle):
    spec = sources["a"] + "::" + sources["b"]
    argv = ["--cfg", "demo", "--train-data", spec, "--train-data-weights", weights, "--out", str(tmp_path / "o")]
    assert train_py.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: stage ") and needle in err, err
    assert not (tmp_path / "o").exists()


def test_each_source_is_checked_before_the_first_step(sources, tmp_path, capsys):
    """With weights each source is resolved on its own up front: a missing one is one line."""
    spec = sources["a"] + "::" + str(tmp_path / "nope" / "{0..3}.tar")
    argv = ["--cfg", "demo", "--train-data", spec, "--train-data-weights", "1::1", "--out", str(tmp_path / "o")]
    assert train_py.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "nope" in err, err


@pytest.mark.slow
def test_train_py_on_a_mixture_resumes_bit_exact(demo_small, tmp_path):
    """train.py on the demo's tars and TFRecords weighted 3::1: the progress line and metrics.jsonl
    report each source's realised share, and a run stopped at step 5 and resumed repeats the
    uninterrupted one bit for bit (losses, shares, final weights) through the stage change."""
    spec = f"{demo_small.train_wds}::{demo_small.train_tfrecord}"
    mix = ["--train-data", spec, "--train-data-weights", "3::1"]
    full, part = tmp_path / "full", tmp_path / "part"
    stdout = train([*tiny_demo_args(demo_small, full), *mix])
    assert " | sources 75.0/25.0%" in stdout  # batch 16: 12 + 4 rows every step
    train([*tiny_demo_args(demo_small, part), *mix, "--max-steps", "5"])
    stdout = train([*tiny_demo_args(demo_small, part), *mix, "--resume", "latest"])
    assert "resuming from" in stdout
    want, want_recs = losses(full)
    got, got_recs = losses(part)
    assert sorted(want) == list(range(1, 13)) and got == want

    def shares(recs):
        return {r["step"]: (r["source_share_0"], r["source_share_1"]) for r in recs if "loss" in r}

    assert shares(got_recs) == shares(want_recs) and set(shares(want_recs).values()) == {(0.75, 0.25)}
    final = "checkpoints/step_00000012/model.safetensors"
    assert same_weights(full / final, part / final)
