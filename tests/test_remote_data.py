"""Training shards read from where clusters keep them: an S3 server (moto), a GCS emulator, a web server
(python -m http.server) and pipe: commands, all on loopback (tests/servers.py). The records, the batches,
`data.py stats` and train.py's losses equal those of the same shards read from local files; a store that
refuses or is missing is one line before the first step, and a shard that fails mid-run is a counted skip.
"""

import json
import os
import time
import types

import captioned
import pytest
import servers
import torch
from runs import PY, losses, run, tiny_demo_args, train
from test_eval_zeroshot import _tfds_copy

import data
import eval_zeroshot
import factory
import shards

SCHEMES = ("s3", "gs", "http", "pipe")


def _relative(spec: str, root: str) -> str:
    return os.path.relpath(spec, root)


@pytest.fixture(scope="module")
def stores(demo_small, tmp_path_factory):
    """The small demo's tar and TFRecord shards uploaded with the stores' own clients (boto3,
    google-cloud-storage) and served by http.server; specs of the same shards on every scheme."""
    work = str(tmp_path_factory.mktemp("stores"))
    root = demo_small.root
    local = {"wds": demo_small.train_wds, "tfrecord": demo_small.train_tfrecord}
    files = [p for spec in local.values() for p in shards.expand_braces(spec)]
    with (
        servers.s3_server(work) as s3,
        servers.gcs_server(work) as gcs,
        servers.http_server(root, work) as web,
    ):
        s3_client = servers.s3_client(s3)
        bucket = servers.gcs_client(gcs).bucket("clipa")
        for p in files:
            key = _relative(p, root)
            s3_client.upload_file(p, "clipa", key)
            bucket.blob(key).upload_from_filename(p)
        specs = {
            fmt: {
                "local": spec,
                "s3": f"s3://clipa/{_relative(spec, root)}",
                "gs": f"gs://clipa/{_relative(spec, root)}",
                "http": f"{web.url}/{_relative(spec, root)}",
                "pipe": f"pipe:cat {spec}",
            }
            for fmt, spec in local.items()
        }
        yield types.SimpleNamespace(s3=s3, gcs=gcs, web=web, specs=specs, env={**s3.env, **gcs.env})


@pytest.fixture
def store_env(stores, monkeypatch):
    for k, v in stores.env.items():
        monkeypatch.setenv(k, v)
    return stores


def _batches(spec: str, workers: int) -> list:
    loader = data.make_train_loader(spec, None, 32, 64, num_workers=workers, repeat=False, shuffle_buffer=50)
    return [(images.clone(), list(captions)) for images, captions in loader]


def _stats(spec: str) -> tuple:
    out = data.dataset_stats(spec)
    return out["format"], out["shards"], out["samples"], out["skipped_by_reason"], out["mean_caption_chars"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["wds", "tfrecord"])
def test_every_scheme_reads_the_same_records_batches_and_stats(store_env, fmt):
    specs = store_env.specs[fmt]
    assert _stats(specs["local"])[:3] == (fmt, 4, 512)
    want_batches = _batches(specs["local"], workers=1)
    for s in SCHEMES:
        src = shards.resolve(specs[s])
        assert (src.fmt, len(src.shards)) == (fmt, 4), s
        assert _stats(specs[s]) == _stats(specs["local"]), s
        got = _batches(specs[s], workers=1)
        assert len(got) == len(want_batches), s
        for (a, ca), (b, cb) in zip(got, want_batches):
            assert ca == cb and a.equal(b), s


@pytest.mark.slow
def test_a_store_listing_and_a_missing_shard_mid_run(store_env):
    """A glob and a directory on a store list its shards; a shard that is missing when its turn comes is
    one counted unreadable_shard and the rest is read."""
    wds = store_env.specs["wds"]
    names = shards.expand_braces(wds["s3"])
    prefix = os.path.dirname(names[0])
    assert shards.expand_spec(prefix + "/*.tar") == names
    assert shards.expand_spec(prefix) == names  # a "directory": the prefix's shard files
    assert shards.expand_spec(os.path.dirname(shards.expand_braces(wds["gs"])[0]) + "/*.tar") == [
        n.replace("s3://", "gs://") for n in names
    ]
    spec = "::".join([*names[:2], names[0].replace(".tar", "-gone.tar"), *names[2:]])
    stats = data.dataset_stats(spec, decode=False)
    assert (stats["samples"], stats["skipped_by_reason"]) == (512, {"unreadable_shard": 1})


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "http"])
def test_training_from_a_store_is_bit_identical_to_local(stores, uninterrupted, tmp_path, scheme):
    demo = types.SimpleNamespace(train_wds=stores.specs["wds"][scheme])
    train(tiny_demo_args(demo, tmp_path / "run"), **stores.env)
    assert losses(tmp_path / "run")[0] == losses(uninterrupted)[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, spec, env, expect",
    [
        ("missing object", "s3://clipa/nothing/{000..003}.tar", {}, "s3://clipa/nothing/000.tar: not found"),
        ("missing bucket", "s3://no-such-bucket/a.tar", {}, "s3://no-such-bucket/a.tar: not found"),
        ("wrong key", "s3://clipa/x.tar", {"AWS_SECRET_ACCESS_KEY": "wrong"}, "s3://clipa/x.tar: access denied"),
        ("no endpoint", "s3://clipa/x.tar", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "cannot reach the server"),
        ("gs missing", "gs://clipa/nothing.tar", {}, "gs://clipa/nothing.tar: not found"),
    ],
)
def test_a_store_that_refuses_is_one_line_before_the_first_step(stores, tmp_path, case, spec, env, expect):
    p = run(
        [PY, "train.py", "--cfg", "demo", "--train-data", spec, "--out", str(tmp_path / "o")],
        timeout=300,
        **{**stores.env, **env},
    )
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and expect in err[0], (case, p.stderr[-2000:])
    assert not os.path.exists(tmp_path / "o" / "checkpoints")


def test_the_next_shard_is_opened_while_one_is_read(tmp_path, demo_small):
    """read_shards starts opening shard i+1 (here: its command runs) as soon as shard i is handed out."""
    names = shards.expand_braces(demo_small.train_wds)[:2]
    marks = [tmp_path / f"opened{i}" for i in range(2)]
    paths = [f"pipe:touch {m} && cat {n}" for m, n in zip(marks, names)]
    src = shards.Source("wds", paths)
    it = shards.read_shards(paths, src)
    first = next(it)
    deadline = time.monotonic() + 30
    while not marks[1].exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marks[1].exists()  # before a single record of shard 0 was read
    assert len(list(first)) == 128
    assert len(list(next(it))) == 128
    it.close()


# ----------------------------------------------------------------------------- evaluation sets


def _upload_tree(stores, root: str, prefix: str):
    s3 = servers.s3_client(stores.s3)
    bucket = servers.gcs_client(stores.gcs).bucket("clipa")
    for d, _, files in os.walk(root):
        for f in files:
            key = f"{prefix}/{os.path.relpath(os.path.join(d, f), root)}"
            s3.upload_file(os.path.join(d, f), "clipa", key)
            bucket.blob(key).upload_from_filename(os.path.join(d, f))


def _results(args: list, out) -> dict:
    code = eval_zeroshot.main(
        [*map(str, args), "--out", str(out), "--workers", "0", "--device", "cpu", "--no-progress"]
    )
    assert code == 0
    with open(out) as f:
        res = json.load(f)
    for r in (res, res.get("retrieval", {})):
        for k in [k for k in r if "second" in k or k in ("dataset", "checkpoint")]:
            del r[k]
    return res


@pytest.mark.slow
def test_every_eval_layout_from_a_store_gives_the_local_result(store_env, tmp_path):
    """ImageFolder (with its class-name and template files), a TFDS directory, and CLIP_benchmark's
    webdataset, Flickr and COCO retrieval layouts, evaluated from S3 and GCS: the local results."""
    local = captioned.write_layouts(str(tmp_path / "sets"), captioned.make_pairs(24, seed=3, size=32))
    tfds_dir = _tfds_copy(local["imagefolder"], tmp_path / "sets" / "tfds")
    _upload_tree(store_env, str(tmp_path / "sets"), "sets")
    torch.manual_seed(3)
    net = factory.create_model("ViT-Test-8-CL16")
    ckpt = tmp_path / "w.pt"
    torch.save(net.state_dict(), ckpt)
    model = ["--ckpt", ckpt, "--model", "ViT-Test-8-CL16"]
    cases = [
        ["--data", local["imagefolder"], "--classnames", local["classnames"], "--templates", local["templates"]],
        ["--data", tfds_dir, "--classnames", local["classnames"], "--templates", "short"],
        ["--retrieval", local["cb_ret"]],
        ["--retrieval", local["flickr"]],
        ["--retrieval", local["coco"]],
    ]
    root = str(tmp_path / "sets")
    for i, args in enumerate(cases):
        want = _results(model + args, tmp_path / f"local{i}.json")
        for scheme in ("s3", "gs"):
            remote = [a.replace(root, f"{scheme}://clipa/sets") if isinstance(a, str) else a for a in args]
            assert remote != args
            assert _results(model + remote, tmp_path / f"{scheme}{i}.json") == want, (scheme, args)
