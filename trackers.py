"""Experiment trackers: where a training run reports besides its stdout and OUT/metrics.jsonl.

    train.py --report-to tensorboard,wandb ...     # any subset, or none; default tensorboard

Each tracker is one small class with the same three calls: built with the run's directory, its id and
its resolved config; `log(step, scalars)` for every record the run writes to metrics.jsonl; `close()`.
Only the master process builds them (train.py's RunLog).

The run id lives in OUT/tracker_run.json: a fresh run draws a new one, a resumed run reads it back, so
its records continue the same TensorBoard log directory and the same Weights & Biases run.
"""

import contextlib
import importlib.util
import json
import os
import sys

TRACKERS = ("tensorboard", "wandb")
RUN_FILE = "tracker_run.json"


class TrackerError(ValueError):
    """A requested tracker could not start: a one-line usage error (exit 2), before the first step."""


def parse_report_to(value: str) -> tuple[str, ...]:
    """'tensorboard,wandb' -> ('tensorboard', 'wandb'); 'none' -> (). Raises ValueError (one line)."""
    names = [n.strip() for n in value.split(",")]
    if names == ["none"]:
        return ()
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise ValueError(
            f"--report-to {value!r}: unknown tracker {bad[0]!r}; valid: {', '.join(TRACKERS)} (comma-separated) or none"
        )
    return tuple(dict.fromkeys(names))


def check_installed(names: tuple[str, ...]) -> None:
    """One-line ValueError naming the install command when a requested tracker's package is missing
    (checked before the first step, not after it)."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"--report-to {name}: the {name} package is not installed (pip install {name})")


def run_id(out: str, resumed: bool) -> str:
    """The trackers' run id: read back from OUT/tracker_run.json when the run resumes (and the file is
    there), else a new one, written there atomically."""
    path = os.path.join(out, RUN_FILE)
    if resumed:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            with open(path) as f:
                rid = json.load(f)["run_id"]
            if isinstance(rid, str) and rid.isalnum() and len(rid) <= 64:  # a name in paths and URLs
                return rid
    rid = os.urandom(6).hex()  # not from the seeded RNGs: those must stay untouched
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"run_id": rid}, f)
    os.replace(tmp, path)
    return rid


class Tracker:
    """The interface: one scalar record at a global step, then close. A tracker that fails to write
    warns once and training goes on (its logs never stop a run)."""

    name = ""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        try:
            self._log(step, scalars)
        except Exception as e:  # noqa: BLE001 - a tracker's library raises many types
            self._warn(e)

    def close(self) -> None:
        try:
            self._close()
        except Exception as e:  # noqa: BLE001
            self._warn(e)

    def _warn(self, e: Exception) -> None:
        if not getattr(self, "_warned", False):
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"warning: {self.name} not written ({first}); training goes on", file=sys.stderr, flush=True)
            self._warned = True

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class TensorBoard(Tracker):
    """Event files in OUT/tensorboard/RUN_ID. A resumed run writes to the same directory with
    purge_step = the checkpoint's step + 1: TensorBoard then hides the steps the previous process logged
    after that checkpoint, which the resumed run logs again."""

    name = "tensorboard"

    def __init__(self, out: str, rid: str, config: dict, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(os.path.join(out, "tensorboard", rid), purge_step=purge)
        at = resume_step or 0
        self.writer.add_text("run_id", rid, at)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", at)  # markdown

    def _log(self, step, scalars):
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def _close(self):
        self.writer.close()


class WandB(Tracker):
    """A Weights & Biases run with id RUN_ID (resume="allow": a resumed run continues it), project
    $WANDB_PROJECT or clipa, files in $WANDB_DIR or OUT. Its x axis is the run's global step (logged as
    `step`), so the records a resumed run logs again land on their own steps."""

    name = "wandb"

    def __init__(self, out: str, rid: str, config: dict, resume_step: int | None):
        import wandb  # optional: check_installed named the install command before the run

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "clipa",
            id=rid,
            resume="allow",
            config=config,
            dir=None if os.environ.get("WANDB_DIR") else out,
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def _log(self, step, scalars):
        self.run.log({**scalars, "step": step})

    def _close(self):
        self.run.finish()


CLASSES = {"tensorboard": TensorBoard, "wandb": WandB}


def open_trackers(names: tuple[str, ...], out: str, config: dict, resume_step: int | None) -> list[Tracker]:
    """The requested trackers of one run (master process only), sharing one run id that is also part
    of each one's config. A tracker that cannot start (e.g. wandb online without a login) raises
    TrackerError with the library's first line."""
    if not names:
        return []
    rid = run_id(out, resume_step is not None)
    config = {**config, "run_id": rid}
    opened = []
    for name in names:
        try:
            opened.append(CLASSES[name](out, rid, config, resume_step))
        except Exception as e:  # noqa: BLE001 - the library's own errors, reported in one line
            for t in opened:
                t.close()
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TrackerError(f"--report-to {name}: {first}") from None
    return opened
