"""CLIPA training: the contrastive step, accumulation, checkpoints and resume, the run log, the loop.

    torchrun --nproc_per_node 8 train.py --cfg l16_i37_t8 --train-data '/data/laion/{00000..41407}.tar'
    python xla_utils.py launch train.py --cfg h14_v2 --train-data ...        # TPU VM (SPMD)
    python train.py --cfg b16_i50_t16 --dry-run --batch-size 4096               # print resolved stages
    python train.py --cfg l16_i37_t8 --flops                                    # FLOPs per stage

A preset (config.py) is a list of stages: pre-train at few tokens, then fine-tune at full length.
train.py runs the selected stages in order, each one initialised from the previous stage's last
checkpoint; finetune.py runs the fine-tune stages from a given pre-trained checkpoint with the same
functions. The path of one step: the loader's uint8 batch -> the device -> normalised there -> both
towers -> the loss over the gathered features -> AdamW -> now and then an atomic checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

import checkpoints
import cli
import config
import data
import eval_zeroshot
import factory
import losses
import model as model_lib
import plan
import shards
import storage
import trackers
import transforms
import xla_utils
from config import RunConfig, Stage

# ----------------------------------------------------------------------------- the step


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only (biases, norms, class token, logit_scale: ndim < 2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
    ]


def build_optimizer(model, stage: Stage, rt: xla_utils.Runtime) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, stage.weight_decay),
        lr=stage.resolved_lr,
        betas=(0.9, 0.95),
        eps=1e-6,
        **rt.optimizer_kwargs(),
    )


def lr_at(step: int, stage: Stage) -> float:
    """Linear warmup to the peak, then cosine to zero, per step (step counts from 0). Never exactly 0
    (0 and 1 are special constants to XLA: a new graph)."""
    peak, warmup, total = stage.resolved_lr, stage.warmup, stage.steps
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * peak


class Step:
    """One optimizer step, built once per stage: the model, its optimizer, the loss and the compiled
    graphs. step(images, tokens, lr) takes this rank's batch (uint8 images [b,3,H,W] and tokens [b,T],
    on the host or already on the device) and returns the global batch's loss, on the device; the
    caller marks rt.step_boundary after it.

    Nothing in it waits for the device. When any rank's loss is not finite the update is dropped on
    the device (rt.optimizer_step) and counted in `tally`, which the host reads at its decision
    points (nonfinite()). accum_steps K > 1: the exact full-batch gradient in K chunks (see
    _accumulate). compiled: the forward and the loss torch.compile'd (once per stage: shapes are
    static) and run with deterministic kernels, since compiled scatter-adds would make a resumed run
    differ."""

    def __init__(
        self,
        rt: xla_utils.Runtime,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss: losses.ContrastiveLoss,
        *,
        precision: str = "fp32",
        accum_steps: int = 1,
        compiled: bool = False,
    ):
        self.rt = rt
        self.model = model  # what is called: the CLIP itself, or its DDP / FSDP wrapper
        self.optimizer = optimizer
        self.loss = loss
        self.precision = precision
        self.accum_steps = accum_steps
        self.features = rt.compile(self._features) if compiled else self._features
        self.batch_loss = rt.compile(self._batch_loss) if compiled else self._batch_loss
        self.context = rt.deterministic if compiled else contextlib.nullcontext
        # on the device, since the step was built: [steps, dropped steps, the first and the last
        # dropped one (1-based step numbers; 0: none)]; cumulative, so every step runs one graph
        self.tally = torch.zeros(4, dtype=rt.count_dtype, device=rt.device)
        self._read = 0  # dropped steps the host has seen

    def _features(self, images: torch.Tensor, tokens: torch.Tensor) -> losses.Features:
        """uint8 images [b,3,H,W] and tokens [b,T] on the device -> what the loss needs, in fp32."""
        clip = model_lib.unwrap(self.model)
        x = transforms.normalize(images, clip.cfg.image_mean, clip.cfg.image_std)
        with self.rt.autocast(self.precision):
            image, text, scale = self.model(x, tokens)
        return losses.Features(image.float(), text.float(), scale.float(), clip.logit_bias)

    def _batch_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Forward and loss of one batch: one graph when compiled."""
        return self.loss(self._features(images, tokens))

    def __call__(self, images: torch.Tensor, tokens: torch.Tensor, lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if images.shape[0] % self.accum_steps:
            raise ValueError(f"per-rank batch {images.shape[0]} is not divisible by --accum-steps {self.accum_steps}")
        if images.device != self.rt.device:  # a host batch (the loop's feed hands over device ones)
            images, tokens = self.rt.to_device(images, tokens)
        with self.context():  # the backward too: it is compiled lazily, on its first call
            if self.accum_steps == 1:
                loss = self.batch_loss(images, tokens)
                loss.backward()
            else:
                loss = self._accumulate(images, tokens)
        loss = loss.detach()
        with torch.no_grad():
            drop = self.rt.any_on_device(~torch.isfinite(loss))
            self.rt.optimizer_step(self.optimizer, drop)
            self.optimizer.zero_grad(set_to_none=True)
            model_lib.unwrap(self.model).logit_scale.clamp_(0, math.log(100))
            n, bad, first, last = self.tally.unbind()
            n = n + 1
            hit = drop.to(self.tally.dtype)
            self.tally = torch.stack(
                [n, bad + hit, torch.where(drop & (bad == 0), n, first), torch.where(drop, n, last)]
            )
        return loss

    def nonfinite(self) -> tuple[int, int, int]:
        """A host read of the tally (one transfer): (steps dropped since the last call, the first ever
        and the last dropped step, 1-based over this Step's calls)."""
        _, bad, first, last = self.tally.tolist()
        new, self._read = bad - self._read, bad
        return new, first, last

    def _accumulate(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Gradient of the full-batch loss in K chunks (feature caching, as OpenCLIP accumulates): a
        no-grad pass caches every chunk's features; then each chunk is recomputed with grad, and the
        full-batch loss, with the other chunks' cached features, is backpropagated through it. The
        RNG is replayed so both passes draw the same image masks. The logit scale's own gradient is
        taken once, in the last pass: the one DDP synchronises, so every parameter has a gradient."""
        k = self.accum_steps
        chunks = list(zip(images.chunk(k), tokens.chunk(k)))
        rng_states = []
        cache = []
        with torch.no_grad():
            for x, t in chunks:
                rng_states.append(self.rt.rng_state())
                cache.append(self.features(x, t))
        after = self.rt.rng_state()
        for j, (x, t) in enumerate(chunks):
            self.rt.set_rng_state(rng_states[j])
            last = j == k - 1
            # DDP all-reduces gradients in the last backward only
            syncing = last or not hasattr(self.model, "no_sync")
            with contextlib.nullcontext() if syncing else self.model.no_sync():
                mine = self.features(x, t)
                image = torch.cat([mine.image if i == j else c.image for i, c in enumerate(cache)])
                text = torch.cat([mine.text if i == j else c.text for i, c in enumerate(cache)])
                scale, bias = mine.scale, mine.bias
                if not last:
                    scale = scale.detach()
                    bias = None if bias is None else bias.detach()
                loss = self.loss(losses.Features(image, text, scale, bias))
                loss.backward()
        self.rt.set_rng_state(after)
        return loss


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_root(out: str) -> str:
    return os.path.join(out, "checkpoints")


def local_out(out: str) -> str:
    """Where the run writes first: --out itself, or for a remote --out (s3://, gs://) its local staging
    directory, from which checkpoints and logs are uploaded at every save and at the end."""
    return checkpoints.staging_dir(out) if storage.is_remote(out) else out


def upload_logs(run: RunConfig) -> None:
    """A remote --out: metrics.jsonl and the TensorBoard files copied from the staging directory to the
    store (master only). A failure warns: training goes on, the next save tries again."""
    if not storage.is_remote(run.out):
        return
    local = local_out(run.out)
    names = ["metrics.jsonl", trackers.RUN_FILE]
    for d, _, files in os.walk(os.path.join(local, "tensorboard")):  # event files, one folder per run id
        names += sorted(os.path.relpath(os.path.join(d, f), local) for f in files)
    try:
        for name in names:
            if os.path.isfile(os.path.join(local, name)):
                storage.upload(os.path.join(local, name), os.path.join(run.out, name))
    except OSError as e:
        print(f"warning: logs not uploaded ({e}); training goes on", file=sys.stderr, flush=True)


def fetch_logs(run: RunConfig) -> None:
    """A remote --out: its metrics.jsonl (and the trackers' run id, which a resumed run continues) copied
    into the staging directory before the run appends to it (a fresh machine has none; the store's is
    the one that counts). ValueError when the store fails."""
    if not storage.is_remote(run.out):
        return
    try:
        for name in ("metrics.jsonl", trackers.RUN_FILE):
            remote, local = os.path.join(run.out, name), os.path.join(local_out(run.out), name)
            if os.path.exists(local):
                os.remove(local)  # a failed download then leaves none, which the end of the run cannot upload
            if storage.exists(remote):
                storage.download(remote, local)
    except OSError as e:
        raise ValueError(f"--out {run.out}: {e}") from None


class RunStopped(Exception):
    """The run cannot go on (non-finite loss or weights, checkpoint not written): one line, exit 1."""


def save_checkpoint(rt, run: RunConfig, model, optimizer, state: dict, stage: Stage) -> str | None:
    """OUT/checkpoints/step_XXXXXXXX/{model.safetensors, train_state.pt, meta.json} (written by
    checkpoints.write_checkpoint: atomic, `latest` always complete, pruned to --keep). Collective:
    every rank calls it (each rank's loader and RNG state are gathered). Returns the path, or None
    when the write failed (disk full...): the previous checkpoint stays, the caller decides."""
    weights, optimizer_state = rt.full_state(model, optimizer)  # gathered from the shards under FSDP
    if rt.agree(not all(torch.isfinite(v).all() for v in weights.values())):
        raise RunStopped(
            f"the weights are not finite at step {state['step']}: not saving them; "
            f"the newest good checkpoint stays in {checkpoint_root(run.out)}"
        )
    per_rank = rt.all_gather_object({"rng": rt.rng_state(), "data": state.pop("data")})
    path = None
    try:
        if rt.is_master:
            train_state = dict(
                state,
                optimizer=optimizer_state,
                world_size=rt.world_size,
                rng=[r["rng"] for r in per_rank],
                data=[r["data"] for r in per_rank],
            )
            meta = {k: v for k, v in state.items() if k != "config"}
            meta.update(model=stage.model, time=datetime.datetime.now(datetime.UTC).isoformat())
            remote = storage.is_remote(run.out)
            path = checkpoints.write_checkpoint(
                checkpoint_root(local_out(run.out)),  # a remote --out: staged, then uploaded below
                f"step_{state['step']:08d}",
                weights,
                factory.weights_metadata(stage.model, model_lib.unwrap(model).cfg),
                train_state,
                meta,
                keep=1 if remote else run.keep,
                protected=state["stage_ends"],
            )
            if remote:
                path = checkpoints.publish_checkpoint(
                    path, checkpoint_root(run.out), keep=run.keep, protected=state["stage_ends"]
                )
                upload_logs(run)
    except OSError as e:
        print(
            f"warning: checkpoint of step {state['step']} not written ({e}); the previous one stays",
            file=sys.stderr,
            flush=True,
        )
    finally:
        rt.barrier()
    return path if rt.is_master else ""


# what a bit-exact continuation depends on besides the stage's own fields
EXACT_RUN_FIELDS = ("seed", "workers", "accum_steps")


def word_counts_sha256(stages) -> dict[str, str]:
    """Stage name -> sha256 of the word counts file its frequency masking reads: recorded in the run's
    config (checkpoints) and metrics, and compared on resume (the path alone may name other counts)."""
    return {s.name: s.tokenizer().counts_sha256 for _, s in stages if s.text_reduction == "frequency"}


def saved_checkpoints(out: str) -> list[str]:
    """What in OUT/checkpoints a run would resume from or write over: the `latest` pointer and the
    step_NNNNNNNN directories, oldest first."""
    root = checkpoint_root(out)
    if storage.is_remote(out):  # complete or not: an upload cut short would be written over as well
        names = checkpoints.remote_step_dirs(root)
        return names + ["latest"] if storage.exists(os.path.join(root, "latest")) else names
    if not os.path.isdir(root):
        return []
    names = sorted(d for d in os.listdir(root) if re.fullmatch(r"step_\d{8}", d))
    return names + ["latest"] if os.path.lexists(os.path.join(root, "latest")) else names


def load_resume_state(spec: str, run: RunConfig, stages) -> tuple[str | None, dict | None, str]:
    """--resume latest|auto|DIR -> (checkpoint dir, its train state, a note), checked against the
    preset and against the settings the checkpoint was trained with. `latest` steps back past corrupt
    checkpoints (torn, empty or non-finite files) to the newest whole one; the note names those
    skipped. A corrupt checkpoint named explicitly is refused. `auto` is `latest` when --out holds a
    checkpoint, else (None, None, ""): a fresh start, so that one command is re-run after every stop."""
    root = checkpoint_root(run.out)
    if spec not in ("latest", "auto"):
        path = checkpoints.resolve_checkpoint(spec)  # a URL: downloaded
        return path, _resume_state(path, run, stages), ""
    if storage.is_remote(run.out):
        return _remote_resume_state(spec, run, stages)
    if os.path.lexists(os.path.join(root, "latest")):
        newest = checkpoints.resolve_checkpoint(root)
    elif spec == "auto" and saved_checkpoints(run.out):
        # killed between a first checkpoint's directory and its pointer: the directories are all there is
        newest = os.path.join(root, saved_checkpoints(run.out)[-1])
    elif spec == "auto":
        return None, None, ""
    else:
        raise FileNotFoundError(f"--resume latest: no checkpoint in {root}")
    skipped = []
    for path in [newest, *checkpoints.older_checkpoints(newest)]:
        try:
            state = _resume_state(path, run, stages)
        except checkpoints.CorruptCheckpoint as e:
            skipped.append(f"{os.path.basename(path)} ({cli.first_line(e, 300)})")
            continue
        note = f"warning: --resume {spec} skipped {'; '.join(skipped)}: resuming from {path}" if skipped else ""
        return path, state, note
    raise checkpoints.CorruptCheckpoint(f"--resume {spec}: no whole checkpoint in {root}: {'; '.join(skipped)}")


def _remote_resume_state(spec: str, run: RunConfig, stages) -> tuple[str | None, dict | None, str]:
    """load_resume_state for a remote --out. `latest` on the store names the newest committed checkpoint
    (newer step prefixes are uploads it never committed: ignored); each candidate is downloaded and
    checked against its manifest before it is read, then as a local one is. Without `latest` (killed
    during or right after the first upload) the newest complete step prefix; for `auto` none complete
    (only uploads cut short) is a fresh start. Returns the local copy's path."""
    root = checkpoint_root(run.out)
    names = checkpoints.remote_step_dirs(root)
    newest = checkpoints.read_remote_pointer(os.path.join(root, "latest"))
    if newest is None and not names:
        if spec == "auto":
            return None, None, ""
        raise FileNotFoundError(f"--resume latest: no checkpoint in {root}")
    candidates = ([newest] if newest else []) + [d for d in reversed(names) if newest is None or d < newest]
    skipped, only_cut_short = [], True
    for name in candidates:
        url = os.path.join(root, name)
        try:
            dest = os.path.join(checkpoints.download_dir(), "resume", name)
            path = checkpoints.download_checkpoint(url, dest, manifest=True)
            state = _resume_state(path, run, stages)
        except checkpoints.CorruptCheckpoint as e:
            only_cut_short &= isinstance(e, checkpoints.IncompleteUpload)
            skipped.append(f"{name} ({cli.first_line(e, 300)})")
            continue
        note = f"warning: --resume {spec} skipped {'; '.join(skipped)}: resuming from {url}" if skipped else ""
        return path, state, note
    if spec == "auto" and newest is None and only_cut_short:
        return None, None, f"warning: --resume auto: {root} holds only uploads cut short: starting fresh"
    raise checkpoints.CorruptCheckpoint(f"--resume {spec}: no whole checkpoint in {root}: {'; '.join(skipped)}")


def _resume_state(path: str, run: RunConfig, stages) -> dict:
    """The train state of checkpoint `path` if the run can continue from it (CorruptCheckpoint when
    its files are missing, torn or not finite; ValueError when it belongs to another run)."""
    file = os.path.join(path, "train_state.pt")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"not a training checkpoint directory: {path}")
    if not os.path.isfile(file):
        raise checkpoints.CorruptCheckpoint(f"not a training checkpoint directory (no train_state.pt): {path}")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign file before refusing it
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
        idx, name, saved = state["stage_index"], state["stage_name"], json.loads(state["config"])
        saved_cfg = saved["run"]["cfg"]
    except Exception as e:  # refused pickle, truncated zip, another structure: not our train state
        reason = f"{type(e).__name__}: {cli.first_line(e, 160)}"
        raise checkpoints.CorruptCheckpoint(f"{file} is not a readable train state ({reason})") from None
    preset = config.PRESETS[run.cfg].stages
    if saved_cfg != run.cfg or idx >= len(preset) or preset[idx].name != name:
        raise ValueError(
            f"{path} is stage {name!r} of preset {saved_cfg}, not of {run.cfg} "
            f"(stages: {', '.join(s.name for s in preset)})"
        )
    changed = [
        f"{k} {saved['run'].get(k)} -> {getattr(run, k)}"
        for k in EXACT_RUN_FIELDS
        if saved["run"].get(k) != getattr(run, k)
    ]
    if saved["run"].get("shard", "none") != run.shard:  # the optimizer state's layout differs
        raise ValueError(f"{path} was saved with --shard {saved['run'].get('shard', 'none')}: resume with it")
    now, then = dict(stages), {s["name"]: s for s in saved["stages"]}.get(name, {})
    if idx in now:
        changed += [
            f"{name}.{k} {then[k]} -> {v}"
            for k, v in dataclasses.asdict(now[idx]).items()
            if k in then and then[k] != v and k != "word_counts"  # its content is compared below
        ]
        sha_then = saved.get("word_counts_sha256", {}).get(name)
        sha_now = word_counts_sha256([(idx, now[idx])]).get(name)
        if sha_then != sha_now:
            changed.append(f"{name}.word_counts sha256 {str(sha_then)[:12]} -> {str(sha_now)[:12]}")
    if changed and not run.force_resume:
        raise ValueError(
            f"{path} was trained with other settings ({'; '.join(changed)}): resuming would "
            f"not continue it exactly; pass --force-resume to continue anyway"
        )
    checkpoints.check_checkpoint(path, state)  # whole and finite, or the run could never save
    if idx in now:
        factory.check_weights_fit(path, now[idx].model_config())
    return state


# ----------------------------------------------------------------------------- logging


class RunLog:
    """What a run reports: lines on the master's stdout, records in OUT/metrics.jsonl (each with the
    invocation's run id, so that steps re-run after a resume stay apart) and their numbers to the
    --report-to trackers (trackers.py; config: the resolved run, resume_step: the checkpoint's step
    when resuming). A failing disk never stops training through its logs: the failure is reported once."""

    def __init__(
        self,
        rt: xla_utils.Runtime,
        out: str,
        report_to: tuple[str, ...] = (),
        config: dict | None = None,
        resume_step: int | None = None,
    ):
        self.rt = rt
        self.file = None
        self.trackers: list[trackers.Tracker] = []
        self._warned = False
        self.run_id = os.urandom(4).hex()  # not from the seeded RNGs: those must stay untouched
        if rt.is_master:
            os.makedirs(out, exist_ok=True)
            self.file = open(os.path.join(out, "metrics.jsonl"), "a")  # noqa: SIM115 - open for the run
            config = {**(config or {}), "invocation": self.run_id}
            self.trackers = trackers.open_trackers(report_to, out, config, resume_step)
        self.start_interval(0)

    def start_interval(self, stage_step: int):
        """A new progress interval begins after `stage_step`: its time, and the time spent waiting."""
        self._t = time.time()
        self._step = stage_step
        self.data_wait = 0.0  # seconds spent in next(batches) during this interval

    def info(self, msg: str):
        if self.rt.is_master:
            print(msg, flush=True)

    def record(self, rec: dict):
        if not self.rt.is_master:
            return
        try:
            self.file.write(json.dumps({**rec, "run": self.run_id}) + "\n")
            self.file.flush()
        except OSError as e:
            if not self._warned:
                print(f"warning: metrics not written ({e}); training goes on", file=sys.stderr, flush=True)
                self._warned = True
        # the trackers get the record's numbers (bools and wall-clock time are no curves)
        scalars = {
            k: v
            for k, v in rec.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")
        }
        for t in self.trackers:
            t.log(rec["step"], scalars)

    def progress(
        self,
        stage: Stage,
        loss,
        scale,
        lr: float,
        step: int,
        stage_step: int,
        samples: int,
        skipped: int,
        shares: list[float] | None = None,
    ):
        """One progress record. A step closure: it runs once the step's values exist on the host (XLA:
        after the graph ran), and reads host values only (a device op here would be another graph).
        shares: a weighted mixture's realised share per source (the master's loader, since the stage began)."""
        now = time.time()
        dt = now - self._t
        steps_done = stage_step - self._step
        wait = self.data_wait / dt if dt > 0 else 0.0  # the interval's share spent waiting for a batch
        self.start_interval(stage_step)
        loss_value = self.rt.mean_over_ranks(loss.item())
        scale_value = math.exp(scale.item())
        samples_per_s = steps_done * stage.batch_size / dt if dt > 0 else 0.0
        eta_s = (stage.steps - stage_step) * dt / max(1, steps_done)
        eta = datetime.timedelta(seconds=int(max(0, eta_s)))
        compiles = self.rt.compile_count()
        rec = {
            "step": step,
            "stage": stage.name,
            "stage_step": stage_step,
            "loss": loss_value,
            "lr": lr,
            "logit_scale": scale_value,
            "samples_per_s": samples_per_s,
            "samples": samples,
            "skipped_samples": skipped,
            "data_wait": wait,
            "time": now,
        }
        line = (
            f"step {step} [{stage.name} {stage_step}/{stage.steps}] {samples_per_s:.1f} samples/s | "
            f"loss {loss_value:.4f} | lr {lr:.3e} | logit scale {scale_value:.2f} | skipped {skipped} | "
            f"data wait {100 * wait:.0f}% | ETA {eta}"
        )
        if compiles is not None:
            rec["compiles"] = compiles
            line += f" | compiles {compiles}"
        if shares is not None:
            rec.update({f"source_share_{k}": share for k, share in enumerate(shares)})
            line += " | sources " + "/".join(f"{100 * share:.1f}" for share in shares) + "%"
        self.record(rec)
        self.info(line)

    def close(self):
        for t in self.trackers:
            t.close()
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()


# ----------------------------------------------------------------------------- inputs


@dataclass
class EvalSet:
    data: str | None  # zero-shot classification set
    classnames: list[str]
    templates: list[str]
    retrieval: str | None = None  # captioned set for retrieval


@dataclass
class Inputs:
    """Everything a run reads besides its shards, checked before the first step."""

    resume_path: str | None = None
    resume_state: dict | None = None
    resume_note: str = ""  # the corrupt checkpoints --resume latest stepped back past
    eval: EvalSet | None = None


def check_inputs(run: RunConfig, stages: list[tuple[int, Stage]]) -> Inputs:
    """Validate what the run will need (data, eval set, checkpoints) up front: a mistake costs a
    one-line error now, not a crash at the end of a stage. Raises ValueError / FileNotFoundError."""
    check_paths(run)
    trackers.check_installed(trackers.parse_report_to(run.report_to))
    if run.pretrained and not storage.exists(run.pretrained):
        raise FileNotFoundError(f"--pretrained: no such file or directory: {run.pretrained}")
    if os.path.exists(run.out) and not os.path.isdir(run.out):
        raise ValueError(f"--out {run.out} is a file, not a directory")
    if not run.resume and saved_checkpoints(run.out):
        # a fresh start would write over them, and pruning would then delete its own new checkpoints
        raise ValueError(
            f"--out {run.out} already holds checkpoints: pass --resume auto to continue that run, "
            f"or train into another --out"
        )
    for _, s in stages:
        if not s.train_data:
            raise ValueError(
                f"stage {s.name} of preset {run.cfg}: no training data; give --train-data "
                f"SPEC (webdataset tars, TFRecords or a TFDS dir)"
            )
        storage.check_supported(s.train_data)
        try:
            data.resolve_sources(s.train_data, s.mixture_weights, s.train_format)
        except shards.FormatUnknown as e:  # its message asks for data.py's --format
            raise ValueError(e.asking("--train-format")) from None
    inputs = Inputs()
    if run.eval_data or run.eval_retrieval:
        inputs.eval = EvalSet(run.eval_data, [], [], run.eval_retrieval)
        if run.eval_retrieval:
            eval_zeroshot.load_caption_set(run.eval_retrieval)  # a readable captioned set
    if run.eval_data:
        if not storage.exists(run.eval_data):
            raise FileNotFoundError(f"--eval-data: no such directory: {run.eval_data}")
        inputs.eval.classnames = eval_zeroshot.load_classnames(run.eval_classnames)
        eval_zeroshot.check_eval_set(run.eval_data, inputs.eval.classnames, split=run.eval_split)
        inputs.eval.templates = eval_zeroshot.load_templates(run.eval_templates)
    if run.resume:
        inputs.resume_path, inputs.resume_state, inputs.resume_note = load_resume_state(run.resume, run, stages)
    if inputs.resume_state is None and run.pretrained:  # the first stage starts from it: its weights must fit
        factory.create_model(stages[0][1].model_config(), pretrained=run.pretrained)
    return inputs


def check_paths(run: RunConfig) -> None:
    """--out: a local path, s3:// or gs:// (its bucket must exist and answer to the credentials given);
    --pretrained and --resume CKPT: a local path, s3://, gs:// or http(s)://. Anything else is refused in
    one line, never taken for a local directory named `gs:`; file:// URLs become the paths they name."""
    for name in ("out", "pretrained", "resume"):
        path = getattr(run, name)
        if not path or (name == "resume" and path in ("latest", "auto")):
            continue
        storage.check_supported(path)
        s = storage.scheme(path)
        if name == "out" and s in storage.READ_ONLY:
            raise ValueError(f"--out {path}: {s}: is read only; write to a local path, s3:// or gs://")
        if s == "pipe":
            raise ValueError(f"{config.flag(name)} {path}: checkpoints are read from a path or a URL, not a pipe:")
        if not storage.is_remote(path):
            setattr(run, name, storage.local_path(path))
    if storage.is_remote(run.out):
        try:
            storage.makedirs(run.out)  # the bucket exists and the credentials reach it, before any work
        except OSError as e:
            raise ValueError(f"--out {run.out}: {e}") from None


def check_layout(rt: xla_utils.Runtime, run: RunConfig, stages, inputs: Inputs) -> None:
    """Batches split evenly over ranks, accumulation steps and (XLA) devices; exact resume needs the
    saved rank count."""
    saved = inputs.resume_state["world_size"] if inputs.resume_state else rt.world_size
    if saved != rt.world_size and not run.force_resume:
        raise ValueError(
            f"{inputs.resume_path} was saved by {saved} ranks, this run has {rt.world_size}: "
            f"the data would resume at shard granularity; pass --force-resume to continue anyway"
        )
    for _, s in stages:
        if s.batch_size % (rt.world_size * run.accum_steps):
            raise ValueError(
                f"stage {s.name}: batch size {s.batch_size} is not divisible by "
                f"{rt.world_size} ranks x {run.accum_steps} accumulation steps"
            )
        if rt.spmd and (s.batch_size // rt.world_size // run.accum_steps) % (rt.num_devices // rt.world_size):
            raise ValueError(f"stage {s.name}: per-host batch must be divisible by the local device count")


# ----------------------------------------------------------------------------- the loop


@dataclass
class StageRun:
    """A stage, built and ready to step: where it starts and what it steps with."""

    index: int
    stage: Stage
    model: torch.nn.Module  # the CLIP itself
    train_step: Step  # its wrapper (DDP / FSDP when distributed), optimizer and loss
    loader: data.TrainLoader | data.MixtureLoader
    batches: Iterator  # over the loader
    stage_step: int = 0
    samples: int = 0


def build_stage(
    rt,
    run: RunConfig,
    si: int,
    stage: Stage,
    *,
    init: str | None,
    state: dict | None,
    resume_path: str | None,
) -> StageRun:
    """Model (from scratch, from `init`, or from the resumed checkpoint), optimizer, data."""
    # the same initial weights on every rank: FSDP2 keeps each rank's own initialisation of its
    # shard (and multi-host SPMD each host's copy of a replicated tensor), where DDP broadcasts rank 0's
    rt.seed(run.seed + 1000 * si)
    model = factory.create_model(stage.model_config(), pretrained=resume_path if state is not None else init)
    # then per rank (the image masks' draws); the same whether started here or resumed at the boundary
    rt.seed(run.seed + 1000 * si + rt.rank)
    model.set_grad_checkpointing(run.grad_checkpointing)
    precision = rt.precision(run.precision)
    wmodel = rt.wrap_model(model.to(rt.device).train(), run.shard, precision)  # before AdamW
    optimizer = build_optimizer(model, stage, rt)
    step = Step(
        rt,
        wmodel,
        optimizer,
        losses.ContrastiveLoss(stage.loss, rt),
        precision=precision,
        accum_steps=run.accum_steps,
        compiled=run.compile,
    )
    tok = stage.tokenizer()  # frequency masking: the counts file checked against the recorded sha256
    loader = data.make_train_loader(
        stage.train_data,
        tok,
        stage.image_size,
        stage.batch_size // rt.world_size,
        fmt=stage.train_format,
        weights=stage.mixture_weights,
        num_workers=run.workers,
        seed=run.seed + si,
        rank=rt.rank,
        world_size=rt.world_size,
        scale=(stage.scale_min, 1.0),
        color_jitter=stage.color_jitter,
        pin_memory=rt.pin_memory,
        state=state["data"] if state else None,
    )
    sr = StageRun(si, stage, model, step, loader, iter(loader))
    if state is not None:
        rt.load_optimizer_state(wmodel, optimizer, state["optimizer"])
        rt.set_rng_state(state["rng"][rt.rank] if len(state["rng"]) == rt.world_size else state["rng"][0])
        sr.stage_step, sr.samples = state["stage_step"], state["samples"]
    return sr


def run_training(
    rt: xla_utils.Runtime,
    run: RunConfig,
    stages: list[tuple[int, Stage]],
    inputs: Inputs,
    signals: cli.StopSignals | None = None,
) -> dict:
    """Run the selected stages (resuming where inputs say); returns a summary dict."""
    signals = signals or cli.StopSignals()
    log = RunLog(  # a remote --out: uploaded at every save and at the end
        rt,
        local_out(run.out),
        trackers.parse_report_to(run.report_to),
        {"run": dataclasses.asdict(run), "stages": [dataclasses.asdict(s) for _, s in stages]},
        inputs.resume_state["step"] if inputs.resume_state else None,
    )
    precision = rt.precision(run.precision)
    log.info(f"{rt.describe()}; precision {precision}; preset {run.cfg}; out {run.out}")
    resume = inputs.resume_state
    if resume:
        log.info(
            f"resuming from {inputs.resume_path} (step {resume['step']}, stage "
            f"{resume['stage_name']}, stage step {resume['stage_step']})"
        )
    step = resume["step"] if resume else 0
    stage_ends = list(resume["stage_ends"]) if resume else []
    prev_ckpt = run.pretrained
    summary = {"stages": [], "device": rt.kind, "stopped_by": None}
    counts_sha = word_counts_sha256(stages)
    config_json = json.dumps(
        {
            "run": dataclasses.asdict(run),
            "stages": [dataclasses.asdict(s) for _, s in stages],
            "word_counts_sha256": counts_sha,
        }
    )
    try:
        for pos, (si, stage) in enumerate(stages):
            state = None
            if resume is not None:
                if si < resume["stage_index"]:
                    continue  # finished before the checkpoint
                if si == resume["stage_index"]:
                    if resume["stage_step"] >= stage.steps:
                        prev_ckpt = inputs.resume_path  # finished: the next stage starts from it
                        continue
                    state = resume
                else:  # the checkpoint's stage is not among the selected ones
                    prev_ckpt = prev_ckpt or inputs.resume_path
            if run.max_steps is not None and step >= run.max_steps:
                break
            init = None
            if state is None and stage.init == "previous":
                if not prev_ckpt:
                    raise ValueError(
                        f"stage {stage.name} fine-tunes a pre-trained model: give "
                        f"--pretrained CKPT (or run the stage before it)"
                    )
                init = prev_ckpt
            elif state is None and pos == 0 and run.pretrained:
                init = run.pretrained
            sr = build_stage(
                rt, run, si, stage, init=init, state=state, resume_path=inputs.resume_path if state else None
            )
            log.info(
                f"stage {stage.name} ({si}): {stage.model} {stage.image_size}px ctx "
                f"{sr.model.cfg.text.context_length} pos {stage.pos_embed} mask {stage.mask}:"
                f"{stage.mask_ratio} | batch {stage.batch_size} lr {stage.resolved_lr:.3g} warmup "
                f"{stage.warmup} steps {stage.steps} | from "
                f"{'step ' + str(sr.stage_step) if state else init or 'scratch'}"
            )
            if stage.name in counts_sha:  # which word counts the frequency masking reads
                rec = {"step": step, "stage": stage.name, "word_counts": stage.word_counts}
                log.record({**rec, "word_counts_sha256": counts_sha[stage.name]})
                log.info(
                    f"frequency masking t={stage.frequency_threshold:g}: {stage.word_counts} ({counts_sha[stage.name]})"
                )
            result = run_stage(
                rt,
                run,
                log,
                sr,
                step,
                precision=precision,
                eval_set=inputs.eval,
                config_json=config_json,
                stage_ends=stage_ends,
                resumed=state is not None,
                signals=signals,
            )
            step = result["step"]
            summary["stages"].append(result)
            summary["stopped_by"] = result["stopped_by"]
            if not result["finished"]:
                break
            prev_ckpt = result["checkpoint"]
        if not summary["stages"]:
            log.info(f"nothing to run: the selected stages finished by step {step}")
    finally:
        log.close()
    summary["step"] = step
    rt.barrier()
    return summary


def run_stage(
    rt,
    run: RunConfig,
    log: RunLog,
    sr: StageRun,
    step: int,
    *,
    precision: str,
    eval_set: EvalSet | None,
    config_json: str,
    stage_ends: list,
    resumed: bool,
    signals: cli.StopSignals,
) -> dict:
    """Step one built stage to its end (or --max-steps, or a stop signal), saving and evaluating
    on the way.

    The steps are queued without waiting for the device: the host reads the step's values only on
    logging steps (the progress record) and at decision points, every --decide-every steps and at
    each save, eval and the last step, where every process agrees on stopping (signal, non-finite
    loss) and on a time-based save. A non-finite step's update was already dropped on the device;
    a save point decides first, so no checkpoint holds a state after a non-finite loss under
    --nonfinite stop. The feed moves the next batch to the device while the step runs."""
    stage = sr.stage
    t_start = last_save = time.time()
    saved_at = sr.stage_step if resumed else -1  # stage step of the newest checkpoint
    decided_at = None  # stage step of the latest decision
    base_step, base_stage_step = step, sr.stage_step  # the Step's tally numbers its steps from here
    log.start_interval(sr.stage_step)
    feed = rt.device_batches(sr.batches, sr.loader)

    def decide() -> tuple[bool, bool]:
        """One host read of the non-finite tally, one agreed collective: (stop, late)."""
        nonlocal decided_at
        decided_at = sr.stage_step
        new, first, last = sr.train_step.nonfinite()
        nonfinite, stop, late = rt.agree_each(
            [new > 0, signals.received is not None, time.time() - last_save > run.save_minutes * 60]
        )
        if nonfinite and run.nonfinite == "stop":
            raise RunStopped(
                f"the loss is not finite at step {base_step + first} ({stage.name} step "
                f"{base_stage_step + first}): stopped without saving; the newest good checkpoint stays "
                f"in {checkpoint_root(run.out)} (lower the lr, or --nonfinite skip)"
            )
        if nonfinite and new == 1:
            log.info(f"warning: the loss is not finite at step {base_step + last}: its update was skipped")
        elif nonfinite:
            log.info(
                f"warning: the loss was not finite at {new} steps up to step {base_step + last}: "
                f"their updates were skipped"
            )
        return stop, late

    def checkpoint() -> bool:
        if decided_at != sr.stage_step:  # never save a state the host has not checked
            decide()
        st = {
            "step": step,
            "stage_index": sr.index,
            "stage_name": stage.name,
            "stage_step": sr.stage_step,
            "samples": sr.samples,
            "config": config_json,
            "data": feed.state_dict(),  # after the last batch stepped on, not the one moved ahead
            "stage_ends": list(stage_ends),
        }
        return save_checkpoint(rt, run, sr.train_step.model, sr.train_step.optimizer, st, stage) is not None

    finished = True
    stopped_by = None
    first = True
    try:
        while sr.stage_step < stage.steps:
            if run.max_steps is not None and step >= run.max_steps:
                finished = False
                break
            # the batch, the update
            t0 = time.time()
            images, tokens = next(feed)
            log.data_wait += time.time() - t0
            lr = lr_at(sr.stage_step, stage)
            t0 = time.time()
            loss = sr.train_step(images, tokens, lr)
            step += 1
            sr.stage_step += 1
            sr.samples += stage.batch_size
            # the progress record, once the step's values exist on the host
            if sr.stage_step % run.log_every == 0 or sr.stage_step in (1, stage.steps):
                rt.add_step_closure(
                    log.progress,
                    (
                        stage,
                        loss,
                        sr.model.logit_scale.detach(),
                        lr,
                        step,
                        sr.stage_step,
                        sr.samples,
                        sum(sr.loader.skipped.values()),
                        sr.loader.shares if isinstance(sr.loader, data.MixtureLoader) else None,
                    ),
                )
            rt.step_boundary()
            if run.compile and first:
                log.info(f"compiled the step in {time.time() - t0:.1f}s (torch.compile, once per stage)")
            first = False
            end = sr.stage_step == stage.steps or (run.max_steps is not None and step >= run.max_steps)
            if not end:  # the next batch travels while this step runs
                t0 = time.time()
                feed.prefetch()
                log.data_wait += time.time() - t0
            evaluate = bool(run.eval_every and sr.stage_step % run.eval_every == 0 and eval_set)
            save = sr.stage_step % run.save_every == 0 and sr.stage_step < stage.steps
            if not (end or evaluate or save or sr.stage_step % run.decide_every == 0):
                continue
            stop, late = decide()
            if stop:
                stopped_by = signals.received or signal.SIGTERM
                finished = False
                break
            if evaluate:
                run_eval(rt, log, sr, eval_set, step, precision, run)
            if (save or late) and sr.stage_step < stage.steps:
                if checkpoint():
                    saved_at = sr.stage_step
                last_save = time.time()
    finally:
        feed.close()

    if finished:
        stage_ends.append(f"step_{step:08d}")  # kept by --keep pruning: the next stage's init
    if saved_at != sr.stage_step and not checkpoint():
        raise RunStopped(
            f"the checkpoint of step {step} could not be written (see the warning above); "
            f"the newest complete one stays in {checkpoint_root(run.out)}"
        )
    ckpt = os.path.join(checkpoint_root(run.out), f"step_{step:08d}")
    if stopped_by is not None:
        log.info(
            f"stopped by {signal.Signals(stopped_by).name} at step {step}; checkpoint {ckpt}; "
            f"continue with --resume latest"
        )
    metrics = run_eval(rt, log, sr, eval_set, step, precision, run) if finished and eval_set else None
    elapsed = time.time() - t_start
    log.info(
        f"stage {stage.name} {'done' if finished else 'stopped'} at step {step} ({elapsed:.1f}s); checkpoint {ckpt}"
    )
    return {
        "name": stage.name,
        "step": step,
        "stage_step": sr.stage_step,
        "finished": finished,
        "checkpoint": ckpt,
        "seconds": elapsed,
        "eval": metrics,
        "compiles": rt.compile_count(),
        "stopped_by": stopped_by,
    }


def run_eval(rt, log: RunLog, sr: StageRun, ev: EvalSet, step: int, precision: str, run: RunConfig) -> dict:
    """Zero-shot classification / retrieval with the trainer's runtime and precision (every rank)."""
    kw = dict(runtime=rt, precision=precision, batch_size=run.eval_batch_size, num_workers=run.workers)
    res = {}
    if ev.data:
        res = eval_zeroshot.evaluate(
            sr.model,
            sr.model.cfg,
            ev.data,
            classnames=ev.classnames,
            templates=ev.templates,
            split=run.eval_split,
            **kw,
        )
        log.info(f"step {step} zero-shot: top1 {res['top1']:.4f} top5 {res['top5']:.4f} (n={res['n']})")
    if ev.retrieval:
        r = eval_zeroshot.evaluate_retrieval(sr.model, sr.model.cfg, ev.retrieval, **kw)
        res.update({f"retrieval_{k}": v for k, v in r.items()})
        log.info(
            f"step {step} retrieval R@1: image->text {r['image_to_text_R@1']:.4f} text->image "
            f"{r['text_to_image_R@1']:.4f} ({r['images']} images, {r['texts']} captions)"
        )
    log.record({"step": step, "stage": sr.stage.name, **{f"eval_{k}": v for k, v in res.items()}})
    return res


def main(argv=None, prog="train.py", finetune=False) -> int:
    """Exit status: 0 done (or stopped at --max-steps), 2 bad input (one line, found before the
    first step), 1 the run could not go on (one line: non-finite loss, checkpoint not written),
    128 + N stopped by signal N after saving (143 SIGTERM, 130 SIGINT). Any other error inside the
    run keeps its traceback."""
    try:
        run, stages, args = config.parse_args(sys.argv[1:] if argv is None else argv, prog, finetune)
        if args.dry_run:
            print(config.describe_stages(run, stages))
            return 0
        if args.flops:
            print(config.flops_table(stages))
            return 0
        if run.plan:
            links = plan.Links(run.nvlink_gbs * 1e9, run.network_gbs * 1e9, run.gpus_per_node)
            print(
                plan.report(
                    stages,
                    gpu_mem=run.gpu_mem,
                    devices=run.devices,
                    links=links,
                    mfu=run.mfu,
                    peak_tflops=run.peak_tflops,
                )
            )
            return 0
        inputs = check_inputs(run, stages)
        rt = xla_utils.init_runtime(run.device)
    except (ValueError, OSError) as e:  # user input: a missing file, a refused or unreachable store
        return cli.usage_error(e)
    lock = checkpoints.RunLock(run.out)
    try:
        try:
            check_layout(rt, run, stages, inputs)
            if rt.is_master:
                lock.acquire()
                fetch_logs(run)  # a remote --out: its metrics.jsonl, which this run appends to
        except ValueError as e:
            return cli.usage_error(e)
        if lock.previous:
            print(f"taking over the lock of a run that ended without releasing it ({lock.previous})", flush=True)
        if inputs.resume_note and rt.is_master:
            print(inputs.resume_note, file=sys.stderr, flush=True)
        if rt.is_master:
            checkpoints.remove_temporaries(checkpoint_root(local_out(run.out)))  # left by a kill mid-save
        summary = run_training(rt, run, stages, inputs, cli.StopSignals().install())
    except RunStopped as e:
        return cli.usage_error(e, status=1)
    except trackers.TrackerError as e:  # a tracker could not start (before the first step)
        return cli.usage_error(e)
    except data.BadDataAlarm as e:
        return cli.usage_error(data.BadDataAlarm.line_of(e), status=1)
    finally:
        if lock.fd is not None:
            upload_logs(run)  # a remote --out: the records since the last save
        lock.release()
        rt.shutdown()
    if summary["stopped_by"]:
        return 128 + summary["stopped_by"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
