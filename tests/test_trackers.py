"""--report-to: the trackers' files read back with readers we did not write (TensorBoard's
EventAccumulator; Weights & Biases' own protobuf records, in its offline mode)."""

import glob
import json
import os
import struct

import pytest
from runs import losses as _losses
from runs import tiny_demo_args, train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import trackers
import train as train_script

# ----------------------------------------------------------------------------- readers


def tensorboard_scalars(log_dir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the event files in log_dir, as TensorBoard shows them (steps purged
    by a resumed writer dropped)."""
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def wandb_records(path: str):
    """The wandb Record protobufs of an offline run's .wandb file. The file is a LevelDB-style log
    (32 KiB blocks of chunks: crc32c, uint16 length, type 1 full / 2 first / 3 middle / 4 last) after
    a 7-byte ':W&B' header; each whole record is one serialised wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:4] == b":W&B", raw[:7]
    pos, block, parts = 7, 32768, []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header: padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", raw[pos + 4 : pos + 7])
        chunk = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        parts.append(chunk)
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


def wandb_run(run_dir: str) -> tuple[str, dict, dict[str, dict[int, float]]]:
    """(run id, config, {key: {step: value}}) of one offline run directory."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    rid, config, history = None, {}, {}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            rid = rec.run.run_id
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            for k, v in row.items():
                if isinstance(v, (int, float)) and not k.startswith("_") and k != "step":
                    history.setdefault(k, {})[row["step"]] = v
    return rid, config, history


def metric_series(out) -> dict[str, dict[int, float]]:
    """{key: {step: value}} of metrics.jsonl, the last record of a step winning (a resumed run logs
    the steps after its checkpoint again)."""
    series = {}
    for r in _losses(out)[1]:
        for k, v in r.items():
            if isinstance(v, (int, float)) and k not in ("step", "time"):
                series.setdefault(k, {})[r["step"]] = v
    return series


# ----------------------------------------------------------------------------- fast


def test_report_to_parses_subsets_and_refuses_unknown_names():
    assert trackers.parse_report_to("tensorboard") == ("tensorboard",)
    assert trackers.parse_report_to("wandb, tensorboard") == ("wandb", "tensorboard")
    assert trackers.parse_report_to("none") == ()
    for bad in ("mlflow", "tensorboard,none", "", "tensorboard,,wandb"):
        with pytest.raises(ValueError, match="valid: tensorboard, wandb"):
            trackers.parse_report_to(bad)


def test_missing_wandb_is_one_line_naming_the_install(monkeypatch, capsys, tmp_path):
    """Asked for and not installed: exit 2 and one line with the install command, before any data is read."""
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    status = train_script.main(
        ["--cfg", "demo", "--train-data", str(tmp_path / "none.tar"), "--out", str(tmp_path), "--report-to", "wandb"]
    )
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.count("\n") == 0 and "pip install wandb" in err, err


def test_run_id_is_kept_for_a_resume_and_new_for_a_fresh_run(tmp_path):
    first = trackers.run_id(str(tmp_path), resumed=False)
    assert trackers.run_id(str(tmp_path), resumed=True) == first
    second = trackers.run_id(str(tmp_path), resumed=False)
    assert second != first and trackers.run_id(str(tmp_path), resumed=True) == second
    (tmp_path / trackers.RUN_FILE).write_text('{"run_id": "../../etc"}')  # not a name: a new id
    assert trackers.run_id(str(tmp_path), resumed=True).isalnum()


def test_tensorboard_resume_purges_the_steps_logged_after_the_checkpoint(tmp_path):
    """A run killed after logging step 5 resumes from its step-3 checkpoint: TensorBoard shows steps
    4 and 5 of the resumed run only (purge_step), in the same log directory."""
    first = trackers.TensorBoard(str(tmp_path), "r1", {"a": 1}, resume_step=None)
    for step in range(1, 6):
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = trackers.TensorBoard(str(tmp_path), "r1", {"a": 1}, resume_step=3)
    for step in range(4, 7):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    assert os.listdir(tmp_path / "tensorboard") == ["r1"]
    assert tensorboard_scalars(str(tmp_path / "tensorboard" / "r1"))["loss"] == {
        1: 1.0,
        2: 2.0,
        3: 3.0,
        4: 40.0,
        5: 50.0,
        6: 60.0,
    }


# ----------------------------------------------------------------------------- a real run


@pytest.mark.slow
def test_a_resumed_run_reports_the_same_scalars_to_both_trackers(demo_small, tmp_path):
    """train.py --report-to tensorboard,wandb, stopped at step 5 and resumed to the end with a
    zero-shot eval: TensorBoard's events and the offline wandb run hold metrics.jsonl's numbers
    (per-stage step, samples, lr, loss, logit scale, data wait, skipped, eval results), the config and
    the run id; the resumed process continued the same tracker run."""
    out, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    args = tiny_demo_args(
        demo_small,
        out,
        "--report-to",
        "tensorboard,wandb",
        "--resume",
        "auto",
        "--eval-data",
        demo_small.val_dir,
        "--eval-classnames",
        os.path.join(demo_small.root, "classnames.txt"),
        "--eval-templates",
        os.path.join(demo_small.root, "templates.txt"),
        "--set",
        "finetune.train_num_samples=32",
    )
    offline = dict(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), WANDB_SILENT="true")
    train([*args, "--max-steps", "5"], **offline)
    rid = json.loads((out / trackers.RUN_FILE).read_text())["run_id"]
    train(args, **offline)
    assert json.loads((out / trackers.RUN_FILE).read_text())["run_id"] == rid

    want = metric_series(out)
    assert max(want["loss"]) == 10 and "eval_top1" in want  # 8 + 2 steps, evaluated
    keys = ("stage_step", "samples", "lr", "loss", "logit_scale", "data_wait", "skipped_samples", "eval_top1")

    assert os.listdir(out / "tensorboard") == [rid]  # the resumed run wrote to the same directory
    tb = tensorboard_scalars(str(out / "tensorboard" / rid))
    for k in keys:
        assert tb[k] == pytest.approx(want[k], rel=1e-6), k

    runs = sorted(glob.glob(str(wandb_dir / "wandb" / f"offline-run-*-{rid}*")))
    assert len(runs) == 2  # one per process, both of the run with our id
    history = {}
    for run_dir in runs:
        got_id, config, part = wandb_run(run_dir)
        assert got_id == rid and config["run_id"] == rid
        assert config["run"]["report_to"] == "tensorboard,wandb" and config["stages"][0]["name"] == "pretrain"
        for k, series in part.items():
            history.setdefault(k, {}).update(series)  # the resumed process's records win, as in metrics.jsonl
    for k in keys:
        assert history[k] == pytest.approx(want[k], rel=1e-6), k


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    """Online Weights & Biases without a login: wandb's own reason, in one line, before any step."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.raises(trackers.TrackerError, match="^--report-to wandb: .*API key") as err:
        trackers.open_trackers(("tensorboard", "wandb"), str(tmp_path), {"a": 1}, None)
    assert "\n" not in str(err.value)
