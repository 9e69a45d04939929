"""Measure the SHIPPED syntax table the way training uses it: the held-out captions
(assets/syntax_heldout_captions.txt, never used to build the table) are split by tokenizer.py's own
pre-tokenizers and every word is ranked by tokenizer.word_priority (the shipped file, then suffix
rules, then the noun default); the reference is a contextual tagger tagging each caption's words in
place (spaCy, run in its throwaway venv through build_syntax_table.py's `tag` command).

    .venv/bin/python assets/measure_syntax_table.py --spacy-python /tmp/spacyvenv/bin/python
    .venv/bin/python assets/measure_syntax_table.py --spacy-python ... --tagger /path/to/en_core_web_md

Prints word agreement (all words and letter words), how often syntax masking would keep the same
words as in-context tags at 4 / 6 / 14 words, and the COCO / ImageNet class words ranked as nouns.
"""

import argparse
import json
import os
import subprocess
import sys
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import build_syntax_table as builder  # noqa: E402  (numpy only at import; spaCy runs in its venv)

import tokenizer  # noqa: E402  (the project's tokenizer: its pre-tokenizers and run-time lookup)

CAPTIONS = os.path.join(HERE, "syntax_heldout_captions.txt")
BUILDER = os.path.join(HERE, "build_syntax_table.py")
NAMES = {tokenizer.NOUN: "noun", tokenizer.ADJ: "adjective", tokenizer.VERB: "verb", tokenizer.OTHER: "other"}


def read_captions(path: str = CAPTIONS) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def contextual(spacy_python: str, tagger: str, word_lists: list[list[str]]) -> list[list[int]]:
    p = subprocess.run(
        [spacy_python, BUILDER, "tag", "--model", tagger],
        input=json.dumps(word_lists),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(p.stdout)


def _kept(prio: list[int], k: int) -> list[int]:
    return sorted(sorted(range(len(prio)), key=prio.__getitem__)[:k])


def measure(captions, kind, spacy_python, tagger, table_file=tokenizer.SYNTAX_TABLE) -> dict:
    backend = tokenizer._backend(kind)
    lists = [backend.words(c) for c in captions]
    ctx = contextual(spacy_python, tagger, lists)
    same = total = same_letters = letters = 0
    kept_same, misses = Counter(), Counter()
    for words, groups in zip(lists, ctx):
        table = [tokenizer.word_priority(w, tokenizer.syntax_table(table_file)) for w in words]
        for w, a, b in zip(words, groups, table):
            same += a == b
            total += 1
            if tokenizer._LETTERS.fullmatch(w):
                same_letters += a == b
                letters += 1
                if a != b:
                    misses[f"{w} ({NAMES[b]}, tagger: {NAMES[a]})"] += 1
        for k in (4, 6, 14):
            kept_same[k] += _kept(groups, k) == _kept(table, k)
    return {
        "captions": len(captions),
        "words": total,
        "agree_words": same / total,
        "letter_words": letters,
        "agree_letter_words": same_letters / letters,
        **{f"same_kept_{k}": kept_same[k] / len(captions) for k in (4, 6, 14)},
        "top_disagreements": [m for m, _ in misses.most_common(15)],
    }


def class_words(table_file=tokenizer.SYNTAX_TABLE) -> dict:
    coco, imagenet = builder.class_head_words()
    out = {}
    for name, words in (("coco", coco), ("imagenet", imagenet)):
        bad = sorted(
            {w for w in words if tokenizer.word_priority(w, tokenizer.syntax_table(table_file)) != tokenizer.NOUN}
        )
        out[name] = {"head_words": len(words), "not_noun": bad}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spacy-python", required=True, help="python of a venv with spaCy (see build_syntax_table.py)")
    p.add_argument("--tagger", default="sm", help="'sm' or a spaCy model directory (e.g. en_core_web_md)")
    p.add_argument("--captions", default=CAPTIONS)
    p.add_argument("--table", default=tokenizer.SYNTAX_TABLE, help="default: the shipped file")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    caps = read_captions(a.captions)
    res = {kind: measure(caps, kind, a.spacy_python, a.tagger, a.table) for kind in tokenizer.TOKENIZERS}
    res["class_words"] = class_words(a.table)
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
    for kind in tokenizer.TOKENIZERS:
        r = res[kind]
        print(
            f"{kind}: {r['captions']} held-out captions, tagger {a.tagger}: words {r['agree_words']:.1%} "
            f"of {r['words']}, letter words {r['agree_letter_words']:.1%} of {r['letter_words']}; "
            f"same kept words at 4 / 6 / 14: {r['same_kept_4']:.0%} / {r['same_kept_6']:.0%} / "
            f"{r['same_kept_14']:.0%}"
        )
        print("  most frequent disagreements: " + ", ".join(r["top_disagreements"]))
    for name, c in res["class_words"].items():
        print(
            f"{name} class head words: {c['head_words'] - len(c['not_noun'])} of {c['head_words']} nouns"
            + (f"; not: {', '.join(c['not_noun'])}" if c["not_noun"] else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
