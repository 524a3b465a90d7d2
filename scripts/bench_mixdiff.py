"""Benchmark MixDiff's scoring throughput against its query bound, in one run.

MixDiff (`reprolab.methods.ood.mixdiff`) costs a known number of oracle forwards per test sample
(spec robustness_ood_prompting.md §3.5: 1 + P R + M P R with `in_batch` aux, ...). The bound on its
speed is that many forwards of one image through the target at the oracle's batch size. Reported:

  t_img     one oracle image's forward time (median of calls of `max_batch` images, sampled
            before, between and after the timed passes),
  q         oracle queries (image forwards + head evaluations) per scored test sample,
  t_sample  wall time per scored test sample of the whole `trainer.test` pass (data loading,
            the base queries, the mixes, the `in_batch` stream re-reading its images),
  ratio     t_sample / (q * t_img), goal <= 1.2 (the mixing and bookkeeping cost at most 20%),
  ratio_scorer  the same for `MixDiffScorer` alone on targets already in memory.

on zero-shot tiny_clip over `data=shapes_ood` (the first `samples / 2` ID and OOD test images), and
on OpenAI CLIP ViT-B/32 (`model=clip_vit_b32`) when its weights are in the open_clip cache (or any
open_clip architecture at random init with `--arch`, timing only).

    python scripts/bench_mixdiff.py                                 # tiny_clip, headline in_batch
    python scripts/bench_mixdiff.py --aux oracle --m 8 --r 3        # the issue's prototype setting
    python scripts/bench_mixdiff.py --arch ViT-B-32 --device cuda   # random-init ViT-B/32 on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import torch  # noqa: E402

GOAL = 1.2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--aux", default="in_batch", choices=["in_batch", "rand_id", "oracle"])
    p.add_argument("--output", default="logits", choices=["logits", "probs", "label", "embedding"])
    p.add_argument("--base-score", default=None, help="default: entropy (onehot for label)")
    p.add_argument("--n", type=int, default=15)
    p.add_argument("--m", type=int, default=15)
    p.add_argument("--r", type=int, default=7)
    p.add_argument("--p", type=int, default=None, help="rand_id only")
    p.add_argument("--max-batch", type=int, default=512, help="images per oracle call")
    p.add_argument("--samples", type=int, default=60, help="scored targets (half ID, half OOD)")
    p.add_argument("--vit-samples", type=int, default=30, help="targets for ViT-B/32")
    p.add_argument("--arch", default=None, help="also an open_clip arch at random init (timing)")
    p.add_argument("--skip-vit", action="store_true", help="do not try model=clip_vit_b32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="repetitions of the t_img measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.aux == "rand_id" and args.p is None:
        args.p = 14
    if args.base_score is None:
        args.base_score = "onehot" if args.output == "label" else "entropy"
    return args


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(args: argparse.Namespace, model: str, samples: int, tmp: Path):
    from hydra.utils import instantiate

    from reprolab.utils.config import compose_train

    overrides = [
        f"model={model}",
        "data=shapes_ood",
        "method=mixdiff",
        f"seed={args.seed}",
        f"paths.data_dir={tmp}",
        f"data.eval_batch_size={samples // 2}",
        "++data.test_sets=[test,ood_digits]",  # the scored sets only (no shift set to classify)
        f"method.aux={args.aux}",
        f"method.output={args.output}",
        f"method.base_score={args.base_score}",
        f"method.n={args.n}",
        f"method.m={args.m}",
        f"method.r={args.r}",
        f"method.p={'null' if args.p is None else args.p}",
        f"method.max_batch={args.max_batch}",
    ]
    cfg = compose_train(overrides)
    dm = instantiate(cfg.data, _convert_="all")
    return cfg, dm


def oracle_image_times(backbone, dm, args: argparse.Namespace) -> list[float]:
    """Seconds per image of `reps` oracle calls of `max_batch` images each (after a warm-up)."""
    from reprolab.models.blackbox import BlackBox

    size = dm.preprocess.image_size
    bb = BlackBox(backbone, dm.classnames, ["{}"], max_batch=args.max_batch, output=args.output)
    x = torch.randn(args.max_batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    x = x.to(args.device)
    bb(x[:8], phase="test")
    times = []
    for _ in range(args.reps):
        sync(args.device)
        start = time.perf_counter()
        bb(x, phase="test")
        sync(args.device)
        times.append((time.perf_counter() - start) / args.max_batch)
    return times


def measure(args: argparse.Namespace, label: str, model: str, samples: int, backbone=None):
    import tempfile

    import lightning as L
    from hydra.utils import instantiate

    from reprolab.methods.ood.mixdiff import stream_batches

    with tempfile.TemporaryDirectory(prefix="bench_mixdiff_") as tmp:
        cfg, dm = build(args, model, samples, Path(tmp))
        if backbone is None:
            backbone = instantiate(cfg.model)
        backbone = backbone.to(args.device).eval()
        method = instantiate(cfg.method, _convert_="all")(model=backbone, info=dm.info)
        dm.configure(**method.data_requirements())
        dm.setup("test")
        # t_img is sampled before, between and after the two timed passes (median of all), so a
        # machine whose load drifts during the run biases both sides of the ratio alike.
        t_imgs = oracle_image_times(backbone, dm, args)

        trainer = L.Trainer(
            accelerator="gpu" if args.device.startswith("cuda") else "cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            limit_test_batches=1,
        )
        sync(args.device)
        start = time.perf_counter()
        out = trainer.test(method, datamodule=dm, verbose=False)[0]
        sync(args.device)
        wall = time.perf_counter() - start
        extra = method.extra_metrics()
        n = int(extra["test/scored_samples"])
        q = extra["test/queries_per_sample"]
        t_imgs += oracle_image_times(backbone, dm, args)

        # The scorer alone, on the same targets in memory (the oracle side paid once, as above).
        scorer = method.scorer
        oracles, aux = method.references_from(dm)
        x = torch.cat(
            [torch.stack([ds[i]["image"] for i in range(samples // 2)]) for ds in _scored(dm)]
        ).to(args.device)
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))]
        scorer.cost = {"images": 0, "head": 0}
        sizes = stream_batches(len(x), args.n) if args.aux == "in_batch" else [len(x)]
        sync(args.device)
        start = time.perf_counter()
        with torch.no_grad():
            method.set_references(oracles, aux)
            begin = 0
            for size in sizes:
                scorer.score_batch(*scorer.query(x[begin : begin + size]))
                begin += size
        sync(args.device)
        core = time.perf_counter() - start
        q_core = (scorer.cost["images"] + scorer.cost["head"]) / len(x)
        t_imgs += oracle_image_times(backbone, dm, args)
        t_img = statistics.median(t_imgs)

    t_sample, t_core = wall / n, core / len(x)
    return {
        "label": label,
        "model": model,
        "scored_samples": n,
        "t_img_ms": 1e3 * t_img,
        "t_img_ms_min_max": [1e3 * min(t_imgs), 1e3 * max(t_imgs)],
        "queries_per_sample": q,
        "images_per_sample": extra["test/images_per_sample"],
        "t_sample_s": t_sample,
        "bound_s": q * t_img,
        "ratio": t_sample / (q * t_img),
        "ratio_scorer": t_core / (q_core * t_img),
        "meets_goal": t_sample / (q * t_img) <= GOAL,
        "auroc": out.get("test/ood_digits/auroc"),
        "test_wall_s": wall,
    }


def _scored(dm):
    """The transformed ID and OOD test sets, as the data module serves them."""
    return [dm.test_dataloader()[i].dataset for i in range(2)]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    import logging

    import lightning  # noqa: F401  (sets its loggers' levels on import; quieted below)

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "reprolab"):
        logging.getLogger(name).setLevel(logging.ERROR)

    runs = [measure(args, "tiny_clip", "tiny_clip", args.samples)]
    if not args.skip_vit:
        try:
            runs.append(measure(args, "clip_vit_b32", "clip_vit_b32", args.vit_samples))
        except Exception as e:  # weights not cached offline: say so and go on
            while e.__cause__ is not None or e.__context__ is not None:
                e = e.__cause__ or e.__context__
            print(f"clip_vit_b32 skipped: {type(e).__name__}: {str(e).strip()[:300]}")
    if args.arch:
        from reprolab.models.clip import CLIPBackbone

        backbone = CLIPBackbone("bench", args.arch, pretrained=None)
        runs.append(
            measure(args, f"{args.arch} (random init)", "tiny_clip", args.vit_samples, backbone)
        )

    setting = (
        f"aux={args.aux} output={args.output} h={args.base_score} N={args.n} M={args.m} "
        f"R={args.r}" + (f" P={args.p}" if args.p else "")
    )
    print(f"\nMixDiff {setting}, max_batch {args.max_batch}, {args.threads} threads, {args.device}")
    head = f"{'model':<26}{'targets':>8}{'t_img ms':>10}{'q/sample':>10}{'t/sample s':>12}"
    print(head + f"{'bound s':>10}{'ratio':>8}{'scorer':>8}")
    for r in runs:
        print(
            f"{r['label']:<26}{r['scored_samples']:>8}{r['t_img_ms']:>10.3f}"
            f"{r['queries_per_sample']:>10.1f}{r['t_sample_s']:>12.4f}{r['bound_s']:>10.4f}"
            f"{r['ratio']:>8.2f}{r['ratio_scorer']:>8.2f}"
        )
    for r in runs:
        print(
            f"{r['label']}: t_sample / (q * t_img) = {r['ratio']:.2f} (goal <= {GOAL}: "
            f"{'met' if r['meets_goal'] else 'NOT met'}); scorer alone {r['ratio_scorer']:.2f}; "
            f"t_img {r['t_img_ms_min_max'][0]:.3f}-{r['t_img_ms_min_max'][1]:.3f} ms over the run"
        )
    result = {
        "setting": setting,
        "max_batch": args.max_batch,
        "threads": args.threads,
        "device": args.device,
        "torch": torch.__version__,
        "goal": GOAL,
        "runs": runs,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
