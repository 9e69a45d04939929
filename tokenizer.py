"""Text tokenizers for CLIPA: CLIP BPE (v1 models), BERT WordPiece (v2 models), and the text token
reduction strategies (docs/recipe.md): CLIPA's truncate, random, block, syntax, and CLIPF's word
frequency masking, `frequency`, which reads a word counts file (`python data.py counts`).

    tok = Tokenizer("clip_bpe", context_length=8, reduction="syntax")   # training: syntax masking
    ids = tok(["a diagram", "a dog"], rng=random.Random(0))             # LongTensor [2, 8]
    Tokenizer("clip_bpe", 8)                                            # evaluation: truncation
    Tokenizer("clip_bpe", 8, "frequency", word_counts="counts.json")    # frequency masking

factory.get_tokenizer(model_name) builds the one a registered model implies. This module imports no
other project module; its benchmark is launch/bench_tokenizer.py.

CLIP BPE rows are SOT + BPE tokens + EOT, zero padded; a cut row ends with EOT (as OpenCLIP).
WordPiece rows are [CLS] + word-pieces, no [SEP], zero padded (as the v2 big_vision models).
Everything runs offline from the files in assets/ (see assets/LICENSES.md).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import heapq
import html
import json
import math
import os
import random
import stat
from collections import Counter
from dataclasses import dataclass

import numpy as np
import regex
import torch

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BPE_VOCAB = os.path.join(ASSETS, "bpe_simple_vocab_16e6.txt.gz")
BERT_VOCAB = os.path.join(ASSETS, "bert_base_uncased_vocab.txt")
SYNTAX_TABLE = os.path.join(ASSETS, "syntax_priority.tsv.gz")

REDUCTIONS = ("truncate", "random", "block", "syntax", "frequency")
TOKENIZERS = ("clip_bpe", "wordpiece")

# Part-of-speech priority of syntax masking (lower is kept first): nouns, adjectives, verbs, rest.
NOUN, ADJ, VERB, OTHER = 1, 2, 3, 4


# ----------------------------------------------------------------------------- input hygiene


def _as_text(x) -> str:
    """Any caption-ish object -> str. Data loaders hand us bytes (invalid UTF-8 too), None, numbers."""
    if isinstance(x, str):
        return x
    if x is None:
        return ""
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x).decode("utf-8", errors="replace")
    return str(x)


def _as_list(texts) -> list[str]:
    if isinstance(texts, (str, bytes, bytearray, memoryview)) or texts is None:
        return [_as_text(texts)]
    try:
        return [_as_text(t) for t in texts]
    except TypeError:  # a single non-iterable object (an int, ...)
        return [_as_text(texts)]


# ----------------------------------------------------------------------------- CLIP BPE


def _bytes_to_chars() -> list[str]:
    """The 256 printable characters that stand for the bytes 0..255 in the BPE vocabulary.

    Printable Latin-1 bytes stand for themselves; the others (control chars, space, ...) are moved
    to code points 256, 257, ... in byte order, so no BPE symbol is whitespace or a control char."""
    printable = (
        set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


# Captions that are plain printable ASCII without '&' come out of ftfy.fix_text and html.unescape
# unchanged, so they skip both (the common case; ftfy is most of OpenCLIP's per-caption cost).
_PLAIN_ASCII = regex.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")
_UNASSIGNED = regex.compile(r"[\p{Cn}\p{Co}\ud800-\udfff]")
_PLAIN_ASCII_AMP = regex.compile(r"[\t\n\r\x20-\x7e]*")  # WordPiece does no HTML unescaping


def clean_caption(text: str) -> str:
    """CLIP's caption cleaning: ftfy fix, HTML unescape (twice), whitespace collapse, lower case."""
    if not _PLAIN_ASCII.fullmatch(text):
        import ftfy  # lazy: only captions with non-ASCII, control chars or entities need it

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class _CachedWords:
    """Word -> ids with a per-process cache: captions repeat words, so the slow part (BPE merges,
    word-piece search) runs once per distinct word. Subclasses define _word_ids_uncached."""

    MAX_CACHE = 200_000  # entries; cleared when full (URLs and junk words never repeat)
    # characters: a longer word (a URL, junk) is encoded every time, never kept, so that the cache
    # stays ~100 MB at most (200,000 distinct 16 KB junk captions would fill GBs)
    MAX_CACHED_WORD = 64
    _pinned: dict = {}  # entries that survive clearing

    def word_ids(self, word: str) -> tuple[int, ...]:
        ids = self.cache.get(word)
        if ids is None:
            ids = self._word_ids_uncached(word)
            if len(word) > self.MAX_CACHED_WORD:
                return ids
            if len(self.cache) >= self.MAX_CACHE:
                self.cache.clear()
                self.cache.update(self._pinned)
            self.cache[word] = ids
        return ids

    def encode_words(self, words, limit: int | None = None) -> list[int]:
        """Ids of the words; stops once more than `limit` ids are out (enough to know it's cut)."""
        ids: list[int] = []
        cache = self.cache
        for w in words:
            wid = cache.get(w)
            ids.extend(wid if wid is not None else self.word_ids(w))
            if limit is not None and len(ids) > limit:
                break
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_words(self.words(_as_text(text)))


class ClipBPE(_CachedWords):
    """CLIP's byte-level BPE (49408 ids: 256 bytes, 256 word-final bytes, 48894 merges, SOT, EOT)."""

    kind = "clip_bpe"

    def __init__(self, path: str = BPE_VOCAB):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP BPE vocabulary not found: {path}")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        byte_chars = _bytes_to_chars()
        # vocabulary order of the original: the printable-byte symbols first, then the moved ones
        base = [c for c in byte_chars if ord(c) < 256] + [c for c in byte_chars if ord(c) >= 256]
        vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.decoder = vocab
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.byte_chars = byte_chars
        self.byte_of = {c: b for b, c in enumerate(byte_chars)}
        self.sot = self.encoder["<start_of_text>"]
        self.eot = self.encoder["<end_of_text>"]
        self.vocab_size = len(vocab)
        # pre-tokenizer of the original (case-insensitive): the special token spellings,
        # contractions, letter runs, single digits, runs of other non-space symbols
        self.pattern = regex.compile(
            r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE
        )
        self._pinned = {"<start_of_text>": (self.sot,), "<end_of_text>": (self.eot,)}
        self.cache = dict(self._pinned)

    # -- words
    def words(self, text: str) -> list[str]:
        """Cleaned, lower-cased pre-tokens ("words") of a caption."""
        return self.pattern.findall(clean_caption(text))

    def decode(self, ids) -> str:
        """Text of a row: the ids after SOT up to EOT (id 0 is "!", so padding is found by EOT)."""
        pieces = []
        for i in map(int, ids):
            if i == self.eot:
                break
            if i != self.sot:
                pieces.append(self.decoder[i])
        words = "".join(pieces).split("</w>")
        return " ".join(bytes(self.byte_of[c] for c in w).decode("utf-8", "replace") for w in words).strip()

    # -- byte pair merging
    def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
        syms = [self.byte_chars[b] for b in word.encode("utf-8")]
        if not syms:
            return ()
        syms[-1] += "</w>"
        syms = self._merge(syms) if len(syms) <= 40 else self._merge_long(syms)
        enc = self.encoder
        return tuple(enc[s] for s in syms)

    def _merge(self, syms: list[str]) -> list[str]:
        """Repeatedly merge every occurrence (left to right) of the adjacent pair of lowest rank."""
        ranks = self.ranks
        while len(syms) > 1:
            best, best_rank = None, None
            for pair in zip(syms, syms[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            a, b = best
            merged, i, n = [], 0, len(syms)
            while i < n:
                if i < n - 1 and syms[i] == a and syms[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(syms[i])
                    i += 1
            syms = merged
        return syms

    def _merge_long(self, syms: list[str]) -> list[str]:
        """Same result as _merge in O(n log n) for very long "words" (10k-letter junk captions).

        A heap of (rank, position) over a linked list of symbols: pops the lowest-rank pair, leftmost
        first, exactly the order of _merge (a merge only creates pairs of higher rank, since a merged
        symbol exists only after its own merge)."""
        ranks, n = self.ranks, len(syms)
        nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        heap = [(r, i) for i in range(n - 1) if (r := ranks.get((syms[i], syms[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            r, i = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j >= n or ranks.get((syms[i], syms[j])) != r:
                continue  # stale entry: one of its symbols has been merged since
            syms[i] += syms[j]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            p, q = prv[i], nxt[i]
            if p >= 0 and (rp := ranks.get((syms[p], syms[i]))) is not None:
                heapq.heappush(heap, (rp, p))
            if q < n and (rq := ranks.get((syms[i], syms[q]))) is not None:
                heapq.heappush(heap, (rq, i))
        return [s for s, a in zip(syms, alive) if a]


# ----------------------------------------------------------------------------- WordPiece


class WordPiece(_CachedWords):
    """bert-base-uncased WordPiece (30522 entries), read from the shipped vocab file.

    BERT uncased rules: drop control chars, split CJK characters, lower case, strip accents, split
    on whitespace and on every punctuation char, then greedy longest-match word-pieces ("##" marks
    a continuation; a word with no match, or over 100 chars, is one [UNK]). Hugging Face
    `tokenizers` normalises and splits non-ASCII captions; plain ASCII captions take a regex fast
    path with the same result (tests check both against transformers' BertTokenizer), and words go
    through a cache like the BPE's. No caption cleaning before it: the v2 models saw raw text."""

    kind = "wordpiece"
    MAX_WORD_CHARS = 100
    _ascii_word = regex.compile(r"[a-z0-9]+|[^a-z0-9\s]")

    def __init__(self, path: str = BERT_VOCAB):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"WordPiece vocabulary not found: {path}")
        with open(path, encoding="utf-8") as f:
            self.vocab = {w: i for i, w in enumerate(f.read().split("\n")[:-1])}
        self.decoder = list(self.vocab)
        self.vocab_size = len(self.vocab)
        self.cls, self.unk = self.vocab["[CLS]"], self.vocab["[UNK]"]
        self.cache: dict[str, tuple[int, ...]] = {}
        self._hf = None

    def _hf_split(self, text: str) -> list[str]:
        if self._hf is None:
            from tokenizers import normalizers, pre_tokenizers

            self._hf = (
                normalizers.BertNormalizer(
                    clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
                ),
                pre_tokenizers.BertPreTokenizer(),
            )
        norm, pre = self._hf
        # BERT drops every "other" (C*) character; the Rust normaliser keeps unassigned and
        # private-use ones (-> [UNK]) and cannot take lone surrogates: drop those first
        text = _UNASSIGNED.sub("", text)
        return [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))]

    def words(self, text: str) -> list[str]:
        if _PLAIN_ASCII_AMP.fullmatch(text):
            return self._ascii_word.findall(text.lower())
        return self._hf_split(text)

    def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
        if len(word) > self.MAX_WORD_CHARS:
            return (self.unk,)
        vocab, ids, start, n = self.vocab, [], 0, len(word)
        while start < n:
            for end in range(n, start, -1):  # longest piece first
                i = vocab.get(word[start:end] if start == 0 else "##" + word[start:end])
                if i is not None:
                    break
            else:
                return (self.unk,)
            ids.append(i)
            start = end
        return tuple(ids)

    def decode(self, ids) -> str:
        out = []
        for i in map(int, ids):
            if i in (0, self.cls):
                continue
            piece = self.decoder[i]
            if piece.startswith("##") and out:
                out[-1] += piece[2:]
            else:
                out.append(piece)
        return " ".join(out)


@functools.cache
def _backend(kind: str):
    # one instance per process (and per data loader worker): tokenizers only hold config
    return ClipBPE() if kind == "clip_bpe" else WordPiece()


# ----------------------------------------------------------------------------- syntax table


@functools.cache
def syntax_table(path: str = SYNTAX_TABLE) -> tuple[dict[str, int], dict[str, int]]:
    """(word -> priority, suffix -> priority) from the shipped table (assets/build_syntax_table.py).

    The file lists every vocabulary word (nouns too); the suffix rules and the noun default serve
    only words outside both vocabularies."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"syntax priority table not found: {path} (see assets/build_syntax_table.py)")
    words, suffixes = {}, {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            kind, prio, key = line.rstrip("\n").split("\t")
            (words if kind == "w" else suffixes)[key] = int(prio)
    return words, suffixes


_LETTERS = regex.compile(r"\p{L}+")


def word_priority(word: str, table=None) -> int:
    """Syntax-masking priority of one lower-cased word: table, else suffix rule, else by shape.

    Every vocabulary word is in the table. Letter words missing from it are mostly rare nouns
    (names, brands, places), which is also what taggers guess for unknown words, unless a learnt
    suffix rule says otherwise ("-ly", "-ing", "-ous", ...). Digits, punctuation and symbols are
    OTHER (CD / punctuation tags)."""
    words, suffixes = table or syntax_table()
    p = words.get(word)
    if p is not None:
        return p
    if not _LETTERS.fullmatch(word):
        return OTHER
    for k in (4, 3):
        if len(word) > k + 2:
            p = suffixes.get(word[-k:])
            if p is not None:
                return p
    return NOUN


_PRIORITY_CACHE: dict[str, int] = {}  # word -> priority for the words this process has seen


def syntax_select(words: list[str], keep: int) -> list[str]:
    """The first `keep` words by (priority, position), back in sentence order."""
    if len(words) <= keep:
        return words
    cache = _PRIORITY_CACHE
    prio = []
    for w in words:
        p = cache.get(w)
        if p is None:
            p = word_priority(w)
            if len(w) <= _CachedWords.MAX_CACHED_WORD:
                if len(cache) >= _CachedWords.MAX_CACHE:
                    cache.clear()
                cache[w] = p
        prio.append(p)
    chosen = sorted(sorted(range(len(words)), key=prio.__getitem__)[:keep])
    return [words[i] for i in chosen]


# ----------------------------------------------------------------------------- word frequency masking

# t of CLIPF's P(w) = 1 - sqrt(t / f(w)): the value of the authors' code (they cite word2vec's
# subsampling, where t is around 1e-5); see docs/recipe.md
FREQUENCY_THRESHOLD = 1e-6
COUNTS_FORMAT = "clipa-word-counts"
COUNTS_TOP = 100_000  # words a counts file lists by default (the most frequent)
MAX_COUNTS_WORDS = 1_000_000  # at most 1/t words can have f > t: t = 1e-6 never needs more
MAX_COUNTS_BYTES = 64 << 20  # a counts file of MAX_COUNTS_WORDS words is ~20 MB
MAX_COUNTING = 4_000_000  # distinct words held while counting; past it the rarest are dropped


@dataclass(frozen=True)
class WordCounts:
    """A word counts file: the most frequent words of a set of captions, split into words the way
    `tokenizer` splits them, and the number of all words (listed or not): f(w) = counts[w] / total."""

    tokenizer: str
    total: int
    captions: int
    counts: dict[str, int]  # most frequent first
    sha256: str = ""  # of the file's bytes

    def keep_probabilities(self, threshold: float) -> dict[str, float]:
        """word -> its chance to survive, sqrt(t / f(w)), for the listed words with f(w) > t; every
        other word always survives (a word not listed is at most as frequent as the last one)."""
        cut = threshold * self.total
        return {w: math.sqrt(threshold * (self.total / c)) for w, c in self.counts.items() if c > cut}


class WordCounter:
    """Counts the words of captions as Tokenizer(kind) splits them, in bounded memory: words longer
    than _CachedWords.MAX_CACHED_WORD (URLs, junk) count only in the total, and past MAX_COUNTING
    distinct words the rarest are dropped (their counts are then a little low; they are words far
    rarer than any useful t)."""

    def __init__(self, kind: str = "clip_bpe", max_words: int = MAX_COUNTING):
        if kind not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {kind!r}; valid: {', '.join(TOKENIZERS)}")
        self.kind, self.max_words = kind, max_words
        self.counts: Counter = Counter()
        self.total = self.captions = self.floor = 0

    def add(self, text) -> None:
        words = _backend(self.kind).words(_as_text(text))
        self.captions += 1
        self.total += len(words)
        self.counts.update(w for w in words if len(w) <= _CachedWords.MAX_CACHED_WORD)
        if len(self.counts) > self.max_words:
            while len(self.counts) > self.max_words // 2:
                self.floor += 1
                self.counts = Counter({w: c for w, c in self.counts.items() if c > self.floor})

    def result(self, top: int = COUNTS_TOP) -> WordCounts:
        return WordCounts(self.kind, self.total, self.captions, dict(self.counts.most_common(top)))


def write_word_counts(path: str, counts: WordCounts) -> str:
    """Write the counts file (JSON, atomically); returns its sha256."""
    blob = json.dumps(
        {
            "format": COUNTS_FORMAT,
            "tokenizer": counts.tokenizer,
            "total": counts.total,
            "captions": counts.captions,
            "counts": counts.counts,
        },
        ensure_ascii=False,
    ).encode("utf-8")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    return hashlib.sha256(blob).hexdigest()


def _bad(path: str, why: str) -> ValueError:
    return ValueError(f"word counts {path}: {why} (write one with `python data.py counts SPEC --out FILE`)")


@functools.lru_cache(maxsize=8)
def _read_word_counts(path: str, identity: tuple) -> WordCounts:
    with open(path, "rb") as f:
        blob = f.read(MAX_COUNTS_BYTES + 1)
    if len(blob) > MAX_COUNTS_BYTES:
        raise _bad(path, f"over {MAX_COUNTS_BYTES >> 20} MiB")
    try:
        obj = json.loads(blob)
    except (ValueError, RecursionError):
        raise _bad(path, "not JSON") from None
    if not isinstance(obj, dict) or obj.get("format") != COUNTS_FORMAT:
        raise _bad(path, "not a word counts file")
    kind, total, captions, counts = (obj.get(k) for k in ("tokenizer", "total", "captions", "counts"))
    if kind not in TOKENIZERS:
        raise _bad(path, f"unknown tokenizer; valid: {', '.join(TOKENIZERS)}")

    def count(x) -> bool:
        return type(x) is int and x >= 0

    if not (count(total) and count(captions) and isinstance(counts, dict) and len(counts) <= MAX_COUNTS_WORDS):
        raise _bad(path, "total, captions or counts missing or not counts")
    if not all(count(c) and c > 0 for c in counts.values()) or sum(counts.values()) > total:
        raise _bad(path, "the counts are not positive integers adding up to at most the total")
    return WordCounts(kind, total, captions, counts, hashlib.sha256(blob).hexdigest())


def read_word_counts(path: str) -> WordCounts:
    """A counts file, checked: a regular file of at most MAX_COUNTS_BYTES holding what
    write_word_counts writes. Read once per process while the file stays the same. Every problem is
    a one-line ValueError that does not echo the file's content."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise _bad(path, e.strerror or "not readable") from None
    if not stat.S_ISREG(st.st_mode):
        raise _bad(path, "not a regular file")
    if st.st_size > MAX_COUNTS_BYTES:
        raise _bad(path, f"over {MAX_COUNTS_BYTES >> 20} MiB")
    try:
        return _read_word_counts(os.path.abspath(path), (st.st_ino, st.st_size, st.st_mtime_ns))
    except OSError as e:
        raise _bad(path, e.strerror or "not readable") from None


@functools.lru_cache(maxsize=8)
def _keep_table(path: str, sha256: str, threshold: float) -> dict[str, float]:
    # per process (a data loader worker loads it on its first batch): the tokenizer pickles small
    counts = read_word_counts(path)
    if counts.sha256 != sha256:  # changed since the run checked it: the masks would differ
        raise _bad(path, f"changed since it was checked (sha256 {counts.sha256[:12]}, expected {sha256[:12]})")
    return counts.keep_probabilities(threshold)


def frequency_select(word_ids: list[tuple[int, ...]], keep: list[float], k: int, rng) -> list[int]:
    """CLIPF word frequency masking of one caption: each word survives with probability keep[i]
    (is dropped with P(w) = 1 - sqrt(t / f(w))), then the survivors are cut to k ids.

    One uniform draw u per word orders the words by s = u / keep: the survivors are exactly the words
    with s < 1. The row takes whole words in that order, skipping a word whose ids no longer fit,
    and puts them back in sentence order. So when the survivors fill more than k ids, the cut keeps
    a uniformly random subset of them (a survivor's s is uniform on [0, 1), whatever its word); when
    they fill fewer, dropped words are put back, those closest to surviving first, until the row is
    full: a row is as full as its caption allows, as with the other reductions, and a caption that
    fits whole is kept whole (as in the CLIPF authors' code). Returns the content ids."""
    n = len(word_ids)
    if sum(map(len, word_ids)) <= k:
        return [i for ids in word_ids for i in ids]
    score = [rng.random() / p for p in keep]
    chosen, room = [], k
    for j in sorted(range(n), key=score.__getitem__):
        m = len(word_ids[j])
        if m <= room:
            chosen.append(j)
            room -= m
            if room == 0:
                break
    if not chosen:  # every word is longer than the row: the first in the order, cut
        return list(word_ids[min(range(n), key=score.__getitem__)][:k])
    chosen.sort()
    return [i for j in chosen for i in word_ids[j]]


# ----------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """Callable: texts -> LongTensor[N, context_length] with one text token reduction strategy."""

    def __init__(
        self,
        tokenizer: str = "clip_bpe",
        context_length: int = 77,
        reduction: str = "truncate",
        word_counts: str | None = None,
        threshold: float = FREQUENCY_THRESHOLD,
    ):
        """word_counts, threshold: the counts file and t of `frequency` masking (unused otherwise)."""
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {tokenizer!r}; valid: {', '.join(TOKENIZERS)}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2, got {context_length!r}")
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.reduction = reduction
        # content slots: CLIP rows need SOT and EOT around the content, WordPiece rows only [CLS]
        self.content_length = context_length - (2 if tokenizer == "clip_bpe" else 1)
        if reduction == "syntax":
            syntax_table()  # fail now, not in a data loader worker, if the table is missing
        self.word_counts, self.threshold, self.counts_sha256 = None, threshold, None
        if reduction == "frequency":
            if not word_counts:
                raise ValueError("text reduction frequency needs a word counts file (`python data.py counts`)")
            if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
                raise ValueError(f"frequency threshold t must be in (0, 1], got {threshold!r}")
            counts = read_word_counts(word_counts)  # fail now, not in a worker
            if counts.tokenizer != tokenizer:
                raise ValueError(
                    f"word counts {word_counts} split words for {counts.tokenizer}, this model's tokenizer is "
                    f"{tokenizer}: count again with --tokenizer {tokenizer}"
                )
            self.word_counts, self.counts_sha256 = os.path.abspath(word_counts), counts.sha256

    @property
    def backend(self):
        return _backend(self.tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def __repr__(self):
        extra = f", word_counts={self.word_counts!r}, threshold={self.threshold:g}" if self.word_counts else ""
        return (
            f"Tokenizer({self.tokenizer!r}, context_length={self.context_length}, reduction={self.reduction!r}{extra})"
        )

    def __call__(self, texts, rng: random.Random | None = None) -> torch.LongTensor:
        """Tokenize a caption or a list of captions. `rng` drives random/block/frequency masking; None -> the
        `random` module (seeded per worker by torch's DataLoader, so workers differ reproducibly)."""
        texts = _as_list(texts)
        if rng is None:
            rng = random
        elif not (hasattr(rng, "sample") and hasattr(rng, "randrange")):
            raise ValueError(f"rng must be a random.Random (or None), got {type(rng).__name__}")
        bk = _backend(self.tokenizer)
        row = self._row_bpe if self.tokenizer == "clip_bpe" else self._row_wordpiece
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = row(bk, text, rng)
            out[i, : len(ids)] = ids
        return torch.from_numpy(out)

    def decode(self, ids) -> str:
        return self.backend.decode(ids)

    # -- one row
    def _content(self, bk, text: str, rng) -> list[int]:
        """Content ids (no specials) after the reduction; may still be too long (then truncated)."""
        k = self.content_length
        if self.reduction == "truncate":
            return bk.encode_words(bk.words(text), limit=k)
        if self.reduction == "syntax":
            return bk.encode_words(syntax_select(bk.words(text), k), limit=k)
        if self.reduction == "frequency":
            table = _keep_table(self.word_counts, self.counts_sha256, self.threshold)
            words = bk.words(text)
            cache = bk.cache
            ids = [cache.get(w) or bk.word_ids(w) for w in words]
            return frequency_select(ids, [table.get(w, 1.0) for w in words], k, rng)
        ids = bk.encode_words(bk.words(text))
        n = len(ids)
        if n <= k:
            return ids
        if self.reduction == "random":  # a random ordered subset
            return [ids[j] for j in sorted(rng.sample(range(n), k))]
        start = rng.randrange(n - k + 1)  # block: one random contiguous window
        return ids[start : start + k]

    def _row_bpe(self, bk, text: str, rng) -> list[int]:
        ids = [bk.sot] + self._content(bk, text, rng) + [bk.eot]
        if len(ids) > self.context_length:
            ids = ids[: self.context_length]
            ids[-1] = bk.eot  # a cut row still ends with EOT (the v1 text pooling token)
        return ids

    def _row_wordpiece(self, bk, text: str, rng) -> list[int]:
        return ([bk.cls] + self._content(bk, text, rng))[: self.context_length]
