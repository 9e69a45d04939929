"""Tokenizer throughput: captions/s on one core for every reduction strategy of tokenizer.py and
for OpenCLIP's tokenizers, on the same synthetic captions in the same run (frequency masking with
word counts of the warm-up captions at the default t, where every word is frequent enough to be
dropped: its slowest case).

    python launch/bench_tokenizer.py [--n 20000] [--batch 256]

The captions are alt-text-like (10-20 words), half with a rare vocabulary word so the word cache
also misses; a "non-ascii" corpus puts one non-ASCII word in each (the ftfy / Unicode path).
The OpenCLIP rows need open_clip_torch (a test requirement); without it only our rows print.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import cli  # noqa: E402
import tokenizer  # noqa: E402

_SUBJECTS = (
    "dog",
    "cat",
    "woman",
    "man",
    "child",
    "car",
    "house",
    "bird",
    "horse",
    "boat",
    "table",
    "chair",
    "street",
    "mountain",
    "beach",
    "kitchen",
    "flower",
    "tree",
    "bicycle",
    "train",
    "pizza",
    "laptop",
    "girl",
    "boy",
    "city",
    "river",
    "shirt",
    "dress",
    "guitar",
    "cake",
)
_ADJS = (
    "large",
    "small",
    "brown",
    "green",
    "red",
    "old",
    "young",
    "beautiful",
    "white",
    "black",
    "wooden",
    "modern",
    "vintage",
    "happy",
    "blue",
    "tall",
    "cozy",
    "colorful",
    "empty",
    "busy",
)
_VERBS = (
    "running",
    "sitting",
    "standing",
    "walking",
    "holding",
    "playing",
    "eating",
    "looking at",
    "riding",
    "lying on",
    "jumping over",
    "parked near",
    "flying above",
    "reading",
)
_PLACES = (
    "on the grass",
    "in a park",
    "near the water",
    "at night",
    "in the snow",
    "on a table",
    "by the window",
    "in the city",
    "under a tree",
    "on the street",
    "at the beach",
)
_EXTRAS = (
    "stock photo",
    "high resolution",
    "for sale",
    "free shipping",
    "hd wallpaper",
    "with a smile",
    "during sunset",
    "in 2019",
    "size 10",
    "#travel",
    "- image 3 of 12",
)
_NON_ASCII = (
    "café",
    "naïve",
    "Zürich",
    "São Paulo",
    "“quoted”",
    "it’s",
    "—",
    "😀",
    "🐶",
    "日本",
    "crème brûlée",
    "5 °C",
    "© 2020",
    "Ø 30 cm",
    "niño",
)


def synthetic_captions(
    n: int, seed: int = 0, rare_words: list[str] | None = None, non_ascii: bool = False
) -> list[str]:
    """Caption-like texts of mostly 10-20 words (alt-text style), with a share of rare words so
    the word cache also sees misses; non_ascii=True puts one non-ASCII word in every caption."""
    r = random.Random(seed)
    rare = rare_words or []
    caps = []
    for _ in range(n):
        parts = [
            r.choice(("a", "the", "two", "an image of a", "photo of a")),
            r.choice(_ADJS),
            r.choice(_ADJS),
            r.choice(_SUBJECTS),
            r.choice(_VERBS),
            r.choice(("a", "the")),
            r.choice(_ADJS),
            r.choice(_SUBJECTS),
            r.choice(_PLACES),
        ]
        if r.random() < 0.6:
            parts.append(r.choice(_EXTRAS))
        if rare and r.random() < 0.5:
            parts.insert(r.randrange(len(parts)), r.choice(rare))
        if non_ascii:
            parts.insert(r.randrange(len(parts) + 1), r.choice(_NON_ASCII))
        cap = " ".join(parts)
        if r.random() < 0.3:
            cap = cap.capitalize() + "."
        caps.append(cap)
    return caps


def rare_words(k: int = 20000, seed: int = 1) -> list[str]:
    """Real whole-word entries of the BPE vocabulary, for captions with word-cache misses."""
    decoder = tokenizer.Tokenizer("clip_bpe").backend.decoder
    words = [s[:-4] for s in decoder[512:-2] if s.endswith("</w>") and s[:-4].isalpha() and len(s) > 7]
    random.Random(seed).shuffle(words)
    return words[:k]


def _rate(fn, captions, repeat: int = 3, chunk: int = 1024) -> float:
    """Captions per CPU-second of this process: the best chunk of `chunk` captions over `repeat`
    passes. CPU time, and the best of many short samples, because on a shared machine wall time
    (and even CPU time, through cache and core sharing) also pays for other processes."""
    best = 0.0
    for _ in range(repeat):
        for i in range(0, len(captions), chunk):
            part = captions[i : i + chunk]
            t = time.process_time()
            fn(part)
            best = max(best, len(part) / max(time.process_time() - t, 1e-9))
    return best


def _open_clip_references(tmp: str) -> list[tuple[str, str, object]]:
    """OpenCLIP's tokenizers for both families: SimpleTokenizer (v1) and its HFTokenizer as
    configured for the CLIPA v2 models (bert-base-uncased, strip_sep_token), here built from our
    vocab file because the hub is out of reach."""
    try:
        from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
    except ImportError:  # a test requirement, not a runtime one
        print("open_clip not installed: no reference rows", file=sys.stderr)
        return []
    oc = SimpleTokenizer()
    refs = [("open_clip SimpleTokenizer", "clip_bpe", lambda cs, ctx: oc(cs, context_length=ctx))]
    shutil.copy(tokenizer.BERT_VOCAB, os.path.join(tmp, "vocab.txt"))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        f.write('{"tokenizer_class": "BertTokenizer", "do_lower_case": true, "model_max_length": 512}')
    try:
        hf = HFTokenizer(tmp, context_length=32, strip_sep_token=True)
    except ImportError as err:  # transformers missing: the CLIP row still stands
        print(f"no OpenCLIP WordPiece reference row: {err}", file=sys.stderr)
        return refs
    refs.append(("open_clip HFTokenizer, v2 config", "wordpiece", lambda cs, ctx: hf(cs, context_length=ctx)))
    return refs


def bench(n: int = 20000, batch: int = 256, seed: int = 0) -> list[dict]:
    """captions/s on one core for every strategy and OpenCLIP's tokenizers; prints the table.

    Warm-up tokenizes other captions of the same distribution first (a data loader worker runs for
    hours, so its word cache is warm); the timed captions still contain unseen rare words."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rare = rare_words()
    warm = synthetic_captions(n, seed=seed + 1000, rare_words=rare[: len(rare) // 2])
    corpora = {
        "ascii": synthetic_captions(n, seed=seed, rare_words=rare),
        "non-ascii": synthetic_captions(n, seed=seed, rare_words=rare, non_ascii=True),
    }
    words = [len(c.split()) for c in corpora["ascii"]]
    rows = []

    def add(name, fn, corpus="ascii"):
        caps = corpora[corpus]
        fn(warm[:batch])
        fn(warm)
        batched = _rate(lambda cs: [fn(cs[i : i + batch]) for i in range(0, len(cs), batch)], caps)
        single = _rate(lambda cs: [fn([c]) for c in cs], caps[: max(1, n // 4)], chunk=256)
        rows.append(dict(name=name, corpus=corpus, batched=batched, single=single))

    with tempfile.TemporaryDirectory() as tmp:
        refs = _open_clip_references(tmp)
        counts = {}  # frequency masking's word counts, of the warm-up captions (the "training set")
        for tk in tokenizer.TOKENIZERS:
            wc = tokenizer.WordCounter(tk)
            for cap in warm:
                wc.add(cap)
            counts[tk] = os.path.join(tmp, f"counts_{tk}.json")
            tokenizer.write_word_counts(counts[tk], wc.result())
        for tk, ctx in (("clip_bpe", 16), ("clip_bpe", 8), ("wordpiece", 32)):
            for name, kind, ref in refs:
                if kind == tk:
                    add(f"{name} (ctx {ctx})", lambda cs, ref=ref, ctx=ctx: ref(cs, ctx))
            for red in tokenizer.REDUCTIONS:
                t = tokenizer.Tokenizer(tk, ctx, red, word_counts=counts[tk] if red == "frequency" else None)
                rng = random.Random(seed)
                add(f"ours {tk} {red} (ctx {ctx})", lambda cs, t=t, rng=rng: t(cs, rng=rng))
        for name, kind, ref in refs:  # captions that all need ftfy / the Unicode path
            ctx = 16 if kind == "clip_bpe" else 32
            add(f"{name} (ctx {ctx})", lambda cs, ref=ref, ctx=ctx: ref(cs, ctx), "non-ascii")
            t = tokenizer.Tokenizer(kind, ctx, "truncate")
            add(f"ours {kind} truncate (ctx {ctx})", lambda cs, t=t: t(cs), "non-ascii")
    torch.set_num_threads(threads)
    print(
        f"{n} synthetic captions of {min(words)}-{max(words)} words (mean {sum(words) / n:.1f}); "
        f"captions per CPU-second of one process (1 torch thread), best chunk (1024 / 256 "
        f"captions) of 3 passes; batched: calls of {batch} captions; single: one call per caption "
        f"({max(1, n // 4)} captions)"
    )
    print(f"| {'tokenizer / strategy':46s} | captions  | batched /s | single /s |")
    print(f"|{'-' * 48}|-----------|-----------:|----------:|")
    for r in rows:
        print(f"| {r['name']:46s} | {r['corpus']:9s} | {r['batched']:10,.0f} | {r['single']:9,.0f} |")
    return rows


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="bench_tokenizer.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="captions per measurement (default 20000)")
    ap.add_argument("--batch", type=int, default=256, help="captions per batched call")
    args = ap.parse_args(argv)
    if args.n < 1 or args.batch < 1:
        return cli.usage_error("--n and --batch must be >= 1")
    bench(args.n, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
