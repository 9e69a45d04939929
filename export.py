"""Export a CLIPA checkpoint for OpenCLIP, CLIP_benchmark and the Hugging Face Hub.

    python export.py CKPT --to open_clip OUT_DIR/     # the directory OpenCLIP's 'local-dir:' reads
    python export.py CKPT --to open_clip OUT.pt       # or OUT.safetensors: a bare OpenCLIP state dict

A directory holds exactly what `open_clip.create_model_and_transforms('local-dir:DIR')` and
`open_clip.get_tokenizer('local-dir:DIR')` read - open_clip_config.json (architecture and
preprocessing), open_clip_model.safetensors and, for the WordPiece (v2) models, tokenizer.json +
tokenizer_config.json built offline from the shipped bert-base-uncased vocabulary - plus a model
card (README.md: architecture, recipe and stages, samples seen, training FLOPs, results). Uploaded
unchanged, it is what 'hf-hub:ORG/NAME' serves:

    huggingface-cli upload ORG/NAME OUT_DIR .         # then open_clip.create_model_and_transforms('hf-hub:ORG/NAME')
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import warnings

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

import checkpoints
import cli
import factory
import model
import tokenizer

# OpenCLIP 3.3.0 configs with the same weights layout, keyed by (family, vision width, layers, patch,
# text width, layers, embed dim). Their context length (v1: 77) and image size (224) may differ from
# ours: the printed call passes force_context_length / force_image_size then.
OPENCLIP_NAMES = {
    ("v1", 768, 12, 16, 512, 12, 512): "ViT-B-16",
    ("v1", 1024, 24, 16, 768, 12, 768): "ViT-L-16",
    ("v1", 1280, 32, 14, 1024, 24, 1024): "ViT-H-14",
    ("v2", 1024, 24, 14, 768, 12, 768): "ViT-L-14-CLIPA",
    ("v2", 1280, 32, 14, 1024, 24, 1024): "ViT-H-14-CLIPA",
    ("v2", 1664, 48, 14, 1280, 32, 1280): "ViT-bigG-14-CLIPA",
}
WEIGHTS, CONFIG, CARD = "open_clip_model.safetensors", "open_clip_config.json", "README.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
EXPORT_FILES = (CONFIG, *TOKENIZER_FILES, WEIGHTS, CARD)  # everything a directory export may write


def openclip_model_cfg(cfg: model.CLIPConfig) -> dict:
    """The OpenCLIP 3.3 model config (open_clip_config.json's "model_cfg") of this architecture.
    Exact except v1 GAP (mean incl. CLS), which OpenCLIP cannot express (its 'avg' drops CLS)."""
    v, t = cfg.vision, cfg.text
    act = {"act_kwargs": {"approximate": "tanh"}} if cfg.gelu == "tanh" else {}
    vision = dict(
        image_size=v.image_size,
        layers=v.layers,
        width=v.width,
        head_width=v.width // v.heads,
        mlp_ratio=v.mlp_ratio,
        patch_size=v.patch_size,
        no_ln_pre=not v.pre_norm,
        pool_type="tok" if v.pool == "cls" else "avg",
        final_ln_after_pool=v.pool != "cls",
        **act,
    )
    text = dict(
        context_length=t.context_length,
        vocab_size=t.vocab_size,
        width=t.width,
        heads=t.heads,
        layers=t.layers,
        mlp_ratio=t.mlp_ratio,
        no_causal_mask=not t.causal,
        pool_type="argmax" if t.pool == "eot" else "last",
        **act,
    )
    if t.tokenizer == "wordpiece":
        text.update(hf_tokenizer_name="bert-base-uncased", tokenizer_kwargs={"strip_sep_token": True})
    bias = {"init_logit_bias": -10.0} if cfg.loss == "sigmoid" else {}  # OpenCLIP's logit_bias key
    return {"embed_dim": cfg.embed_dim, "vision_cfg": vision, "text_cfg": text, **bias}


def preprocess_cfg(cfg: model.CLIPConfig) -> dict:
    """open_clip_config.json's "preprocess_cfg": eval_zeroshot's preprocessing defaults."""
    return {
        "size": cfg.vision.image_size,
        "mean": list(cfg.image_mean),
        "std": list(cfg.image_std),
        "interpolation": cfg.interpolation,
        "resize_mode": "squash" if cfg.square_resize_only else "shortest",
    }


def openclip_target(cfg: model.CLIPConfig) -> tuple[str | None, dict, list[str]]:
    """(OpenCLIP model name or None, create_model kwargs, caveats) for exported weights."""
    v, t = cfg.vision, cfg.text
    name = OPENCLIP_NAMES.get((cfg.family, v.width, v.layers, v.patch_size, t.width, t.layers, cfg.embed_dim))
    kwargs, notes = {}, []
    if v.pool == "gap_cls":
        notes.append(
            "v1 GAP (mean over all tokens incl. CLS) has no OpenCLIP 3.3 equivalent: OpenCLIP's "
            "'avg' pool (used in the local-dir config) drops CLS, so image features differ"
        )
    if name is None:
        notes.append(
            "no built-in OpenCLIP config has this architecture: export to a directory and load "
            "it with open_clip.create_model('local-dir:DIR')"
        )
        return None, kwargs, notes
    if cfg.family == "v2" and v.image_size == 336:
        name += "-336"
    elif v.image_size != 224:
        kwargs["force_image_size"] = v.image_size
    if t.context_length != (77 if cfg.family == "v1" else 32):
        kwargs["force_context_length"] = t.context_length
    if cfg.gelu == "tanh":
        notes.append(
            f"{name} uses exact GELU where these weights were trained with tanh GELU: features "
            "differ slightly; load the exported directory with 'local-dir:' for the exact model"
        )
    if v.pool != "cls" and cfg.family == "v1":
        notes.append(
            f"{name} pools the CLS token, not GAP: its image features differ from ours; "
            "export to a directory ('local-dir:') for OpenCLIP's GAP"
        )
    return name, kwargs, notes


# ----------------------------------------------------------------------------- tokenizer files


def write_wordpiece_tokenizer(out_dir: str, context_length: int) -> list[str]:
    """tokenizer.json (a Hugging Face `tokenizers` BERT WordPiece pipeline over the shipped
    bert-base-uncased vocabulary: BERT normaliser, lower case, BERT pre-tokenizer, [CLS] .. [SEP]),
    tokenizer_config.json, special_tokens_map.json and vocab.txt: what transformers' AutoTokenizer
    (and so OpenCLIP's HFTokenizer for a 'local-dir:' model) loads, offline. OpenCLIP then strips
    [SEP] (tokenizer_kwargs in the model config): rows are [CLS] + pieces, zero padded, as ours."""
    with open(tokenizer.BERT_VOCAB, encoding="utf-8") as f:
        vocab = {w: i for i, w in enumerate(f.read().split("\n")[:-1])}
    tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    specials = {
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "tokenize_chinese_chars": True,
        "strip_accents": None,
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": True,
        **specials,
    }
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=2)
    shutil.copyfile(tokenizer.BERT_VOCAB, os.path.join(out_dir, "vocab.txt"))
    return list(TOKENIZER_FILES)


# ----------------------------------------------------------------------------- model card


def training_record(ckpt) -> dict:
    """What a checkpoint of train.py records about its training: {} for other files. Keys: preset,
    stages (dicts: the stage fields + samples_seen + train_eflops), samples_seen, train_eflops, step,
    pretrained, evals (the run's metrics.jsonl evaluation records up to this step)."""
    path = checkpoints.resolve_checkpoint(ckpt)
    ckpt_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    state_file = os.path.join(ckpt_dir, "train_state.pt")
    if not os.path.isfile(state_file):
        return {}
    try:  # weights_only: never unpickle code; mmap: the optimizer tensors are not read
        state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
        config = json.loads(state["config"])
        stages, run = config["stages"], config["run"]
        current = [s["name"] for s in stages].index(state["stage_name"])
    except Exception as e:  # noqa: BLE001 - an unreadable train state: a card without the recipe
        warnings.warn(
            f"{state_file} is not a readable train state ({type(e).__name__}); the model card omits the training recipe",
            stacklevel=2,
        )
        return {}
    rec = {"preset": run.get("cfg"), "pretrained": run.get("pretrained"), "step": state.get("step"), "stages": []}
    for i, s in enumerate(stages):
        steps = s["train_num_samples"] // s["batch_size"]
        seen = steps * s["batch_size"] if i < current else state["samples"] if i == current else 0
        cfg = model.get_model_config(
            s["model"],
            image_size=s["image_size"],
            context_length=s["context_length"],
            pos_embed=s["pos_embed"],
            mask=s["mask"],
            mask_ratio=s["mask_ratio"],
        )
        gflops = model.count_flops(cfg, mask_ratio=s["mask_ratio"])["total_gflops"]
        rec["stages"].append(
            dict(
                s,
                samples_seen=seen,
                context_length=cfg.text.context_length,
                text_reduction=s["text_reduction"] or cfg.text.reduction,
                train_eflops=3 * gflops * seen / 1e9,
            )
        )  # forward + backward = 3x
    rec["samples_seen"] = sum(s["samples_seen"] for s in rec["stages"])
    rec["train_eflops"] = sum(s["train_eflops"] for s in rec["stages"])
    metrics = os.path.join(os.path.dirname(ckpt_dir.rstrip(os.sep)), os.pardir, "metrics.jsonl")
    rec["evals"] = []
    if os.path.isfile(metrics):
        with open(metrics, encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if isinstance(r, dict) and "eval_top1" in r and r.get("step", 0) <= (rec["step"] or 0):
                    rec["evals"].append(r)
    return rec


def result_files(ckpt) -> list[str]:
    """eval_zeroshot.py's default result files of a checkpoint (next to it)."""
    path = checkpoints.resolve_checkpoint(ckpt)
    if os.path.isdir(path):
        return sorted(
            glob.glob(os.path.join(path, "zeroshot_*.json")) + glob.glob(os.path.join(path, "retrieval_*.json"))
        )
    stem = os.path.splitext(path)[0]
    return sorted(glob.glob(stem + ".zeroshot_*.json") + glob.glob(stem + ".retrieval_*.json"))


def _results_rows(files: list[str]) -> list[str]:
    rows = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            r = json.load(f)
        name = os.path.basename(str(r.get("dataset") or file).rstrip("/")) or file
        if "top1" in r:
            rows.append(
                f"| {name} | zero-shot classification ({r.get('num_classes')} classes, "
                f"{r.get('n')} images) | top-1 {100 * r['top1']:.2f}%, top-5 {100 * r['top5']:.2f}% |"
            )
        ret = r.get("retrieval") or {}
        if "image_to_text_R@1" in ret:
            rows.append(
                f"| {os.path.basename(str(ret.get('dataset', name)).rstrip('/'))} | retrieval "
                f"({ret.get('images')} images, {ret.get('texts')} captions) | "
                + ", ".join(
                    f"{d} R@{k} {100 * ret[f'{d}_R@{k}']:.2f}%"
                    for d in ("image_to_text", "text_to_image")
                    for k in (1, 5, 10)
                )
                + " |"
            )
    return rows


def model_card(net: model.CLIP, name: str, ckpt=None, results: list[str] = (), notes: list[str] = ()) -> str:
    """README.md of an export directory (Hugging Face model card front matter + markdown)."""
    cfg, v, t = net.cfg, net.cfg.vision, net.cfg.text
    rec = training_record(ckpt) if ckpt else {}
    results = list(results) + [f for f in (result_files(ckpt) if ckpt else []) if f not in results]
    flops = model.count_flops(cfg)
    pools = {"cls": "CLS token", "gap_cls": "mean of all tokens incl. CLS (v1 GAP)", "gap": "mean of patch tokens"}
    lines = [
        "---",
        "library_name: open_clip",
        "pipeline_tag: zero-shot-image-classification",
        "tags: [clip, clipa, zero-shot-image-classification]",
        "---",
        "",
        f"# {name} (CLIPA-{cfg.family})",
        "",
        "A CLIP trained with the CLIPA recipe (pre-training on few image and text tokens, then a short "
        "fine-tune at full length), exported for OpenCLIP by this project's export.py.",
        "",
        "```python",
        "import open_clip",
        "model, _, preprocess = open_clip.create_model_and_transforms('hf-hub:ORG/NAME')  # or 'local-dir:DIR'",
        "tokenizer = open_clip.get_tokenizer('hf-hub:ORG/NAME')",
        "```",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| family | {cfg.family} ({'OpenCLIP layout, exact GELU' if cfg.family == 'v1' else 'BigVision: tanh GELU, no pre-norm'}) |",
        f"| image tower | ViT, patch {v.patch_size}, width {v.width}, {v.layers} layers, {v.heads} heads, "
        f"{v.image_size} px, pooling: {pools[v.pool]} |",
        f"| text tower | {t.tokenizer} (vocab {t.vocab_size}), {t.context_length} tokens, width {t.width}, "
        f"{t.layers} layers, {t.heads} heads, {'causal, pooled at EOT' if t.causal else 'bidirectional, pooled at the last position'} |",
        f"| embedding | {cfg.embed_dim} |",
        f"| parameters | {model.count_parameters(cfg) / 1e6:.1f} M |",
        f"| forward GFLOPs / sample | {flops['total_gflops']:.2f} (image {flops['image_gflops']:.2f}, text "
        f"{flops['text_gflops']:.2f}; 1 multiply-add = 1 FLOP) |",
        f"| preprocessing | {v.image_size} px, {cfg.interpolation}, "
        f"{'square resize' if cfg.square_resize_only else 'resize + center crop'}, mean {list(cfg.image_mean)}, "
        f"std {list(cfg.image_std)} |",
        "",
    ]
    if notes:
        lines += ["Notes: " + " ".join(f"{n}." for n in notes), ""]
    lines += ["## Training", ""]
    if rec:
        lines += [
            f"Preset `{rec['preset']}`"
            + (f", initialised from `{rec['pretrained']}`" if rec["pretrained"] else "")
            + f"; checkpoint of step {rec['step']}: **{rec['samples_seen']:,} samples seen, "
            f"{rec['train_eflops']:.4g} training EFLOPs** (3 x forward FLOPs x samples).",
            "",
            "| stage | model | image px | text tokens (reduction) | image mask | batch | samples planned | "
            "samples seen | EFLOPs |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in rec["stages"]:
            mask = f"{s['mask']} {s['mask_ratio']:.0%}" if s["mask"] != "none" else "-"
            lines.append(
                f"| {s['name']} | {s['model']} | {s['image_size']} | {s['context_length']} "
                f"({s['text_reduction']}) | {mask} | {s['batch_size']} | {s['train_num_samples']:,} | "
                f"{s['samples_seen']:,} | {s['train_eflops']:.4g} |"
            )
        lines.append("")
    else:
        lines += ["Not recorded (the checkpoint carries no train state of this project).", ""]
    rows = _results_rows(results)
    lines += ["## Results", ""]
    if rows or rec.get("evals"):
        lines += ["| data | task | result |", "|---|---|---|", *rows]
        for r in rec.get("evals", [])[-3:]:
            lines.append(
                f"| training-time eval, step {r['step']} ({r.get('stage')}) | zero-shot "
                f"classification ({r.get('eval_n')} images) | top-1 {100 * r['eval_top1']:.2f}%, "
                f"top-5 {100 * r.get('eval_top5', 0):.2f}% |"
            )
    else:
        lines.append("No evaluation recorded (run eval_zeroshot.py on the checkpoint, then export again).")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- export


def is_dir_target(out: str) -> bool:
    """Whether `out` names a directory export: an existing directory or a path ending in '/'."""
    return os.path.isdir(out) or out.endswith(("/", os.sep))


def dir_files(cfg: model.CLIPConfig) -> list[str]:
    """The files a directory export of this architecture writes."""
    return [CONFIG, *(TOKENIZER_FILES if cfg.text.tokenizer == "wordpiece" else ()), WEIGHTS, CARD]


def _names(names: list[str], limit: int = 6) -> str:
    """Some file names, one line whatever they hold."""
    shown = ", ".join(n if n.isprintable() else ascii(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_out_dir(out: str, force: bool) -> list[str]:
    """The entries already in the export directory `out` ([] when it is new). One that holds anything
    is refused without `force` (a user's README.md would be overwritten, an earlier export's files
    left beside the new ones); an export file's name taken by a link or a directory always is.
    Raises ValueError."""
    if not os.path.isdir(out):
        return []
    present = sorted(os.listdir(out))
    where = out.rstrip("/" + os.sep) or out
    if present and not force:
        raise ValueError(
            f"{where} is not empty ({len(present)} entries: {_names(present)}); export into a new or empty "
            "directory, or pass --force to replace the export's files in it"
        )
    for name in EXPORT_FILES:
        path = os.path.join(out, name)
        if os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
            raise ValueError(f"{path} is not a regular file (a link or a directory); move it away first")
    return present


def export_open_clip(net: model.CLIP, out, *, card: str | None = None) -> dict:
    """Write `net` as an OpenCLIP CLIP state dict. `out` ending in .safetensors -> safetensors file;
    an existing directory or a path ending in '/' -> OpenCLIP's 'local-dir:' directory (config,
    weights, tokenizer files for WordPiece models, README.md = `card` or a minimal one); else
    torch.save. A directory loses an earlier export's files that this one does not write (a
    WordPiece tokenizer beside BPE weights would be uploaded with them). Returns what was written,
    what was removed and how OpenCLIP loads it."""
    cfg = net.cfg
    sd = {k: t.detach().contiguous() for k, t in factory.to_openclip_keys(net.state_dict()).items()}
    out = os.fspath(out)
    as_dir = is_dir_target(out)
    files, removed = [], []
    if as_dir:
        os.makedirs(out, exist_ok=True)
        for name in sorted(set(EXPORT_FILES) - set(dir_files(cfg))):
            path = os.path.join(out, name)
            if os.path.isfile(path) and not os.path.islink(path):
                os.remove(path)
                removed.append(name)
        weights = os.path.join(out, WEIGHTS)
        with open(os.path.join(out, CONFIG), "w") as f:
            json.dump({"model_cfg": openclip_model_cfg(cfg), "preprocess_cfg": preprocess_cfg(cfg)}, f, indent=2)
        files.append(CONFIG)
        if cfg.text.tokenizer == "wordpiece":
            files += write_wordpiece_tokenizer(out, cfg.text.context_length)
    else:
        weights = out
    save = checkpoints.save_weights if weights.endswith(".safetensors") else checkpoints.save_state
    checkpoints.atomic_write(weights, lambda tmp: save(sd, tmp))  # never half a file under its name
    name, kwargs, notes = openclip_target(cfg)
    if as_dir:
        with open(os.path.join(out, CARD), "w", encoding="utf-8") as f:
            f.write(card or model_card(net, "CLIPA model", notes=notes))
        files += [WEIGHTS, CARD]
    return {
        "path": weights,
        "dir": out if as_dir else None,
        "files": files,
        "removed": removed,
        "openclip_name": name,
        "kwargs": kwargs,
        "notes": notes,
        "tensors": len(sd),
    }


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = cli.ArgumentParser(
        prog="export.py", description="Export a checkpoint for OpenCLIP / CLIP_benchmark / the Hugging Face Hub."
    )
    p.add_argument("ckpt", help="run dir, checkpoint dir, weights file (ours, OpenCLIP, converted CLIPA-v2)")
    p.add_argument("--to", choices=["open_clip"], required=True)
    p.add_argument("out", help="DIR/ (local-dir / hub layout, with model card) or FILE.pt / FILE.safetensors")
    p.add_argument("--model", help="registry name (needed when the checkpoint records no config)")
    p.add_argument("--name", help="model name in the card (default: the checkpoint's model name)")
    p.add_argument(
        "--results",
        nargs="+",
        default=[],
        metavar="JSON",
        help="eval_zeroshot.py result files for the card (those next to the checkpoint are found)",
    )
    p.add_argument(
        "--force", action="store_true", help="export into a directory that is not empty, replacing the export's files"
    )
    args = p.parse_args(argv)
    parent = os.path.dirname(os.path.abspath(args.out))
    try:
        if not (os.path.isdir(parent) or args.out.endswith(("/", os.sep))):
            raise FileNotFoundError(f"output directory does not exist: {parent}")
        present = check_out_dir(args.out, args.force) if is_dir_target(args.out) else []
        for r in args.results:
            if not os.path.isfile(r):
                raise FileNotFoundError(f"results file not found: {r}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", factory.NonFiniteWeightsWarning)
            net = factory.create_model(args.model, pretrained=args.ckpt)
        name = args.name or args.model or factory.read_metadata(args.ckpt).get("model_name") or "CLIPA model"
    except (ValueError, FileNotFoundError) as err:  # unknown model, missing or unreadable checkpoint
        return cli.usage_error(err)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    _, _, notes = openclip_target(net.cfg)
    card = model_card(net, name, args.ckpt, args.results, notes)
    if present:  # --force: say what goes
        replaced = [f for f in dir_files(net.cfg) if f in present]
        stale = [f for f in EXPORT_FILES if f in present and f not in dir_files(net.cfg)]
        kept = [f for f in present if f not in EXPORT_FILES]
        said = [f"replacing {_names(replaced)}"] if replaced else []
        said += [f"removing {_names(stale)} (an earlier export's, not written by this one)"] if stale else []
        said += [f"keeping {_names(kept)}"] if kept else []
        print(f"warning: --force: in {args.out.rstrip('/' + os.sep)}: {'; '.join(said)}", file=sys.stderr)
    try:
        info = export_open_clip(net, args.out, card=card)
    except OSError as err:  # a full disk, a read-only directory
        print(f"error: the export could not be written ({err})", file=sys.stderr)
        return 1
    print(f"wrote {info['path']} ({info['tensors']} tensors, OpenCLIP CLIP state dict)")
    if info["openclip_name"]:
        kw = "".join(f", {k}={v}" for k, v in info["kwargs"].items())
        print(
            f"OpenCLIP model: {info['openclip_name']}\n  open_clip.create_model("
            f"'{info['openclip_name']}', pretrained='{info['path']}'{kw})"
        )
    if info["dir"]:
        d = info["dir"].rstrip("/")
        print(
            f"wrote {d}/: {', '.join(info['files'])}\n"
            f"exact architecture: open_clip.create_model_and_transforms('local-dir:{d}'), "
            f"open_clip.get_tokenizer('local-dir:{d}')  (CLIP_benchmark: --model local-dir:{d})\n"
            f"to the Hugging Face Hub: huggingface-cli upload ORG/NAME {d} .  (then 'hf-hub:ORG/NAME')"
        )
    else:
        print(
            "for OpenCLIP's exact architecture config (and CLIP_benchmark), export to a directory: "
            "python export.py CKPT --to open_clip DIR/"
        )
    for note in info["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
