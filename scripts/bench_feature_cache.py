"""Benchmark the persistent feature cache (`reprolab.data.feature_cache`): epochs over cached
features vs re-encoding the images every epoch, in one run.

A frozen backbone (the `model=tiny_clip` config) and a train split served by the data config
(`data=group_shapes`, `train_augment=false`) through `ClassificationDataModule`. Every epoch trains
the same linear head (SGD on L2-normalised features, the data module's seeded shuffle), fed by

  (a) re-encode: the train loader + `backbone.encode_image` on every batch (what a method that
      keeps the backbone frozen does today);
  (a') re-encode, `cache_images=true`: the same with the transformed images held in memory;
  (b) cached: epoch 1 builds the cache (`encode_split` + save), epochs 2..E read `FeatureDataset`.

Reports per-epoch times, the ratio (a) median epoch / (b) median epoch after the first (goal >= 20),
a cache hit from disk (what the next method or seed pays), the weights fingerprint time, and the
largest difference between cached and on-the-fly features.

    python scripts/bench_feature_cache.py                          # group_shapes, all 1000 items
    python scripts/bench_feature_cache.py --data shapes --shots 16 --epochs 10 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

GOAL = 20.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="group_shapes", help="a data config (in-memory synthetic)")
    p.add_argument("--model", default="tiny_clip", help="a model config (frozen CLIP backbone)")
    p.add_argument("--shots", default="null", help="data.num_shots (null: the whole train split)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="train batch size")
    p.add_argument("--encode-batch", type=int, default=250, help="batch size of encode_split")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--root", default=None, help="cache root (default: a temporary folder)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first epoch builds the cache)")
    return args


def build(args: argparse.Namespace, cache_images: bool):
    from hydra.utils import instantiate

    from reprolab.utils.config import compose_train

    cfg = compose_train(
        [
            f"model={args.model}",
            f"data={args.data}",
            f"seed={args.seed}",
            f"data.num_shots={args.shots}",
            "data.train_augment=false",
            f"data.batch_size={args.batch_size}",
            f"++data.cache_images={str(cache_images).lower()}",
        ]
    )
    dm = instantiate(cfg.data, _convert_="all")
    return cfg, dm


class Head:
    """The consumer every variant feeds: a linear head on L2-normalised features, one SGD step."""

    def __init__(self, dim: int, classes: int) -> None:
        torch.manual_seed(0)
        self.lin = nn.Linear(dim, classes)
        self.opt = torch.optim.SGD(self.lin.parameters(), lr=0.5)

    def step(self, feats: torch.Tensor, labels: torch.Tensor) -> float:
        loss = F.cross_entropy(self.lin(F.normalize(feats.float(), dim=-1)), labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()


def reencode(backbone, dm, epochs: int, classes: int, dim: int) -> tuple[list[float], dict]:
    """(a): loader + backbone every epoch. Returns epoch times and epoch-1 features by index."""
    loader = dm.train_dataloader()
    head, times, seen = Head(dim, classes), [], {}
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        for batch in loader:
            with torch.no_grad():
                feats = backbone.encode_image(batch["image"])  # (B, D)
            head.step(feats, batch["label"])
            if epoch == 0:
                seen.update(zip(batch["index"].tolist(), feats, strict=True))
        times.append(time.perf_counter() - start)
    return times, seen


def cached(backbone, dm, key, cache, epochs: int, classes: int, dim: int, encode_batch: int):
    """(b): epoch 1 builds the cache, the others read `FeatureDataset`."""
    from reprolab.data.feature_cache import FeatureDataset, encode_split

    head, times = Head(dim, classes), []
    ds = dm.train_dataloader().dataset
    feats = None
    for epoch in range(epochs):
        start = time.perf_counter()
        if feats is None:
            feats = cache.get_or_build(
                key, lambda: encode_split(backbone.encode_image, ds, encode_batch)
            )
            fds = FeatureDataset(feats)
            sampler = dm.train_sampler(fds)
            loader = DataLoader(
                fds,
                batch_size=dm.batch_size,
                sampler=sampler,
                drop_last=dm.drop_last and len(fds) >= dm.batch_size,
            )
        sampler.set_epoch(epoch)
        for batch in loader:
            head.step(batch["features"], batch["label"])
        times.append(time.perf_counter() - start)
    return times, feats


def _must_not_build():
    raise AssertionError("the second get_or_build must be a cache hit")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("reprolab.data.feature_cache").setLevel(logging.INFO)
    from hydra.utils import instantiate

    from reprolab.data.feature_cache import FeatureCache, split_key, state_fingerprint

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench_feature_cache_"))
    try:
        cfg, dm = build(args, cache_images=False)
        backbone = instantiate(cfg.model)
        backbone.eval()
        dm.configure(preprocess=backbone.preprocess)
        dm.setup("fit")
        n = len(dm.train_dataloader().dataset)
        classes = len(dm.classnames)
        dim = int(
            backbone.encode_image(torch.zeros(1, 3, *[dm.preprocess.image_size] * 2)).shape[1]
        )

        start = time.perf_counter()
        weights = state_fingerprint(backbone.model.visual)
        fingerprint_s = time.perf_counter() - start
        key = split_key(dm, "train", cfg.model.name, cfg.model.get("pretrained"), weights)
        cache = FeatureCache(root)
        if cache.path(key).exists():
            cache.path(key).unlink()  # (b) must build in its first epoch

        t_a, seen = reencode(backbone, dm, args.epochs, classes, dim)
        _, dm_mem = build(args, cache_images=True)
        dm_mem.configure(preprocess=backbone.preprocess)
        start = time.perf_counter()
        dm_mem.setup("fit")
        materialize_s = time.perf_counter() - start
        t_mem, _ = reencode(backbone, dm_mem, args.epochs, classes, dim)
        t_b, feats = cached(backbone, dm, key, cache, args.epochs, classes, dim, args.encode_batch)

        start = time.perf_counter()
        hit = FeatureCache(root).get_or_build(key, _must_not_build)
        hit_s = time.perf_counter() - start
        file_bytes = cache.path(key).stat().st_size
        on_the_fly = [(i, int(j)) for i, j in enumerate(feats.index) if int(j) in seen]
        diff = max(float((feats.features[i] - seen[j]).abs().max()) for i, j in on_the_fly)
        assert torch.equal(hit.features, feats.features)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)

    med_a, med_mem, med_b = (statistics.median(t) for t in (t_a, t_mem, t_b[1:]))
    result = {
        "data": args.data,
        "model": args.model,
        "items": n,
        "feature_dim": dim,
        "shots": args.shots,
        "batch_size": dm.batch_size,
        "epochs": args.epochs,
        "threads": args.threads,
        "device": "cpu",
        "torch": torch.__version__,
        "epoch_s": {"reencode": t_a, "reencode_cache_images": t_mem, "cached": t_b},
        "median_epoch_s": {
            "reencode": med_a,
            "reencode_cache_images": med_mem,
            "cached_after_first": med_b,
        },
        "ratio": med_a / med_b,
        "ratio_vs_cache_images": med_mem / med_b,
        "goal": GOAL,
        "meets_goal": med_a / med_b >= GOAL,
        "cache_images_setup_s": materialize_s,
        "first_cached_epoch_s": t_b[0],
        "cache_hit_load_s": hit_s,
        "weights_fingerprint_s": fingerprint_s,
        "max_abs_diff_vs_on_the_fly": diff,
        "cache_file_bytes": file_bytes,
    }
    width = max(len(f"{t:.3f}") for t in t_a + t_mem + t_b) + 1
    rows = [("re-encode", t_a), ("re-encode, cache_images", t_mem), ("cached (1st builds)", t_b)]
    print(
        f"\n{args.model} frozen, {args.data} train ({n} items, D={dim}), batch {dm.batch_size}, "
        f"{args.threads} threads, CPU"
    )
    print(f"{'epoch (s)':<26}" + "".join(f"{e + 1:>{width}}" for e in range(args.epochs)))
    for name, times in rows:
        print(f"{name:<26}" + "".join(f"{t:>{width}.3f}" for t in times))
    print(
        f"ratio re-encode / cached epoch (median, epochs 2..{args.epochs}): {result['ratio']:.1f}x "
        f"(goal >= {GOAL:.0f}x: {'met' if result['meets_goal'] else 'NOT met'}); "
        f"vs cache_images: {result['ratio_vs_cache_images']:.1f}x"
    )
    print(
        f"cache hit from disk {hit_s * 1000:.1f} ms, "
        f"weights fingerprint {fingerprint_s * 1000:.1f} ms, "
        f"cache_images setup {materialize_s:.2f} s, max |cached - on the fly| {diff:.2e}"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
