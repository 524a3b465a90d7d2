"""Fill the weight caches ahead of a run (compute nodes often have no internet).

    python scripts/download_weights.py ViT-B-16 openai          # an open_clip backbone
    python scripts/download_weights.py --model clip_vit_b16     # the same, by model config name
    python scripts/download_weights.py --model timm_resnet50    # a timm backbone, by model config name
    python scripts/download_weights.py --timm resnet50.a1_in1k  # a timm model by name.tag
    python scripts/download_weights.py --hf bert-base-uncased   # a Hugging Face model + tokenizer
    python scripts/download_weights.py --model bert_base        # the same, by model config name
    python scripts/download_weights.py --coordinator            # BlackVIP's MAE ViT-B/16 encoder (timm)
    python scripts/download_weights.py --all                    # every model config + the coordinator

A single positional name that is not an open_clip architecture is a Hugging Face id
(`python scripts/download_weights.py bert-base-uncased`, the form `reprolab.data.tokens` names).

open_clip, the timm and the Hugging Face (BERT) model configs cache under `--cache-dir` (the
`WEIGHTS_ROOT` the configs read) or their defaults; the Coordinator's timm encoders go to the Hugging
Face cache (`HF_HOME`). Then runs with HF_HUB_OFFLINE=1 find them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from reprolab.utils.naming import unknown_name

ROOT = Path(__file__).resolve().parents[1]
COORDINATOR_ENCODERS = ["vit_base_patch16_224.mae", "vit_base_patch16_224.orig_in21k"]


def fetch_clip(arch: str, tag: str, cache_dir: str | None) -> None:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        sys.exit(
            f"Unknown tag {arch}/{tag}; available: {open_clip.list_pretrained_tags_by_model(arch)}"
        )
    path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    print(f"{arch}/{tag}: {path}")


def fetch_timm(name: str, cache_dir: str | None) -> None:
    """Download timm `arch[.tag]` weights (timm's default tag without one)."""
    import timm

    from reprolab.models.timm import resolve_pretrained

    try:
        full, _, _ = resolve_pretrained(name, True)
    except ValueError as e:
        sys.exit(str(e))
    timm.create_model(full, pretrained=True, num_classes=0, cache_dir=cache_dir)
    print(f"timm {full}: cached")


def fetch_hf(name: str, cache_dir: str | None) -> None:
    """Download a Hugging Face model and its tokenizer (`bert-base-uncased`) into `cache_dir`."""
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(name, cache_dir=cache_dir)
    AutoTokenizer.from_pretrained(name, cache_dir=cache_dir)
    print(f"Hugging Face {name}: model and tokenizer cached")


def fetch_coordinator() -> None:
    for name in COORDINATOR_ENCODERS:
        fetch_timm(name, None)  # the Coordinator reads the default Hugging Face cache


def model_configs() -> dict[str, tuple[str, str, str]]:
    """`{config name: (library, arch, pretrained)}` of the model configs with downloadable weights
    (library: `open_clip`, `timm` or `hf`)."""
    out = {}
    for p in sorted((ROOT / "configs" / "model").glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
        tag = cfg.get("pretrained")
        if str(cfg.get("_target_", "")).endswith("BertFeaturizer"):
            if isinstance(tag, str) and "$" not in tag:  # null: random init, nothing to fetch
                out[p.stem] = ("hf", tag, tag)
        elif str(cfg.get("_target_", "")).endswith("TimmBackbone"):
            if tag is True:
                out[p.stem] = ("timm", cfg["arch"], cfg["arch"])
            elif isinstance(tag, str) and "/" not in tag and "$" not in tag:
                out[p.stem] = ("timm", cfg["arch"], tag if "." in tag else f"{cfg['arch']}.{tag}")
        elif isinstance(tag, str) and "/" not in tag and "$" not in tag:
            out[p.stem] = ("open_clip", cfg["arch"], tag)
    return out


def positional(arch: str, tag: str | None) -> tuple[str, str, str]:
    """`arch [tag]`: an open_clip backbone, or (one name open_clip does not know) a Hugging Face id."""
    if tag is None:
        import open_clip

        if arch not in open_clip.list_models():
            return ("hf", arch, arch)
    return ("open_clip", arch, tag or "openai")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("arch", nargs="?")
    p.add_argument("tag", nargs="?")
    p.add_argument("--model", help="a configs/model name, e.g. clip_vit_b16")
    p.add_argument("--timm", nargs="+", default=[], metavar="NAME", help="timm arch[.tag] names")
    p.add_argument(
        "--hf", nargs="+", default=[], metavar="ID", help="Hugging Face model ids (+ tokenizers)"
    )
    p.add_argument("--coordinator", action="store_true", help="BlackVIP's timm encoders")
    p.add_argument("--all", action="store_true")
    p.add_argument("--cache-dir", default=os.environ.get("WEIGHTS_ROOT"))
    args = p.parse_args(argv)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        sys.exit("HF_HUB_OFFLINE=1: unset it to download (this script needs the network).")
    known = model_configs()
    todo = [("timm", name, name) for name in args.timm]
    todo += [("hf", name, name) for name in args.hf]
    if args.arch:
        todo.append(positional(args.arch, args.tag))
    if args.model:
        if args.model not in known:
            sys.exit(unknown_name("model config", args.model, known))
        todo.append(known[args.model])
    if args.all:
        todo.extend(known.values())
    for library, arch, tag in todo:
        if library == "timm":
            fetch_timm(tag, args.cache_dir)
        elif library == "hf":
            fetch_hf(tag, args.cache_dir)
        else:
            fetch_clip(arch, tag, args.cache_dir)
    if args.coordinator or args.all:
        fetch_coordinator()
    if not todo and not (args.coordinator or args.all):
        p.print_help()


if __name__ == "__main__":
    main()
