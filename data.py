"""CLIPA data loading: a sharded and resumable training loader, evaluation loaders (ImageFolder or
TFDS, e.g. ImageNet-1K validation), and dataset stats. Image decoding, cropping and normalisation
are in transforms.py; shard specs, format detection and readers in shards.py.

The loaders emit uint8 CHW batches; the device normalises them (transforms.normalize). A training
sample's augmentation and a batch's position in the epoch follow from seeds alone (`mix`), so a
resumed run replays the very batches an uninterrupted one would have seen.

CLI:  python data.py stats SPEC... [--format F] [--no-decode] [--split S]
      python data.py reshard SRC DST --max-side N [--quality Q] [--workers W]   (shards.py's pass)
      python data.py counts SPEC... --out FILE [--tokenizer T] [--top N]   (frequency masking's counts)
The demo dataset lives in launch/demo_data.py, the loader benchmark in launch/bench_data.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import NamedTuple

import numpy as np
import torch

import cli
import shards
import storage
import tokenizer as tokenizer_lib
import transforms
import xla_utils
from shards import FORMATS, MAX_RECORD_BYTES, Raw, Source, find_tfds_dir, is_remote, read_shard, read_shards, resolve

log = logging.getLogger("clipa.data")

DEFAULT_SHUFFLE = 1000  # samples per loader worker (raw JPEG bytes, ~10-50 KB each)
END = 1 << 62  # "past the last shard" position
PIPE_BYTES = 1 << 22  # a worker's batch tensors up to this size travel through its pipe (_pipe)
# The bad-data alarm: ALARM_SHARE or more bad among ALARM_WINDOW consecutive records of one reader
# (or of `stats`' pass) is no longer scattered bad samples but a wrong format, a decoder that reads
# nothing or a broken data set: the loader stops. The window is 10 img2dataset shards, so that a run
# of bad records that real data holds (a shard of HTML error pages saved as .jpg) never stops a run.
ALARM_WINDOW = 100_000
ALARM_SHARE = 0.99


# ----------------------------------------------------------------------------- small helpers


def mix(*xs: int) -> int:
    """Stateless 64-bit hash (splitmix64 chain): per-sample seeds that do not depend on worker
    layout or on how far a previous run got, so resumed runs replay exactly. The demo and the
    synthetic benchmark data draw their samples from it too."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = (h + 0x9E3779B97F4A7C15) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


class BadDataAlarm(RuntimeError):
    """The bad-data alarm: a window of records almost all bad (a wrong format or a broken set)."""

    @staticmethod
    def line_of(err: BaseException) -> str:
        """The alarm's own line, also when a DataLoader worker raised it: the main process then gets
        a copy whose text is the worker's whole traceback, the alarm's line last."""
        lines = [line for line in str(err).splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        return last.split("BadDataAlarm: ", 1)[-1]


class BadShare:
    """The alarm's count: records in consecutive windows of ALARM_WINDOW, the bad ones by reason."""

    def __init__(self):
        self.records = 0
        self.bad: Counter = Counter()

    def add(self, reason: str | None) -> str | None:
        """One record, good (None) or skipped for `reason`; the alarm's line when it ends a window
        that is ALARM_SHARE bad or more, else None."""
        self.records += 1
        if reason is not None:
            self.bad[reason] += 1
        if self.records < ALARM_WINDOW:
            return None
        n, bad = self.records, self.bad
        self.records, self.bad = 0, Counter()
        total = sum(bad.values())
        if total < ALARM_SHARE * n:
            return None
        reasons = ", ".join(f"{k}: {v}" for k, v in bad.most_common(3))
        return (
            f"{total} of {n} consecutive records were bad ({reasons}): not scattered bad samples but a "
            "wrong --format, images the decoder cannot read, or a broken data set (see `data.py stats`)"
        )


# ----------------------------------------------------------------------------- training loader


@dataclass
class _Plan:
    """Which shards each of the W = world_size * num_workers readers reads in one epoch.
    Shard order is a permutation fixed by (seed, epoch). With at least W shards, reader g reads
    shards g, g+W, ... (shard-level sharding). With fewer shards than readers, every reader reads
    every shard and keeps record r of shard position p when (p + r) % W == g (sample-level
    striding): no reader idles, and still no record is read by two readers."""

    shards: list[str]  # all shards of the spec, in spec order (ids index this)
    order: list[int]  # shard ids in this epoch's order (excluded ones removed)
    readers: int  # W

    def assign(self, g: int) -> tuple[list[int], int]:
        if len(self.order) >= self.readers:
            return self.order[g :: self.readers], 1
        return list(self.order), self.readers


def _epoch_order(n: int, seed: int, epoch: int, exclude=()) -> list[int]:
    order = list(range(n))
    random.Random(mix(seed, epoch, 0x5EED)).shuffle(order)
    excluded = set(exclude)
    return [i for i in order if i not in excluded]


class _Entry(NamedTuple):
    pos: int  # position of the shard in this reader's list
    rec: int  # record index in the shard (counting bad records too)
    sid: int  # shard id (stable across epochs/topologies: seeds the augmentation)
    raw: Raw


@dataclass
class _StreamCfg:
    src: Source
    plan: _Plan
    seed: int
    epoch: int
    rank: int
    num_workers: int
    batch_size: int
    shuffle_buffer: int
    transform: Callable
    tokenizer: Callable | None
    snapshots: dict = field(default_factory=dict)  # local worker id -> snapshot to resume


def _reader_records(cfg: _StreamCfg, g: int, start_pos: int) -> Iterator[tuple[int, int, _Entry]]:
    """(pos, rec, entry) for every record reader g owns, from its shard position start_pos on;
    bad records included (entry.raw.reason set) so that positions never depend on content."""
    ids, stride = cfg.plan.assign(g)
    W = cfg.plan.readers
    todo = ids[start_pos:]
    # the next shard is opened while this one is read (read_shards): a store's latency stays hidden
    for pos, sid, raws in zip(
        range(start_pos, len(ids)), todo, read_shards([cfg.plan.shards[i] for i in todo], cfg.src)
    ):
        for rec, raw in enumerate(raws):
            if stride > 1 and (pos + rec) % W != g:
                continue
            yield pos, rec, _Entry(pos, rec, sid, raw)


def _rebuild_buffer(cfg: _StreamCfg, g: int, snap: dict) -> tuple[list[_Entry], Iterator]:
    """Resume reader g from a snapshot without decoding: re-read from the oldest shard its shuffle
    buffer held, collect the buffered records in their saved slots, and stop at the saved next
    record. (the buffer, the records from the saved next one on)."""
    resume_at = tuple(snap["next"])
    slot_of = {tuple(p): i for i, p in enumerate(snap["buf"])}
    start = min([resume_at[0]] + [p[0] for p in snap["buf"]])
    records = _reader_records(cfg, g, start)
    slots: list[_Entry | None] = [None] * len(slot_of)
    first = None
    for pos, rec, e in records:
        if (pos, rec) >= resume_at:
            first = (pos, rec, e)
            break
        if (pos, rec) in slot_of:
            slots[slot_of[(pos, rec)]] = e
    buf = [e for e in slots if e is not None]
    if len(buf) < len(slots):
        log.warning("resume: %d buffered records not found again (shards changed?)", len(slots) - len(buf))
    if first is not None:
        records = chain([first], records)
    return buf, records


class _Shuffled:
    """Reader g's good records through a shuffle buffer of cfg.shuffle_buffer entries, drawn in an
    order that only the seeds decide; bad records are counted by reason. Holds what a snapshot
    needs: the next record to read, the number of draws, the buffered records' positions."""

    def __init__(self, cfg: _StreamCfg, g: int, snap: dict | None):
        self.cfg = cfg
        self.g = g
        self.window = BadShare()  # from the start of the epoch or of the resume
        self.base = mix(cfg.seed, cfg.epoch, g, 0xB0F)
        self.capacity = max(1, cfg.shuffle_buffer)
        self.stats = Counter(snap["stats"]) if snap else Counter()
        self.logged: set[str] = set()  # skip reasons already logged (once each)
        self.draws = snap["k"] if snap else 0
        self.next = list(snap["next"]) if snap else [0, 0]  # (pos, rec) of the next record to read
        if snap:
            self.buf, self.records = _rebuild_buffer(cfg, g, snap)
        else:
            self.buf, self.records = [], _reader_records(cfg, g, 0)
        # (pos, rec) of buf's entries, kept beside it: a cheap snapshot
        self.keys = [(e.pos, e.rec) for e in self.buf]

    def count(self, reason: str | None):
        """One record done: a good sample (None) or one skipped for `reason`; BadDataAlarm when it
        ends a window of records that sets off the bad-data alarm (BadDataAlarm)."""
        self.stats[reason or "samples"] += 1
        alarm = self.window.add(reason)
        if alarm:
            raise BadDataAlarm(f"loader reader {self.g}: {alarm}")

    def log_once(self, reason: str, message: str, *args):
        if reason not in self.logged:
            self.logged.add(reason)
            log.warning(message, *args)

    def _draw(self, n: int) -> int:
        """The buffer slot of the next draw, among n."""
        i = mix(self.base, self.draws) % n
        self.draws += 1
        return i

    def _swap(self, e: _Entry) -> _Entry:
        """A full buffer: a drawn entry leaves, e takes its slot."""
        i = self._draw(self.capacity)
        out = self.buf[i]
        self.buf[i] = e
        self.keys[i] = (e.pos, e.rec)
        return out

    def _pop(self) -> _Entry:
        """The end of the records: a drawn entry leaves, the last one fills its slot."""
        i = self._draw(len(self.buf))
        out = self.buf[i]
        self.buf[i] = self.buf[-1]
        self.keys[i] = self.keys[-1]
        self.buf.pop()
        self.keys.pop()
        return out

    def __iter__(self) -> Iterator[_Entry]:
        for pos, rec, e in self.records:
            self.next = [pos, rec + 1]
            reason = e.raw.reason
            if reason is not None:
                shard = self.cfg.plan.shards[e.sid]
                self.log_once(reason, "skipping bad sample (%s): %s in %s", reason, e.raw.key, shard)
                self.count(reason)
            elif self.capacity <= 1:
                self.draws += 1
                yield e
            elif len(self.buf) < self.capacity:
                self.buf.append(e)
                self.keys.append((pos, rec))
            else:
                yield self._swap(e)
        self.next = [END, 0]
        while self.buf:
            yield self._pop()


def _decode(cfg: _StreamCfg, e: _Entry, stream: _Shuffled) -> torch.Tensor | None:
    """The entry's image through the transform, seeded by the sample alone; None (counted and
    logged) for an image the transform refuses."""
    rng = random.Random(mix(cfg.seed, cfg.epoch, e.sid, e.rec))
    try:
        return cfg.transform(e.raw.image, rng)
    except Exception as ex:  # noqa: BLE001 - any decoder error means a bad image
        reason = transforms.skip_reason(ex)
        shard = cfg.plan.shards[e.sid]
        stream.log_once(reason, "skipping bad image (%s) %s in %s: %s", reason, e.raw.key, shard, ex)
    stream.count(reason)
    return None


def _worker_meta(wid: int, stream: _Shuffled, batches: int) -> dict:
    """What travels with a batch: the worker's snapshot (TrainLoader keeps the latest one)."""
    return {
        "wid": wid,
        "next": list(stream.next),
        "k": stream.draws,
        "batches": batches,
        "buf": list(stream.keys),
        "stats": dict(stream.stats),
    }


def _worker_batches(cfg: _StreamCfg, wid: int):
    """One loader worker: records -> shuffle buffer -> decode/augment -> batches (+ snapshot),
    then (None, None, final snapshot)."""
    snap = cfg.snapshots.get(wid)
    if snap and snap.get("final"):  # this worker had finished its epoch before the save
        yield None, None, {"wid": wid, **snap}
        return
    g = cfg.rank * cfg.num_workers + wid
    stream = _Shuffled(cfg, g, snap)
    batches = snap["batches"] if snap else 0
    images = []
    texts = []
    for e in stream:
        x = _decode(cfg, e, stream)
        if x is None:
            continue
        stream.count(None)
        images.append(x)
        texts.append(e.raw.text)
        if len(images) < cfg.batch_size:
            continue
        rng = random.Random(mix(cfg.seed, cfg.epoch, g, batches, 0x70C))
        tokens = cfg.tokenizer(texts, rng=rng) if cfg.tokenizer is not None else texts
        batches += 1
        yield torch.stack(images), tokens, _worker_meta(wid, stream, batches)
        images = []
        texts = []
    if images:  # static shapes: a worker's last partial batch of the epoch is dropped
        log.debug("reader %d: %d samples left over at the end of epoch %d", g, len(images), cfg.epoch)
    # the stream is drained: its next record is END and its buffer empty
    yield None, None, {**_worker_meta(wid, stream, batches), "final": True}


class _TrainDataset(torch.utils.data.IterableDataset):
    def __init__(self, cfg: _StreamCfg, pipe: bool):
        self.cfg = cfg
        self.pipe = pipe

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        batches = _worker_batches(self.cfg, wid)
        if info is None or not self.pipe:
            return batches
        return ((_pipe(x), _pipe(t), m) for x, t, m in batches)


def _pipe(x):
    """A small tensor as a numpy array, pickled through the worker's pipe. A tensor goes by shared
    memory: the main process fetches its file descriptor from the worker over a socket, a round
    trip that waits for the worker to run (~1 ms a batch, busy CPU)."""
    if isinstance(x, torch.Tensor) and x.nbytes <= PIPE_BYTES:
        return x.numpy()
    return x


def _unpipe(x):
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    return x


def _identity(x):
    return x


def _generator(*xs: int) -> torch.Generator:
    """A DataLoader draws a seed each time it is iterated: from this generator, not from torch's
    global RNG, which is the trainer's (restored on resume; image masking draws from it)."""
    return torch.Generator().manual_seed(mix(*xs, 0xD1) >> 1)


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def worker_init(_):
    torch.set_num_threads(1)
    parent = os.getppid()
    # A stop signal to the process group (torchrun, `timeout`, Ctrl-C) or to every process of a job
    # (SLURM, systemd) reaches the workers too: the main process decides (it saves first) and the
    # workers end with it. Blocked here, before any thread of the worker starts, so that one thread
    # takes them all (_stop_signals)
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    threading.Thread(target=_stop_signals, args=(parent,), daemon=True).start()
    # A worker whose main process was killed would live on when a batch waits in the full pipe (its
    # queue's writer thread is joined at exit, and the worker itself holds the read end): leave then
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _stop_signals(parent: int):
    """Stop signals from anyone but the main process are dropped; its own SIGTERM (multiprocessing's
    terminate() of workers still alive when it exits) ends the worker, with status 0 as torch's own
    SIGTERM handler does (the main process's SIGCHLD handler reports any other as a failure)."""
    while True:
        info = signal.sigwaitinfo(_STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


def _exit_with_parent(parent: int):
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name) or str(default)
    if not v.strip().lstrip("+-").isdigit():
        raise ValueError(f"{name}={v!r} is not an integer")
    return int(v)


class TrainLoader:
    """Iterating yields (images uint8 [B,3,H,W], tokens LongTensor[B,T]) with exactly batch_size
    rows (a worker's last partial batch of an epoch is dropped: static shapes), epoch after epoch
    (repeat=True; .epoch counts up) or for one epoch. state_dict() is a plain JSON-able dict;
    passing it back as `state` continues with the very next batch: same samples, same order,
    none repeated, given the same seed / world size / workers / batch size / shuffle buffer
    (otherwise: shard granularity). The saved epoch overrides the `epoch` argument. Each rank
    has its own state (`state` may also be the list of all ranks' states: ours is picked).
    .samples / .skipped: good samples read and bad ones skipped by reason, all epochs so far."""

    def __init__(
        self,
        src: Source,
        tokenizer,
        transform,
        batch_size: int,
        *,
        num_workers: int,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        shuffle_buffer: int,
        prefetch: int,
        repeat: bool,
        state: dict | list | None,
        pin_memory: bool,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.src = src
        self.tokenizer = tokenizer
        self.transform = transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.prefetch = prefetch
        self.repeat = repeat
        self.pin_memory = pin_memory
        self.epoch = epoch
        self._past = Counter()  # stats of finished epochs
        self._start_epoch()
        if state is not None:
            self._load_state(state)

    # -- state
    def _start_epoch(self):
        """Progress through the current epoch: none yet."""
        self._exclude: list[int] = []  # shard ids done before a resume in another layout
        self._workers: dict[int, dict] = {}  # local worker id -> its latest snapshot
        self._batches = 0
        self._turn = 0  # worker whose batch comes next (round-robin)

    def _topology(self) -> dict:
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "num_shards": len(self.src.shards),
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def state_dict(self) -> dict:
        return {
            "version": 1,
            "epoch": self.epoch,
            "batches": self._batches,
            "turn": self._turn,
            "exclude": list(self._exclude),
            **self._topology(),
            "workers": {str(w): {**s, "buf": [list(p) for p in s["buf"]]} for w, s in self._workers.items()},
            "past_stats": dict(self._past),
        }

    def _load_state(self, state):
        if isinstance(state, (list, tuple)):  # states of all ranks: take ours
            mine = [s for s in state if s.get("rank") == self.rank]
            state = mine[0] if mine else state[0]
        if state.get("version") != 1:
            raise ValueError("unknown loader state version")
        self.epoch = int(state["epoch"])
        self._past = Counter(state.get("past_stats", {}))
        same = all(state.get(k) == v for k, v in self._topology().items())
        if same:
            self._exclude = list(state.get("exclude", []))
            self._workers = {int(w): s for w, s in state.get("workers", {}).items()}
            self._batches = int(state.get("batches", 0))
            self._turn = int(state.get("turn", 0))
            return
        # Different layout: resume at shard granularity - drop the shards this state finished.
        done = set(state.get("exclude", []))
        saved_workers = max(1, state["num_workers"])
        W = state["world_size"] * saved_workers
        order = _epoch_order(state["num_shards"], state["seed"], self.epoch, done)
        plan = _Plan(self.src.shards, order, W)
        if state["num_shards"] == len(self.src.shards) and len(order) >= W:
            for w, s in state.get("workers", {}).items():
                ids, _ = plan.assign(state["rank"] * saved_workers + int(w))
                oldest = min([s["next"][0]] + [p[0] for p in s["buf"]])
                done.update(ids[: min(oldest, len(ids))])
        log.warning(
            "loader state from a different layout (%s); resuming epoch %d at shard granularity, %d shards already done",
            ", ".join(f"{k}={state.get(k)}" for k, v in self._topology().items() if state.get(k) != v),
            self.epoch,
            len(done),
        )
        self._exclude = sorted(done) if state["num_shards"] == len(self.src.shards) else []

    # -- stats
    @property
    def skipped(self) -> dict:
        c = sum((Counter(s["stats"]) for s in self._workers.values()), Counter(self._past))
        c.pop("samples", None)
        return {k: v for k, v in sorted(c.items()) if v}

    @property
    def samples(self) -> int:
        return self._past["samples"] + sum(s["stats"].get("samples", 0) for s in self._workers.values())

    # -- iteration
    def _dataloader(self):
        workers = max(1, self.num_workers)
        order = _epoch_order(len(self.src.shards), self.seed, self.epoch, self._exclude)
        cfg = _StreamCfg(
            src=self.src,
            plan=_Plan(self.src.shards, order, self.world_size * workers),
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            num_workers=workers,
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            transform=self.transform,
            tokenizer=self.tokenizer,
            snapshots=dict(self._workers),
        )
        kw = {"generator": _generator(self.seed, self.epoch, self.rank)}
        if self.num_workers > 0:
            kw.update(
                prefetch_factor=max(1, math.ceil(self.prefetch / self.batch_size)),
                worker_init_fn=worker_init,
                persistent_workers=False,
            )
        # pin_memory rebuilds each (images, tokens, meta) item as a list with meta copied: _ordered
        # only unpacks and indexes it, so batches and loader state are the same either way
        return torch.utils.data.DataLoader(
            _TrainDataset(cfg, pipe=not self.pin_memory),
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            **kw,
        )

    def _ordered(self, dl):
        """Batches in a fixed round-robin over workers (skipping finished ones), starting at the
        saved turn: the same global order whether or not the epoch was interrupted. Batches that
        the DataLoader delivers early wait in small per-worker queues."""
        nw = max(1, self.num_workers)
        queues = {w: [] for w in range(nw)}
        active = [w for w in range(nw) if not self._workers.get(w, {}).get("final")]
        it = iter(dl)
        while active:
            w = self._turn if self._turn in active else active[0]
            while not queues[w]:
                try:
                    item = next(it)
                except StopIteration:  # cannot happen before every worker said "final"
                    raise RuntimeError("loader workers ended without a final marker") from None
                queues[item[2]["wid"]].append(item)
            images, tokens, meta = queues[w].pop(0)
            del meta["wid"]
            self._workers[w] = meta
            i = active.index(w)
            if images is None:  # worker w finished its part of the epoch
                active.remove(w)
                self._turn = active[i % len(active)] if active else 0
                continue
            self._turn = active[(i + 1) % len(active)]
            yield _unpipe(images), _unpipe(tokens), meta
        for _ in it:  # let the DataLoader shut its workers down cleanly
            pass

    def __iter__(self):
        if self.src.fmt in ("tfrecord", "tfds"):
            xla_utils.import_tensorflow()  # in the parent, before forking workers (docs/platforms.md)
        while True:
            for images, tokens, _meta in self._ordered(self._dataloader()):
                self._batches += 1
                yield images, tokens
            stats = sum((Counter(s["stats"]) for s in self._workers.values()), Counter())
            log.info(
                "epoch %d done (rank %d): %d batches, %d samples read, skipped %s",
                self.epoch,
                self.rank,
                self._batches,
                stats.get("samples", 0),
                json.dumps({k: v for k, v in stats.items() if k != "samples"}),
            )
            if self._batches == 0:  # repeating would spin forever without a batch
                raise ValueError(
                    f"no training batch of {self.batch_size} from {len(self.src.shards)} "
                    f"shard(s) on rank {self.rank}: {stats.get('samples', 0)} good samples, "
                    f"skipped {dict(self.skipped)}"
                )
            self._past.update(stats)
            self.epoch += 1
            self._start_epoch()
            if not self.repeat:
                return


def make_train_loader(
    spec,
    tokenizer,
    image_size: int,
    batch_size: int,
    *,
    fmt: str | None = None,
    num_workers: int = 2,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int | None = None,
    prefetch: int | None = None,
    scale=(0.4, 1.0),
    color_jitter: bool = False,
    state: dict | list | None = None,
    repeat: bool = True,
    split: str = "train",
    pin_memory: bool = False,
    weights=None,
) -> TrainLoader | MixtureLoader:
    """Training loader over webdataset / TFRecord / TFDS shards (see TrainLoader).
    shuffle_buffer: samples per worker (default $TFDS_SHUFFLE_SIZE or 1000); prefetch: samples
    per worker decoded ahead (default $TFDS_PREFETCH_SIZE or 2 batches). Host memory is about
    num_workers * (shuffle_buffer * JPEG size + prefetch * 3*H*W bytes).
    tokenizer: tokenizer.py Tokenizer (called per batch with a seeded rng); None yields captions.
    pin_memory: page-locked image batches, so that the copy to the device can be asynchronous
    (the trainer passes xla_utils.Runtime.pin_memory: true on CUDA).
    weights: one positive weight per '::'-joined source of spec: a MixtureLoader (weighted mixtures, below)."""
    if weights:
        per_source = dict(num_workers=num_workers, epoch=epoch, world_size=world_size, shuffle_buffer=shuffle_buffer)
        per_source.update(prefetch=prefetch, scale=scale, color_jitter=color_jitter, split=split)
        return _mixture_loader(
            spec, weights, tokenizer, image_size, batch_size, fmt, seed, rank, state, repeat, pin_memory, per_source
        )
    if _mixture_state(state, rank) is not None:  # resumed with --force-resume after dropping the weights
        log.warning("the loader state is a weighted mixture's: this single spec starts afresh")
        state = None
    src = resolve(spec, fmt, split)
    shuffle_buffer = _env_int("TFDS_SHUFFLE_SIZE", DEFAULT_SHUFFLE) if shuffle_buffer is None else shuffle_buffer
    prefetch = _env_int("TFDS_PREFETCH_SIZE", 2 * batch_size) if prefetch is None else prefetch
    return TrainLoader(
        src,
        tokenizer,
        transforms.train_transform(image_size, scale, color_jitter),
        batch_size,
        num_workers=num_workers,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
        prefetch=prefetch,
        repeat=repeat,
        state=state,
        pin_memory=pin_memory,
    )


# ----------------------------------------------------------------------------- weighted mixtures
#
# `--train-data 'A::B' --train-data-weights 3::1`. Each source is a TrainLoader of its own (its own
# shard plan, shuffle buffer, epochs and resume state, seeded apart from the others), and every batch
# takes its rows from the sources in the weights' proportions. A source that reaches the end of its
# epoch starts its next one (a new shard order and shuffle) while the others go on: a small source
# with a large weight is repeated as often as its weight asks, as OpenCLIP's upsampling factors do.

MIX_SALT = 0x313  # keys the mixture's draws and its sources' seeds apart from the loader's own


def resolve_sources(spec, weights=None, fmt: str | None = None, split: str = "train") -> list[Source]:
    """The sources a training spec reads: without weights one Source (the '::'-joined parts read as
    one shard list), with weights one per part (or list item), each resolved on its own, so that
    their formats may differ."""
    if not weights:
        return [resolve(spec, fmt, split)]
    parts = shards.split_sources(spec) if isinstance(spec, str) else list(spec)
    if len(parts) != len(weights):
        raise ValueError(f"{len(weights)} mixture weight(s) for {len(parts)} '::'-joined source(s) of the data spec")
    return [resolve(p, fmt, split) for p in parts]


def mixture_counts(cdf: list[float], batch_size: int, u: float) -> list[int]:
    """Rows per source in one batch, by systematic sampling: slot j (of batch_size) goes to the
    source whose interval of the cumulative weights `cdf` (ending at 1.0) holds (j + u) / batch_size.
    Each source gets its expected count rounded down or up, never further off; u in [0, 1) (a seeded
    draw per batch) decides which, so the expected share is exactly the weight."""
    ends = [math.ceil(batch_size * c - u) for c in cdf]  # slots before each source's interval ends
    return [b - a for a, b in zip([0, *ends[:-1]], ends)]


def _mixture_state(state, rank: int) -> dict | None:
    """Our rank's mixture state from a loader state (or the list of all ranks'); None when it is not
    a mixture's."""
    if isinstance(state, (list, tuple)):
        mine = [s for s in state if isinstance(s, dict) and s.get("rank") == rank]
        state = mine[0] if mine else (state[0] if state else None)
    return state if isinstance(state, dict) and state.get("mixture") == 1 else None


class MixtureLoader:
    """Iterating yields (images uint8 [B,3,H,W], tokens LongTensor[B,T]) whose rows come from
    several sources in fixed proportions, endlessly. A batch's rows per source follow from
    mixture_counts with a draw keyed by (seed, rank, batch index) alone; source k's rows are the next
    ones of its own TrainLoader, and the sources' rows follow each other in source order. The rest of
    a source's batch waits for the next mixture batch. state_dict() holds, per source, its loader's
    state from before the batch it is taking rows from and how many of those rows were used: a
    resumed mixture pulls that batch again and continues with the next unused row, so it yields the
    very batches an uninterrupted one would. .shares: each source's realised share of the rows so far
    (this rank; carried over a resume); .samples / .skipped: summed over the sources."""

    def __init__(self, loaders: list[TrainLoader], weights, *, seed: int, rank: int, pin_memory: bool, state):
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.cdf = [sum(self.weights[: k + 1]) for k in range(len(weights))]
        self.cdf[-1] = 1.0  # rounding must not leave a slot without a source
        self.loaders = loaders
        self.batch_size = loaders[0].batch_size
        self.seed = seed
        self.rank = rank
        self.pin_memory = pin_memory
        n = len(loaders)
        self._batches = 0
        self.drawn = [0] * n  # rows taken from each source
        self._its: list[Iterator | None] = [None] * n
        self._rows: list[tuple | None] = [None] * n  # the (images, tokens) batch each source is taking rows from
        self._used = [0] * n  # its rows taken (after a resume, before that batch is pulled again: to skip)
        self._before: list[dict | None] = [None] * n  # the source's loader state from before that batch
        self._epochs = [loader.epoch for loader in loaders]
        if state is not None:
            self._batches = int(state["batches"])
            self.drawn = [int(d) for d in state["drawn"]]
            self._used = [int(s["used"]) for s in state["sources"]]

    @property
    def shares(self) -> list[float]:
        total = sum(self.drawn)
        return [d / total if total else 0.0 for d in self.drawn]

    @property
    def samples(self) -> int:
        return sum(loader.samples for loader in self.loaders)

    @property
    def skipped(self) -> dict:
        c = sum((Counter(loader.skipped) for loader in self.loaders), Counter())
        return dict(sorted(c.items()))

    @property
    def epochs(self) -> list[int]:
        return [loader.epoch for loader in self.loaders]

    def state_dict(self) -> dict:
        sources = []
        for k, loader in enumerate(self.loaders):
            taking = self._rows[k] is not None
            sources.append({"loader": self._before[k] if taking else loader.state_dict(), "used": self._used[k]})
        return {
            "mixture": 1,
            "rank": self.rank,
            "seed": self.seed,
            "weights": list(self.weights),
            "batches": self._batches,
            "drawn": list(self.drawn),
            "sources": sources,
        }

    def _take(self, k: int, n: int) -> list[tuple]:
        """The next n rows of source k, as (images, tokens) pieces."""
        pieces = []
        while n > 0:
            if self._rows[k] is None:
                self._before[k] = self.loaders[k].state_dict()
                if self._its[k] is None:
                    self._its[k] = iter(self.loaders[k])
                self._rows[k] = next(self._its[k])
                if self.loaders[k].epoch != self._epochs[k]:
                    self._epochs[k] = self.loaders[k].epoch
                    log.info(
                        "mixture source %d (rank %d) is exhausted: it starts its epoch %d",
                        k,
                        self.rank,
                        self._epochs[k],
                    )
            images, tokens = self._rows[k]
            a = self._used[k]
            b = min(a + n, len(images))
            pieces.append((images[a:b], tokens[a:b]))
            n -= b - a
            if b == len(images):
                self._rows[k], self._used[k] = None, 0
            else:
                self._used[k] = b
        return pieces

    def __iter__(self):
        while True:
            u = mix(self.seed, self.rank, self._batches, MIX_SALT) / 2.0**64
            counts = mixture_counts(self.cdf, self.batch_size, u)
            pieces = [p for k, n in enumerate(counts) for p in self._take(k, n)]
            images = torch.cat([x for x, _ in pieces])  # [B, 3, H, W]
            if isinstance(pieces[0][1], torch.Tensor):
                tokens = torch.cat([t for _, t in pieces])  # [B, T]
            else:  # captions (no tokenizer)
                tokens = [c for _, t in pieces for c in t]
            if self.pin_memory:
                images = images.pin_memory()
                tokens = tokens.pin_memory() if isinstance(tokens, torch.Tensor) else tokens
            self._batches += 1
            self.drawn = [d + n for d, n in zip(self.drawn, counts)]
            yield images, tokens


def _mixture_loader(
    spec, weights, tokenizer, image_size, batch_size, fmt, seed, rank, state, repeat, pin_memory, per_source
) -> MixtureLoader:
    """make_train_loader's weighted mixture: a TrainLoader per source (per_source: the arguments they
    share), resumed from `state`'s per-source states when it is a mixture's of as many sources."""
    weights = [float(w) for w in weights]
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"mixture weights must be positive numbers, got {weights}")
    if not repeat:
        raise ValueError(
            "a weighted mixture is endless (each source repeats on its own): repeat=False is not supported"
        )
    sources = resolve_sources(spec, weights, fmt, per_source["split"])
    mine = _mixture_state(state, rank)
    if state is not None and (mine is None or len(mine["sources"]) != len(sources)):
        log.warning("the loader state is not that of a mixture of %d sources: the mixture starts afresh", len(sources))
        mine = None
    loaders = [
        make_train_loader(
            src,
            tokenizer,
            image_size,
            batch_size,
            seed=mix(seed, k, MIX_SALT) >> 2,  # each source its own shard orders, shuffles and crops
            rank=rank,
            state=mine["sources"][k]["loader"] if mine else None,
            pin_memory=False,  # the mixed batch is pinned instead
            **per_source,
        )
        for k, src in enumerate(sources)
    ]
    return MixtureLoader(loaders, weights, seed=seed, rank=rank, pin_memory=pin_memory, state=mine)


# ----------------------------------------------------------------------------- evaluation loaders

_IMG_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff")


def _image_folder(path: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(image path, label) of an ImageFolder tree (labels = sorted class folder names), and the class names.
    On a store, a class is a prefix holding at least one file."""
    if is_remote(path):
        files = [f for f in storage.find(path) if "/" in f]
        classes = sorted({f.split("/", 1)[0] for f in files})
    else:
        files = None
        classes = sorted(d.name for d in os.scandir(path) if d.is_dir())
    if not classes:
        raise ValueError(f"{path}: no class sub-directories (expected an ImageFolder tree val/<class>/<image>)")
    items = []
    if files is not None:
        label_of = {c: i for i, c in enumerate(classes)}
        items = [(os.path.join(path, f), label_of[f.split("/", 1)[0]]) for f in files if f.lower().endswith(_IMG_EXTS)]
    else:
        for label, c in enumerate(classes):
            for root, _, names in sorted(os.walk(os.path.join(path, c))):
                items += [(os.path.join(root, f), label) for f in sorted(names) if f.lower().endswith(_IMG_EXTS)]
    if not items:
        raise ValueError(f"{path}: no images under the class directories")
    return items, classes


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, items, transform):
        self.items = items
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            return self.transform(storage.read_bytes(path, MAX_RECORD_BYTES)), label
        except Exception as e:  # noqa: BLE001
            log.warning("skipping unreadable image %s: %s", path, e)
            return None, label


def _collate_eval(batch):
    """(images, labels, unreadable count) of an ImageFolder batch; None, None, n when none is readable."""
    good = [(x, y) for x, y in batch if x is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), skipped


class _ShardEvalDataset(torch.utils.data.IterableDataset):
    """TFDS eval split: shards split over ranks and workers like training, no shuffle."""

    def __init__(self, src: Source, transform, batch_size: int, rank: int, world_size: int):
        self.src = src
        self.transform = transform
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        g = self.rank * workers + wid
        W = self.world_size * workers
        plan = _Plan(self.src.shards, list(range(len(self.src.shards))), W)
        ids, stride = plan.assign(g)
        xs, ys, bad = [], [], 0
        for pos, raws in enumerate(read_shards([self.src.shards[i] for i in ids], self.src)):
            for rec, raw in enumerate(raws):
                if stride > 1 and (pos + rec) % W != g:
                    continue
                if raw.reason is not None:
                    bad += 1
                    continue
                try:
                    xs.append(self.transform(raw.image))
                    ys.append(raw.text)
                except Exception:  # noqa: BLE001
                    bad += 1
                if len(xs) == self.batch_size:
                    yield torch.stack(xs), torch.tensor(ys), bad
                    xs, ys, bad = [], [], 0
        if xs:
            yield torch.stack(xs), torch.tensor(ys), bad
        elif bad:
            yield None, None, bad


class EvalLoader:
    """Iterating yields (images uint8 [b,3,H,W], labels LongTensor[b]); the last batch may be
    short. .num_samples (this rank, before skips), .skipped (unreadable images seen so far)."""

    def __init__(self, dl, num_samples: int | None):
        self.dl = dl
        self.num_samples = num_samples
        self.skipped = 0

    def __iter__(self):
        for images, labels, bad in self.dl:
            self.skipped += bad
            if images is not None:
                yield images, labels

    def __len__(self):
        return len(self.dl)


def make_eval_loader(
    path,
    transform,
    batch_size: int,
    *,
    fmt: str | None = None,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    split: str | None = None,
) -> tuple[EvalLoader, list[str]]:
    """ImageNet-style evaluation data: an ImageFolder tree (labels = sorted folder names) or a TFDS
    directory (e.g. imagenet2012, labels from its ClassLabel feature; split None: 'validation', else
    the dataset's only split). Each rank reads a disjoint part. Returns (loader, class folder / label
    names in label order)."""
    path = os.fspath(path)
    if fmt not in (None, "imagefolder", "tfds"):
        raise ValueError(f"unknown eval format {fmt!r}; choose imagefolder or tfds")
    if not storage.exists(path):
        raise FileNotFoundError(f"no such evaluation directory: {path!r}")
    if fmt == "tfds" or (fmt is None and find_tfds_dir(path)):
        src = resolve(path, "tfds", split)
        if src.label_key is None:
            raise ValueError(f"{path}: TFDS dataset has no ClassLabel feature")
        ds = _ShardEvalDataset(src, transform, batch_size, rank, world_size)
        xla_utils.import_tensorflow()
        dl = torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            collate_fn=_identity,
            num_workers=num_workers,
            generator=_generator(rank),
            worker_init_fn=worker_init,
        )
        return EvalLoader(dl, None), list(src.classes)
    if not storage.isdir(path):
        raise ValueError(f"{path}: not a directory (expected an ImageFolder tree or TFDS dir)")
    if split is not None:
        raise ValueError(f"{path}: an ImageFolder tree has no splits (a split is for a TFDS dir)")
    items, classes = _image_folder(path)
    n = len(items)
    part = items[rank * n // world_size : (rank + 1) * n // world_size]
    dl = torch.utils.data.DataLoader(
        _FolderDataset(part, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_eval,
        generator=_generator(rank),
        worker_init_fn=worker_init,
    )
    return EvalLoader(dl, len(part)), classes


# ----------------------------------------------------------------------------- stats


def dataset_stats(spec, fmt: str | None = None, decode: bool = True, split: str = "train") -> dict:
    """Read every record (and decode every image as the train loader does, its transform at 16 px:
    mostly 1/8 DCT scale) and count good / bad ones by the loader's reasons. Bad data is counted,
    never raised; `spec` may be a resolved Source. "alarm": the loader's bad-data alarm (BadShare)
    over the records in spec order, its first line or None."""
    t0 = time.time()
    src = resolve(spec, fmt, split)
    check = transforms.train_transform(16)
    reasons: Counter = Counter()
    samples = 0
    empty = 0
    chars = 0
    window = BadShare()
    alarm = None

    def count(reason: str | None):
        nonlocal alarm
        line = window.add(reason)
        if line and alarm is None:
            alarm = line
            log.warning("the loader would stop here: %s", line)

    for raws in read_shards(src.shards, src):  # a missing or unreadable shard: one unreadable_shard
        n = 0
        for raw in raws:
            n += 1
            if raw.reason is None and decode:
                try:
                    check(raw.image, random.Random(0))
                except Exception as e:  # noqa: BLE001 - any decoder error means a bad image
                    raw = raw._replace(reason=transforms.skip_reason(e))
            if raw.reason is None:
                samples += 1
                chars += len(raw.text) if isinstance(raw.text, str) else 0
            else:
                reasons[raw.reason] += 1
            count(raw.reason)
        if n == 0:  # img2dataset: a shard whose downloads all failed (0 bytes / no members)
            empty += 1
    return {
        "format": src.fmt,
        "shards": len(src.shards),
        "empty_shards": empty,
        "samples": samples,
        "skipped": sum(reasons.values()),
        "skipped_by_reason": dict(sorted(reasons.items())),
        "mean_caption_chars": round(chars / max(samples, 1), 1),
        "alarm": alarm,
        "seconds": round(time.time() - t0, 2),
    }


def count_words(spec, kind: str = "clip_bpe", top: int = tokenizer_lib.COUNTS_TOP, fmt=None, split="train"):
    """The word counts of a data set's captions (tokenizer.WordCounter), read once in spec order:
    (tokenizer.WordCounts of the `top` most frequent words, a summary dict). Records the loader would
    skip for their bytes (no caption, unreadable) are not counted; images are not decoded."""
    t0 = time.time()
    src = resolve(spec, fmt, split)
    counter = tokenizer_lib.WordCounter(kind)
    skipped = missing = 0
    for path in src.shards:
        if not is_remote(path) and not os.path.exists(path):
            missing += 1
            log.warning("missing shard %s", path)
            continue
        for raw in read_shard(path, src):
            if raw.reason is None:
                counter.add(raw.text)
            else:
                skipped += 1
    counts = counter.result(top)
    summary = {
        "tokenizer": kind,
        "shards": len(src.shards),
        "missing_shards": missing,
        "captions": counts.captions,
        "skipped": skipped,
        "words": counts.total,
        "distinct_words": len(counter.counts),
        "listed": len(counts.counts),
        # every word rarer than this (the last listed) is never dropped: t below it is not fully covered
        "last_listed_frequency": min(counts.counts.values()) / counts.total if counts.counts else None,
        "seconds": round(time.time() - t0, 2),
    }
    return counts, summary


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="data.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("stats", help="read a dataset end to end; print one JSON object")
    p.add_argument("spec", nargs="+", help="shards: brace pattern, glob, directory or files")
    p.add_argument("--format", choices=FORMATS, default=None)
    p.add_argument("--no-decode", action="store_true", help="do not decode images")
    p.add_argument("--split", default="train", help="TFDS split (e.g. validation)")
    p = sub.add_parser("reshard", help="copy shards with each image re-encoded to a bounded side")
    p.add_argument("src", help="shards (webdataset tar or TFRecord): brace pattern, glob, directory")
    p.add_argument("dst", help="local output directory: the same shard names, the same format")
    p.add_argument("--max-side", type=int, required=True, help="longest image side, e.g. 2x the pre-train px")
    p.add_argument("--quality", type=int, default=shards.RESHARD_QUALITY, help="JPEG / WebP quality")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes")
    p.add_argument("--format", choices=FORMATS, default=None)
    p = sub.add_parser("counts", help="count the words of the captions once: --text-reduction frequency's file")
    p.add_argument("spec", nargs="+", help="the training shards (as --train-data): brace pattern, glob, directory")
    p.add_argument("--out", required=True, help="the word counts file to write (JSON)")
    p.add_argument(
        "--tokenizer",
        choices=tokenizer_lib.TOKENIZERS,
        default="clip_bpe",
        help="split words as the model's tokenizer does: clip_bpe (v1 and toy models, default) or wordpiece (v2)",
    )
    p.add_argument("--top", type=int, default=tokenizer_lib.COUNTS_TOP, help="most frequent words listed")
    p.add_argument("--format", choices=FORMATS, default=None)
    p.add_argument("--split", default="train", help="TFDS split")
    args = ap.parse_args(argv)
    xla_utils.TF_AFTER_XLA = False  # this process never uses XLA: skip the torch_xla import
    logging.basicConfig(level=logging.INFO, format="[data] %(message)s", stream=sys.stderr)
    if args.cmd == "reshard":
        return _reshard_command(args)
    if args.cmd == "counts":
        return _counts_command(args)
    return _stats_command(args)


def _counts_command(args) -> int:
    spec = args.spec[0] if len(args.spec) == 1 else args.spec
    if not 1 <= args.top <= tokenizer_lib.MAX_COUNTS_WORDS:
        return cli.usage_error(f"--top must be in 1..{tokenizer_lib.MAX_COUNTS_WORDS}, got {args.top}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir) or os.path.isdir(args.out):
        return cli.usage_error(f"--out {args.out}: not a file in an existing directory")
    try:  # a spec that does not resolve is the user's error; anything later is a bug or bad data
        src = resolve(spec, args.format, args.split)
    except (ValueError, OSError) as e:
        return cli.usage_error(e)
    counts, summary = count_words(src, args.tokenizer, args.top)
    if not counts.total:
        return cli.usage_error(f"no words in the captions of {summary['captions']} samples: nothing to count")
    summary["sha256"] = tokenizer_lib.write_word_counts(args.out, counts)
    summary["out"] = args.out
    print(json.dumps(summary))
    return 0


def _stats_command(args) -> int:
    spec = args.spec[0] if len(args.spec) == 1 else args.spec
    try:  # a spec that does not resolve is the user's error; anything later is a bug or bad data
        src = resolve(spec, args.format, args.split)
    except (ValueError, OSError) as e:
        return cli.usage_error(e)
    print(json.dumps(dataset_stats(src, decode=not args.no_decode)))
    return 0


def _reshard_command(args) -> int:
    try:  # a bad spec or destination is the user's error; anything later is a bug or bad data
        src = resolve(args.src, args.format)
        plan = shards.reshard_plan(
            src, args.dst, args.max_side, args.quality, args.workers, transforms.MAX_IMAGE_PIXELS
        )
    except (ValueError, OSError) as e:
        return cli.usage_error(e)
    out = shards.reshard(plan)
    print(json.dumps(out))
    return 1 if out["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
