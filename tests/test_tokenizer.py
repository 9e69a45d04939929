"""tokenizer.py against what we did not write: OpenCLIP's SimpleTokenizer (CLIP BPE) and
transformers' pure-Python BertTokenizer (WordPiece), plus the reduction strategies' contracts and
factory.get_tokenizer for every registered model."""

import json
import os
import pickle
import random
import string

import pytest
import torch
from bench_tokenizer import synthetic_captions  # noqa: E402  (alt-text-like captions)

import factory
import model
import tokenizer as T

SOT, EOT, CLS = 49406, 49407, 101


# ----------------------------------------------------------------------------- the corpus

HAND = [
    "",
    " ",
    "\t\n  \r\n",
    "a",
    "A",
    "!!!",
    "...",
    "a diagram",
    "a dog",
    "a cat",
    "a large brown dog running on the green grass",
    "A man riding a wave on top of a surfboard.",
    "Café crème brûlée à la française",
    "naïve façade Ångström Øresund",
    "ÀÉÎÕÜ àéîõü ñ ß",
    "日本語のテキスト",
    "这是一只狗",
    "한국어 캡션",
    "Ελληνικά κείμενα",
    "Русский текст про кошку",
    "עברית",
    "العربية",
    "हिन्दी",
    "ไทย",
    "😀 🐶🐱 👍🏽 👨‍👩‍👧‍👦 ❤️ 🇺🇸",
    "dog 🐕 running 🏃‍♂️",
    "★☆♥♦ → ← ∞ ≠ ± © ® ™",
    "Tom &amp; Jerry",
    "&lt;b&gt;bold&lt;/b&gt;",
    "&amp;amp; double",
    "&quot;quoted&quot; &#39;s &#x27;",
    "fish &chips",
    "a & b",
    "AT&T",
    "&nbsp;space",
    "<b>html</b> tags <br/>",
    "https://www.example.com/path/to/image_001.jpg?size=large&v=2",
    "visit http://foo.bar/baz#frag or mail me@example.org",
    "123",
    "3.14159",
    "1,000,000 views",
    "2019-05-17 12:30:45",
    "iPhone 12 Pro Max 256GB",
    "½ ¾ ² ³ ①②",
    "a    lot     of      spaces",
    "tabs\tand\nnewlines\r\nmixed",
    "\u00a0non\u00a0breaking\u2003em space",
    "zero\u200bwidth\u200djoiner",
    "soft\u00adhyphen",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "ﬁ ﬂ ligatures",
    "curly ‘quotes’ and “double” — dash – en … ellipsis",
    "mojibake: cafÃ© donâ€™t",
    "control\x00chars\x01\x07\x1b[31mred\x1b[0m\x7f",
    "vertical\x0btab form\x0cfeed",
    "fs\x1cgs\x1drs\x1eus\x1f",
    "it's they're we've I'm you'll he'd don't",
    "IT'S THEY'RE",
    "'s 't 're",
    "rock'n'roll",
    "hello <start_of_text> world <end_of_text> !",
    "[CLS] [SEP] [MASK] [PAD]",
    "ALL CAPS CAPTION FOR A PHOTO",
    "MiXeD CaSe CaPtIoN",
    "snake_case_words and kebab-case-words",
    "e.g. i.e. etc. U.S.A. Dr. Smith",
    "#hashtag @mention $100 50% a+b=c {x} [y] (z) <w>",
    "word" * 60,
    "supercalifragilisticexpialidocious " * 3,
    "x" * 300,
    "ab" * 200,
    "ａ" * 50,
    "é" * 120,
    "\ufffd replacement \ufffd",
    "\ud800 lone surrogate",
    "Straße STRASSE straße",
    "İstanbul ıi",
    "ǅemal ǆ",
    "ὈΔΥΣΣΕΎΣ",
    " ".join(["lorem ipsum dolor sit amet"] * 400),  # ~10k characters
    "".join(chr(0x4E00 + i) for i in range(2000)),  # long CJK run
]


def _generated(n: int, seed: int) -> list[str]:
    """Caption-like and noisy strings: words, casing, punctuation, numbers, unicode, entities."""
    r = random.Random(seed)
    words = [
        "dog",
        "cat",
        "man",
        "woman",
        "child",
        "car",
        "tree",
        "house",
        "beach",
        "sunset",
        "mountain",
        "river",
        "city",
        "street",
        "bike",
        "red",
        "green",
        "blue",
        "old",
        "new",
        "small",
        "large",
        "happy",
        "vintage",
        "wooden",
        "modern",
        "running",
        "sitting",
        "holding",
        "playing",
        "eating",
        "photo",
        "image",
        "picture",
        "stock",
        "illustration",
        "vector",
        "background",
        "free",
        "shipping",
        "the",
        "a",
        "an",
        "of",
        "on",
        "in",
        "at",
        "with",
        "and",
        "for",
        "near",
        "under",
        "over",
        "by",
    ]
    uni = (
        "é",
        "ü",
        "ñ",
        "ç",
        "ø",
        "å",
        "ß",
        "œ",
        "日",
        "本",
        "猫",
        "ç",
        "İ",
        "Σ",
        "ж",
        "😀",
        "🐶",
        "—",
        "’",
        "“",
        "”",
        "…",
        "\u00a0",
        "\u200b",
        "©",
        "°",
        "€",
        "£",
        "¥",
        "½",
        "ｆ",
    )
    extras = (
        "&amp;",
        "&lt;",
        "&gt;",
        "&quot;",
        "&#39;",
        "&nbsp;",
        "http://x.co/a?b=1&c=2",
        "www.site.com",
        "#tag",
        "@user",
        "...",
        "!!",
        "?",
        "(1)",
        "[2]",
        "1080p",
        "4k",
        "x2",
        "'s",
        "n't",
        "’s",
        "\t",
        "\n",
        "  ",
        " - ",
        "/",
        "|",
        ":",
        ";",
        "*",
        "_",
        "~",
        "`",
    )
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:  # plain caption
            toks = [r.choice(words) for _ in range(r.randint(3, 25))]
        elif kind == 1:  # caption with extras and numbers
            toks = [
                r.choice(words)
                if r.random() < 0.7
                else (r.choice(extras) if r.random() < 0.7 else str(r.randint(0, 99999)))
                for _ in range(r.randint(3, 30))
            ]
        elif kind == 2:  # unicode sprinkled
            toks = [r.choice(words) + (r.choice(uni) if r.random() < 0.4 else "") for _ in range(r.randint(2, 20))]
        elif kind == 3:  # random printable ASCII (whitespace runs, '&', punctuation)
            alphabet = string.ascii_letters + string.digits + string.punctuation + " \t\n\r" * 4
            out.append("".join(r.choice(alphabet) for _ in range(r.randint(0, 120))))
            continue
        else:  # random code points from many scripts, incl. controls and marks
            ranges = [
                (0x20, 0x7E),
                (0xA0, 0x24F),
                (0x300, 0x36F),
                (0x370, 0x3FF),
                (0x400, 0x4FF),
                (0x3040, 0x30FF),
                (0x4E00, 0x4FFF),
                (0xAC00, 0xAD00),
                (0x1F300, 0x1F64F),
                (0x2000, 0x206F),
                (0xFF00, 0xFFEF),
                (0x0, 0x1F),
            ]
            out.append("".join(chr(r.randint(*r.choice(ranges))) for _ in range(r.randint(1, 60))))
            continue
        cap = " ".join(toks)
        if r.random() < 0.3:
            cap = cap.upper() if r.random() < 0.3 else cap.capitalize()
        out.append(cap)
    return out


CORPUS = HAND + _generated(1200, seed=0) + synthetic_captions(100, seed=5)


def test_corpus_is_big_and_varied():
    assert len(CORPUS) >= 1000
    assert any(len(c) >= 10_000 for c in CORPUS)
    assert sum(not c.isascii() for c in CORPUS) > 300


# ----------------------------------------------------------------------------- CLIP BPE


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@pytest.mark.parametrize("ctx", [77, 16, 8])
def test_bpe_truncation_matches_open_clip(open_clip_tokenizer, ctx):
    ours = T.Tokenizer("clip_bpe", ctx, "truncate")(CORPUS)
    ref = open_clip_tokenizer(CORPUS, context_length=ctx)
    bad = [CORPUS[i][:60] for i in range(len(CORPUS)) if not torch.equal(ours[i], ref[i])]
    assert not bad, f"{len(bad)} captions differ, e.g. {bad[:5]}"
    assert ours.dtype == torch.long and ours.shape == (len(CORPUS), ctx)


def test_ascii_fast_path_is_what_ftfy_and_html_unescape_would_give():
    import html

    import ftfy

    r = random.Random(2)
    alphabet = string.ascii_letters + string.digits + string.punctuation.replace("&", "") + " \t\n\r" * 3
    for _ in range(3000):
        text = "".join(r.choice(alphabet) for _ in range(r.randint(0, 80)))
        slow = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()
        assert T.clean_caption(text) == slow, repr(text)


def test_bpe_row_layout():
    tok = T.Tokenizer("clip_bpe", 8)
    short, long_, empty = tok(["a dog", "one two three four five six seven eight nine", ""]).tolist()
    assert short[0] == SOT and short[3] == EOT and short[4:] == [0] * 4
    assert long_[0] == SOT and long_[-1] == EOT and len(long_) == 8 and EOT not in long_[:-1]
    assert empty == [SOT, EOT] + [0] * 6
    assert tok.vocab_size == 49408 and tok.decode(short) == "a dog"


def test_bpe_long_word_merge_is_the_plain_merge():
    bpe = T._backend("clip_bpe")
    r = random.Random(0)
    for n in (41, 80, 200, 500):
        for alphabet in ("ab", "abcdefgh", string.ascii_lowercase, "éàü日本"):
            word = "".join(r.choice(alphabet) for _ in range(n))
            syms = [bpe.byte_chars[b] for b in word.encode()]
            syms[-1] += "</w>"
            assert bpe._merge_long(list(syms)) == bpe._merge(list(syms)), word[:40]


def test_bpe_long_word_matches_open_clip(open_clip_tokenizer):
    r = random.Random(1)
    words = ["".join(r.choice("abcdefghijklmnop") for _ in range(300)), "na" * 150, "z" * 400]
    for w in words:
        assert T._backend("clip_bpe").encode(w) == open_clip_tokenizer.encode(w)


def test_word_cache_clears_when_full(monkeypatch):
    bpe = T._backend("clip_bpe")
    monkeypatch.setattr(T.ClipBPE, "MAX_CACHE", 5)
    before = bpe.encode("alpha beta gamma delta epsilon zeta eta theta <start_of_text>")
    assert len(bpe.cache) <= 6
    assert bpe.encode("alpha beta gamma delta epsilon zeta eta theta <start_of_text>") == before
    bpe.cache.clear()
    bpe.cache.update(bpe._pinned)


@pytest.mark.parametrize("tk", T.TOKENIZERS)
def test_long_words_are_not_cached(tk):
    """A word over MAX_CACHED_WORD characters (a URL, junk: they never repeat) is encoded each time and
    kept by neither the word nor the syntax-priority cache: distinct junk captions up to the shard
    reader's caption bound would otherwise hold GBs in every loader worker."""
    r = random.Random(2)
    junk = ["".join(r.choice(string.ascii_lowercase) for _ in range(2000)) for _ in range(3)]
    for tok, captions in (
        (T.Tokenizer(tk, 8), junk),  # each junk word encoded
        (T.Tokenizer(tk, 8, "syntax"), [f"a red dog on a mat in the sun {j}" for j in junk]),  # and ranked
    ):
        first = tok(captions)
        assert not any(j in tok.backend.cache or j in T._PRIORITY_CACHE for j in junk)
        assert torch.equal(tok(captions), first)
    assert "dog" in tok.backend.cache and "dog" in T._PRIORITY_CACHE


# ----------------------------------------------------------------------------- WordPiece


@pytest.fixture(scope="module")
def bert_reference():
    import transformers

    ref = transformers.BertTokenizer(vocab_file=T.BERT_VOCAB, do_lower_case=True)

    def encode(texts, ctx):
        rows = torch.zeros(len(texts), ctx, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = ([CLS] + ref.convert_tokens_to_ids(ref.tokenize(t)))[:ctx]
            rows[i, : len(ids)] = torch.tensor(ids)
        return rows

    return encode


def test_bert_vocab_file():
    with open(T.BERT_VOCAB, encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[-1] == "" and len(lines) - 1 == 30522
    assert lines[0] == "[PAD]" and lines[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert lines[30521] == "##～" and lines[1996] == "the"


@pytest.mark.parametrize("ctx", [32, 8])
def test_wordpiece_matches_transformers(bert_reference, ctx):
    corpus = [c for c in CORPUS if "[" not in c]  # BertTokenizer keeps literal "[CLS]" etc. whole
    ours = T.Tokenizer("wordpiece", ctx, "truncate")(corpus)
    ref = bert_reference(corpus, ctx)
    bad = [corpus[i][:60] for i in range(len(corpus)) if not torch.equal(ours[i], ref[i])]
    assert not bad, f"{len(bad)} captions differ, e.g. {bad[:5]}"


def test_wordpiece_row_layout():
    tok = T.Tokenizer("wordpiece", 32)
    row = tok(["Hello world, a DOG!"])[0].tolist()
    assert row[:7] == [CLS, 7592, 2088, 1010, 1037, 3899, 999] and row[7:] == [0] * 25
    assert 102 not in row  # no [SEP]
    assert tok([""])[0].tolist() == [CLS] + [0] * 31
    cut = tok([" ".join(["dog"] * 40)])[0].tolist()
    assert cut == [CLS] + [3899] * 31  # cut: [CLS] + the first 31 pieces
    assert tok.vocab_size == 30522 and tok.decode(row) == "hello world , a dog !"


# ----------------------------------------------------------------------------- reductions


def _content(row, tokenizer):
    row = [i for i in row]
    if tokenizer == "clip_bpe":
        return row[1 : row.index(EOT)]
    while row and row[-1] == 0:
        row.pop()
    return row[1:]


def _is_subsequence(small, big):
    it = iter(big)
    return all(x in it for x in small)


@pytest.mark.parametrize("tk,ctx", [("clip_bpe", 8), ("clip_bpe", 16), ("wordpiece", 8)])
@pytest.mark.parametrize("reduction", ["random", "block"])
def test_random_and_block_masking(tk, ctx, reduction):
    caps = synthetic_captions(50, seed=3) + ["a dog", ""]
    full = T.Tokenizer(tk, 200, "truncate")
    tok = T.Tokenizer(tk, ctx, reduction)
    out = tok(caps, rng=random.Random(7))
    assert out.shape == (len(caps), ctx) and out.dtype == torch.long
    k = tok.content_length
    for cap, row in zip(caps, out.tolist()):
        all_ids = _content(full([cap])[0].tolist(), tk)
        kept = _content(row, tk)
        assert len(kept) == min(k, len(all_ids))
        assert _is_subsequence(kept, all_ids)
        if reduction == "block":
            assert any(all_ids[s : s + len(kept)] == kept for s in range(len(all_ids) - len(kept) + 1))
    # reproducible with a seeded rng, different across seeds, module `random` when rng is None
    assert torch.equal(out, tok(caps, rng=random.Random(7)))
    assert not torch.equal(out, tok(caps, rng=random.Random(8)))
    random.seed(123)
    a = tok(caps)
    random.seed(123)
    assert torch.equal(a, tok(caps))


@pytest.fixture(scope="module")
def counts_files(tmp_path_factory):
    """tokenizer -> a word counts file of alt-text-like captions, split as that tokenizer splits."""
    root = tmp_path_factory.mktemp("counts")
    files = {}
    for tk in T.TOKENIZERS:
        wc = T.WordCounter(tk)
        for cap in synthetic_captions(2000, seed=11):
            wc.add(cap)
        files[tk] = str(root / f"{tk}.json")
        T.write_word_counts(files[tk], wc.result())
    return files


def _tokenizer(tk, ctx, reduction, counts_files, threshold=1e-3):
    """Tokenizer(tk, ctx, reduction), with counts for frequency masking."""
    if reduction != "frequency":
        return T.Tokenizer(tk, ctx, reduction)
    return T.Tokenizer(tk, ctx, reduction, word_counts=counts_files[tk], threshold=threshold)


def test_short_captions_are_not_masked(counts_files):
    for red in T.REDUCTIONS:
        tok = _tokenizer("clip_bpe", 16, red, counts_files)
        assert torch.equal(
            tok(["a dog on a bed"], rng=random.Random(0)), T.Tokenizer("clip_bpe", 16)(["a dog on a bed"])
        )


def test_syntax_priority_table():
    assert T.word_priority("dog") == T.NOUN and T.word_priority("grass") == T.NOUN
    assert T.word_priority("large") == T.ADJ and T.word_priority("green") == T.ADJ
    assert T.word_priority("running") == T.VERB and T.word_priority("is") == T.VERB
    assert T.word_priority("the") == T.OTHER and T.word_priority("on") == T.OTHER
    assert T.word_priority("7") == T.OTHER and T.word_priority("!") == T.OTHER
    assert T.word_priority("zorblaxian") == T.NOUN  # unknown word: a noun, like taggers guess
    assert T.word_priority("glorptly") == T.OTHER  # unknown -ly adverb: suffix rule
    words, suffixes = T.syntax_table()
    assert 30_000 < len(words) < 50_000 and len(suffixes) < 500


# nouns the old table (non-nouns only, suffix rules before the noun default) ranked as
# verbs / adjectives / other, and the COCO class names' head words
NAMED_NOUNS = [
    "morning",
    "evening",
    "spring",
    "wedding",
    "clothing",
    "ceiling",
    "vegetable",
    "plastic",
    "marble",
    "signal",
    "kitten",
    "skateboard",
    "fork",
    "train",
]
with open(os.path.join(T.ASSETS, "coco_classnames.txt")) as _f:
    COCO_CLASSES = [line.strip() for line in _f if line.strip()]


def test_nouns_rank_as_nouns_through_the_shipped_table():
    """The run-time lookup (shipped file, then suffix rules, then the noun default) ranks these as nouns
    for both pre-tokenizers; every vocabulary word is listed, so no suffix rule overrides the tagger."""
    assert len(COCO_CLASSES) == 80
    heads = [name.split()[-1] for name in COCO_CLASSES]
    for word in NAMED_NOUNS + heads:
        assert T.word_priority(word) == T.NOUN, word
        for kind in T.TOKENIZERS:
            assert T._backend(kind).words(word) == [word]
    words, _ = T.syntax_table()
    assert all(w in words for w in NAMED_NOUNS + heads)
    assert words["morning"] == T.NOUN and words["beautiful"] == T.ADJ and words["standing"] == T.VERB


def test_syntax_masking_keeps_the_morning_not_is():
    caption = "there is a very beautiful old wooden house standing quietly by the river in the morning"
    tok = T.Tokenizer("clip_bpe", 8, "syntax")  # 6 content words
    assert tok.decode(tok([caption])[0]).split() == ["beautiful", "old", "wooden", "house", "river", "morning"]
    tok = T.Tokenizer("wordpiece", 8, "syntax")  # 7
    kept = tok.decode(tok([caption])[0]).split()
    assert kept[-3:] == ["house", "river", "morning"] and "quietly" not in kept


def test_syntax_masking_keeps_nouns_first():
    tok = T.Tokenizer("clip_bpe", 6, "syntax")  # 4 content tokens
    kept = tok.decode(tok(["a large brown dog running on the green grass"])[0]).split()
    assert "dog" in kept and "grass" in kept and len(kept) == 4
    assert not {"a", "on", "the", "running"} & set(kept)
    assert kept == sorted(kept, key=["a", "large", "brown", "dog", "running", "on", "the", "green", "grass"].index)
    tok = T.Tokenizer("clip_bpe", 5, "syntax")  # 3 content tokens
    kept = tok.decode(tok(["A man riding a wave on top of a surf board."])[0]).split()
    assert kept[:2] == ["man", "wave"] and len(kept) == 3 and kept[2] in ("top", "surf")
    tok = T.Tokenizer("clip_bpe", 8, "syntax")
    assert tok.decode(tok(["two young girls sitting at a table eating pizza"])[0]).split() == [
        "young",
        "girls",
        "sitting",
        "table",
        "eating",
        "pizza",
    ]
    # a word of several BPE tokens can overflow the row: then it is truncated, EOT last
    tok = T.Tokenizer("clip_bpe", 5, "syntax")
    row = tok(["the skateboarder jumped over photographers"])[0].tolist()
    assert row[0] == SOT and row[-1] == EOT and len(row) == 5


def test_syntax_masking_wordpiece_and_equal_priority_order():
    tok = T.Tokenizer("wordpiece", 5, "syntax")  # [CLS] + 4 words
    assert tok.decode(tok(["a large brown dog running on the green grass"])[0]).split() == [
        "large",
        "brown",
        "dog",
        "grass",
    ]
    # equal priorities keep the earlier words (stable), in sentence order
    assert T.syntax_select(["cat", "dog", "bird", "fish"], 2) == ["cat", "dog"]
    assert T.syntax_select(["the", "a", "cat", "an"], 2) == ["the", "cat"]


# ----------------------------------------------------------------------------- robustness

WEIRD = [
    None,
    0,
    12345,
    3.5,
    b"bytes caption",
    b"\xff\xfe\xfa invalid utf-8 \xc3",
    bytearray(b"dog"),
    "",
    "x" * 10_000,
    " ".join(["word"] * 3000),
    "\x00" * 100,
    "\ud83d",
    ["nested"],
]


@pytest.mark.parametrize("tk", T.TOKENIZERS)
@pytest.mark.parametrize("reduction", T.REDUCTIONS)
def test_weird_inputs_do_not_crash(tk, reduction, counts_files):
    tok = _tokenizer(tk, 8, reduction, counts_files)
    out = tok(WEIRD, rng=random.Random(0))
    assert out.shape == (len(WEIRD), 8)
    empty = out[WEIRD.index("")].tolist()
    assert empty == ([SOT, EOT] + [0] * 6 if tk == "clip_bpe" else [CLS] + [0] * 7)
    assert out[0].tolist() == empty  # None is an empty caption
    assert tok("a dog").shape == (1, 8) and tok(None).shape == (1, 8) and tok(7).shape == (1, 8)
    assert tok([]).shape == (0, 8)
    assert torch.equal(tok(b"a dog"), tok("a dog"))


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match=r"valid: truncate, random, block, syntax"):
        T.Tokenizer("clip_bpe", 16, "shuffle")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        T.Tokenizer("sentencepiece", 16)
    with pytest.raises(ValueError, match="context_length"):
        T.Tokenizer("clip_bpe", 1)
    with pytest.raises(ValueError, match="context_length"):
        factory.get_tokenizer("ViT-B-16-CL16", context_length=0)
    with pytest.raises(ValueError, match="rng must be a random.Random"):
        T.Tokenizer("clip_bpe", 8, "random")(["a dog"], rng=42)
    with pytest.raises(ValueError, match="valid: truncate"):
        factory.get_tokenizer("ViT-B-16-CL16", reduction="nope")
    with pytest.raises(ValueError, match="unknown model"):
        factory.get_tokenizer("ViT-Nope")


# ----------------------------------------------------------------------------- frequency masking

# one token each for both tokenizers (a BPE whole-word entry, a WordPiece vocabulary word); the
# generated corpus holds each FREQUENT word FREQUENT_COUNTS times and each RARE word 5 times
FREQUENT = ("the", "a", "of", "photo", "dog", "on", "in", "red")
FREQUENT_COUNTS = (4000, 2000, 1000, 500, 250, 125, 60, 30)
RARE = ("apple", "bridge", "candle", "desert", "engine", "forest", "garden", "harbor", "island", "jacket", "kettle")
RARE += ("ladder", "mirror", "needle")
T_TEST = 2e-3  # a threshold count of 2e-3 x 8,035 words = 16: every FREQUENT word is above it, every RARE one below


def _generated_counts(tmp_path, tk) -> tuple[str, dict[str, float]]:
    """A corpus of known word counts, counted by WordCounter into a counts file: (its path, word ->
    the survival chance the formula gives, min(1, sqrt(t / f)), from the counts the corpus was made with)."""
    words = [w for w, c in zip(FREQUENT, FREQUENT_COUNTS) for _ in range(c)] + [w for w in RARE for _ in range(5)]
    random.Random(0).shuffle(words)
    wc = T.WordCounter(tk)
    for i in range(0, len(words), 10):
        wc.add(" ".join(words[i : i + 10]))
    counts = wc.result()
    assert counts.total == len(words) == 8035 and counts.captions == 804
    assert counts.counts == {**dict(zip(FREQUENT, FREQUENT_COUNTS)), **dict.fromkeys(RARE, 5)}
    path = str(tmp_path / f"{tk}.json")
    T.write_word_counts(path, counts)
    keep = {w: min(1.0, (T_TEST / (c / len(words))) ** 0.5) for w, c in counts.counts.items()}
    assert all(keep[w] == 1.0 for w in RARE) and all(keep[w] < 0.75 for w in FREQUENT)
    return path, keep


@pytest.mark.parametrize("tk", T.TOKENIZERS)
def test_frequency_masking_keeps_words_at_the_formula_rate(tk, tmp_path):
    """K rare words and one frequent word w, K content slots. The rare words always survive the drop;
    w survives with p = sqrt(t / f(w)) and is then one of K + 1 survivors for K slots, each equally
    likely to be cut: w is kept with probability p K / (K + 1), a rare word with 1 - p / (K + 1)."""
    path, keep = _generated_counts(tmp_path, tk)
    ctx = 8
    tok = T.Tokenizer(tk, ctx, "frequency", word_counts=path, threshold=T_TEST)
    k, n = tok.content_length, 4000
    ids = {w: tok.backend.word_ids(w)[0] for w in FREQUENT + RARE}
    r = random.Random(1)
    for w in FREQUENT:
        caps = []
        for _ in range(n):
            words = r.sample(RARE, k)
            words.insert(r.randrange(k + 1), w)
            caps.append(" ".join(words))
        rows = [_content(row, tk) for row in tok(caps, rng=random.Random(2)).tolist()]
        assert all(len(row) == k for row in rows)  # every row full
        kept = sum(ids[w] in row for row in rows) / n
        rare_kept = sum(len(row) - (ids[w] in row) for row in rows) / (n * k)
        p = keep[w]
        for got, want in ((kept, p * k / (k + 1)), (rare_kept, 1 - p / (k + 1))):
            sd = (want * (1 - want) / n) ** 0.5
            assert abs(got - want) < 5 * sd + 1e-9, (w, p, got, want)


@pytest.mark.parametrize("tk", T.TOKENIZERS)
def test_frequency_masking_keeps_rare_words_and_fills_the_row(tk, tmp_path):
    """3 rare words and the 4 most frequent ones, 6 slots, at t = 6.3e-4 (a word seen 5 times is just
    rare; the 4 frequent ones survive with p = 0.04 to 0.1): the rare words are in every row, and the
    dropped frequent words fill it up, those that came closest to surviving first, so each frequent
    word is kept the less often the more frequent it is."""
    path, _ = _generated_counts(tmp_path, tk)
    ctx = 8 if tk == "clip_bpe" else 7
    tok = T.Tokenizer(tk, ctx, "frequency", word_counts=path, threshold=6.3e-4)
    ids = {w: tok.backend.word_ids(w)[0] for w in FREQUENT + RARE}
    r = random.Random(3)
    caps, rares = [], []
    for _ in range(3000):
        words = r.sample(RARE, 3) + list(FREQUENT[:4])
        r.shuffle(words)
        caps.append(" ".join(words))
        rares.append({ids[w] for w in words if w in RARE})
    rows = [_content(row, tk) for row in tok(caps, rng=random.Random(4)).tolist()]
    assert all(len(row) == 6 and rare <= set(row) for row, rare in zip(rows, rares))
    rate = [sum(ids[w] in row for row in rows) / len(rows) for w in FREQUENT[:4]]
    assert rate == sorted(rate) and rate[-1] - rate[0] > 0.3, rate


def test_frequency_keep_probabilities_are_the_formula():
    counts = T.WordCounts("clip_bpe", total=10_000, captions=100, counts={"a": 900, "dog": 100, "zebra": 1})
    got = counts.keep_probabilities(1e-3)  # f(w) > t for "a" and "dog" only
    assert got == pytest.approx({"a": (1e-3 / 0.09) ** 0.5, "dog": (1e-3 / 0.01) ** 0.5})
    assert counts.keep_probabilities(0.5) == {}


@pytest.mark.parametrize("tk,ctx", [("clip_bpe", 8), ("clip_bpe", 16), ("wordpiece", 8)])
def test_frequency_masking_contract(tk, ctx, counts_files):
    """Like the other reductions: whole words of the caption in their order, a caption that fits kept
    whole, a row full but for less than a word; the same rows for the same rng seed (the loader seeds
    one per batch from seed, epoch and position), other rows for another seed."""
    caps = synthetic_captions(300, seed=3) + ["a dog", "", "word " * 200]
    full = T.Tokenizer(tk, 1000, "truncate")
    tok = _tokenizer(tk, ctx, "frequency", counts_files)
    out = tok(caps, rng=random.Random(7))
    assert out.shape == (len(caps), ctx)
    k = tok.content_length
    masked = 0
    for cap, row in zip(caps, out.tolist()):
        all_ids = _content(full([cap])[0].tolist(), tk)
        kept = _content(row, tk)
        assert _is_subsequence(kept, all_ids)
        if len(all_ids) <= k:
            assert kept == all_ids
        else:
            longest = max(len(tok.backend.word_ids(w)) for w in tok.backend.words(cap))
            assert k - longest < len(kept) <= k
            masked += kept != all_ids[:k]
    assert masked > 100
    assert torch.equal(out, tok(caps, rng=random.Random(7)))
    assert not torch.equal(out, tok(caps, rng=random.Random(8)))
    again = pickle.loads(pickle.dumps(tok))
    assert torch.equal(again(caps, rng=random.Random(7)), out)


def test_frequency_tokenizer_pickles_small(counts_files):
    blob = pickle.dumps(_tokenizer("clip_bpe", 8, "frequency", counts_files))
    assert len(blob) < 1000  # the counts load once per worker process, not through the pipe


def test_word_counter_is_bounded():
    wc = T.WordCounter("clip_bpe", max_words=100)
    for i in range(1000):  # a distinct letter word each time (CLIP BPE splits digits apart)
        wc.add(f"a dog w{''.join(string.ascii_lowercase[int(d)] for d in str(i))} " + "x" * 100)
    assert len(wc.counts) <= 100 and wc.counts["a"] == wc.counts["dog"] == 1000 and wc.floor >= 1
    assert wc.total == 4000 and wc.captions == 1000  # the long junk word counts in the total only
    assert "x" * 100 not in wc.counts


def test_bad_word_counts_are_one_line_errors(tmp_path, counts_files, monkeypatch):
    def refused(path, match, **kw):
        with pytest.raises(ValueError, match=match) as e:
            T.Tokenizer(kw.get("tk", "clip_bpe"), 8, "frequency", word_counts=str(path), threshold=kw.get("t", 1e-3))
        assert "\n" not in str(e.value) and "SECRET" not in str(e.value)

    refused(tmp_path / "nope.json", "No such file")
    refused(tmp_path, "not a regular file")
    (tmp_path / "junk.json").write_text("SECRET stuff\n" * 10)
    refused(tmp_path / "junk.json", "not JSON")
    (tmp_path / "other.json").write_text('{"SECRET": 1}')
    refused(tmp_path / "other.json", "not a word counts file")
    good = {"format": T.COUNTS_FORMAT, "tokenizer": "clip_bpe", "total": 10, "captions": 2, "counts": {"a": 3}}
    for change, match in (
        ({"counts": {"a": -1}}, "positive"),
        ({"counts": {"a": 11}}, "at most the total"),
        ({"total": "10"}, "missing or not counts"),
        ({"tokenizer": "SECRET"}, "unknown tokenizer"),
    ):
        (tmp_path / "c.json").write_text(json.dumps({**good, **change}))
        refused(tmp_path / "c.json", match)
    refused(counts_files["wordpiece"], "count again with --tokenizer clip_bpe")
    refused(counts_files["clip_bpe"], r"threshold t must be in \(0, 1\]", t=0)
    with pytest.raises(ValueError, match="needs a word counts file"):
        T.Tokenizer("clip_bpe", 8, "frequency")
    monkeypatch.setattr(T, "MAX_COUNTS_BYTES", 100)
    refused(counts_files["clip_bpe"], "over 0 MiB")


def test_a_counts_file_changed_after_the_check_is_refused(tmp_path, counts_files):
    path = tmp_path / "c.json"
    path.write_bytes(open(counts_files["clip_bpe"], "rb").read())
    tok = T.Tokenizer("clip_bpe", 8, "frequency", word_counts=str(path), threshold=2e-3)
    T.write_word_counts(str(path), T.WordCounts("clip_bpe", 10, 1, {"dog": 5}))
    with pytest.raises(ValueError, match="changed since it was checked"):
        tok(["a dog"], rng=random.Random(0))


# ----------------------------------------------------------------------------- factory.get_tokenizer


def test_get_tokenizer_serves_every_registered_model():
    names = model.list_models() + sorted(model.MODEL_ALIASES)
    for name in names:
        cfg = model.get_model_config(name).text
        tok = factory.get_tokenizer(name)
        assert (tok.tokenizer, tok.context_length, tok.reduction) == (
            cfg.tokenizer,
            cfg.context_length,
            cfg.reduction,
        ), name
        assert ("Syntax" in name) == (tok.reduction == "syntax"), name
        out = tok(["a diagram", "a dog", "a cat"], rng=random.Random(0))
        assert out.shape == (3, cfg.context_length) and int(out.max()) < cfg.vocab_size, name
        ev = factory.get_tokenizer(name, reduction="truncate")
        assert ev.reduction == "truncate" and ev.context_length == cfg.context_length
    assert factory.get_tokenizer("ViT-H-14-CLIPA").tokenizer == "wordpiece"
    assert factory.get_tokenizer("ViT-L-16-CL8-Syntax-GAP", context_length=32).context_length == 32


def test_tokenizer_pickles_for_data_loader_workers():
    tok = T.Tokenizer("clip_bpe", 8, "syntax")
    blob = pickle.dumps(tok)
    assert len(blob) < 1000  # config only; vocabularies load once per process
    again = pickle.loads(blob)
    caps = synthetic_captions(20, seed=9)
    assert torch.equal(again(caps), tok(caps))
