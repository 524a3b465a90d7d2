"""Benchmark robust fine-tuning steps (FT, FLYP, CaRot), in one run.

Reports, on one backbone and batch size:
  (a) a FLYP training step run by the framework (Lightning, `reprolab.methods.finetuning.flyp.FLYP`)
      vs the same step written as a plain PyTorch loop (same model, captions, ClipLoss, AdamW and
      schedule): plain time / framework time (goal >= 0.9);
  (b) a CaRot step over a FLYP step, both in the framework (the EMA teacher adds one no-grad forward
      of both towers, plus the orthogonality terms; goal <= 1.4);
  (c) peak memory of an FT, a FLYP and a CaRot step over the memory held before it, each in a fresh
      subprocess (CUDA's max_memory_allocated, or on the CPU the rise of the peak resident set; the
      method of scripts/bench_blackvip.py).

    python scripts/bench_finetune.py                                  # tiny_clip, CPU
    python scripts/bench_finetune.py --arch ViT-B-16 --device cuda    # random-init ViT-B/16 on a GPU

Data are random images held on the device, so the numbers are the steps' own cost. Timings are the
median over `--steps` steps after `--warmup` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_blackvip import _rss_kib  # noqa: E402

TEMPLATES = ["a photo of a {}.", "a {}.", "an image of a {}.", "a drawing of a {}."]
CLASSES = [f"class {i}" for i in range(10)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(method: str, args):
    """A method on a random-init backbone, and one batch on the device."""
    from reprolab.data.info import ImageClassificationInfo, TestSet
    from reprolab.methods.finetuning.carot import CaRot
    from reprolab.methods.finetuning.flyp import FLYP
    from reprolab.methods.finetuning.ft import FineTune
    from reprolab.models.clip import CLIPBackbone
    from reprolab.optim.schedules import cosine_lr

    torch.manual_seed(0)
    trainable = "image" if method == "ft" else "both"
    backbone = CLIPBackbone("bench", args.arch, pretrained=None, trainable=trainable)
    info = ImageClassificationInfo(
        name="bench",
        classnames=tuple(CLASSES),
        templates=tuple(TEMPLATES),
        test_sets=(TestSet("test", "id"),),
    )
    opt = _adamw()
    sched = _partial(cosine_lr, warmup_steps=1, total_steps=10_000)
    cls = {"ft": FineTune, "flyp": FLYP, "carot": CaRot}[method]
    m = cls(name=method, model=backbone, info=info, optimizer=opt, scheduler=sched)
    size = backbone.preprocess.image_size
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(args.batch, 3, size, size, generator=g),
        "label": torch.randint(0, len(CLASSES), (args.batch,), generator=g),
        "template": torch.randint(0, len(TEMPLATES), (args.batch,), generator=g),
    }
    return m, {k: v.to(args.device) for k, v in batch.items()}


def _adamw():
    return _partial(torch.optim.AdamW, lr=1e-5, weight_decay=0.1)


def _partial(fn, **kw):
    import functools

    return functools.partial(fn, **kw)


class _Loader:
    """The same on-device batch, `n` times (a DataLoader would time the data, not the step)."""

    def __init__(self, batch, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self):
        return iter([self.batch] * self.n)

    def __len__(self) -> int:
        return self.n


def framework_step_times(method: str, args) -> list[float]:
    """Seconds per training step of `method` run by a Lightning Trainer (after warm-up)."""
    import lightning as L

    m, batch = build(method, args)
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, i):
            sync(args.device)
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, out, b, i):
            sync(args.device)
            if i >= args.warmup:
                times.append(time.perf_counter() - self.t)

    trainer = L.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timer()],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(m, train_dataloaders=_Loader(batch, args.warmup + args.steps))
    return times


def plain_step_times(args) -> list[float]:
    """The FLYP step as a plain loop: encode, ClipLoss, backward, AdamW, schedule."""
    from open_clip.loss import ClipLoss

    from reprolab.optim.schedules import cosine_lr

    m, batch = build("flyp", args)
    model = m.backbone.model.to(args.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
    sched = cosine_lr(opt, warmup_steps=1, total_steps=10_000)
    loss_fn = ClipLoss()
    tok = m.backbone.tokenizer
    amp = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    times = []
    for i in range(args.warmup + args.steps):
        sync(args.device)
        t = time.perf_counter()
        captions = [
            TEMPLATES[int(k)].format(CLASSES[int(y)])
            for y, k in zip(batch["label"], batch["template"], strict=True)
        ]
        with torch.autocast(args.device.split(":")[0], dtype=amp, enabled=amp is not None):
            img = torch.nn.functional.normalize(model.encode_image(batch["image"]).float(), dim=-1)
            txt = model.encode_text(tok(captions).to(args.device)).float()
            txt = torch.nn.functional.normalize(txt, dim=-1)
            loss = loss_fn(img, txt, model.logit_scale.exp())
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return times


def memory_child(args) -> dict:
    """Peak memory of one training step of `args.which` over what is held before it."""
    m, batch = build(args.which, args)
    m = m.to(args.device).train()
    m.setup("fit")
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
    m.log = lambda *a, **k: None  # no trainer: logging is a no-op here
    m.log_dict = lambda *a, **k: None

    def one_step():
        loss = m.training_step(batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one_step()  # optimizer state and one-time allocations stay out of the number
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    one_step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kib("VmHWM") * 1024
    return {"peak_over_base_mb": (peak - base) / 2**20, "base_mb": base / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", default="reprolab-tiny-clip", help="open_clip architecture (random)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 32 on CPU, 128 on GPU")
    p.add_argument("--precision", default=None, help="Lightning precision (default 32-true)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--memory-child", dest="which", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    args.batch = args.batch or (128 if gpu else 32)
    args.precision = args.precision or "32-true"
    if args.threads:
        torch.set_num_threads(args.threads)
    from reprolab.models import tiny_clip

    tiny_clip.register()

    if args.which:
        print(json.dumps(memory_child(args)))
        return

    res = {
        "arch": args.arch,
        "device": args.device,
        "batch": args.batch,
        "precision": args.precision,
        "threads": torch.get_num_threads(),
    }
    if gpu:
        res["gpu"] = torch.cuda.get_device_name()
    med = statistics.median
    res["plain_flyp_step_s"] = med(plain_step_times(args))
    res["flyp_step_s"] = med(framework_step_times("flyp", args))
    res["carot_step_s"] = med(framework_step_times("carot", args))
    res["plain_over_framework"] = res["plain_flyp_step_s"] / res["flyp_step_s"]
    res["carot_over_flyp"] = res["carot_step_s"] / res["flyp_step_s"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed blocks return to the OS
    for which in ("ft", "flyp", "carot"):
        cmd = [sys.executable, __file__, "--memory-child", which, "--arch", args.arch]
        cmd += ["--device", args.device, "--batch", str(args.batch)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
        res[f"{which}_peak_mb"] = json.loads(out.stdout.strip().splitlines()[-1])[
            "peak_over_base_mb"
        ]

    rows = [
        (
            "(a) FLYP step, plain loop / framework",
            f"{res['plain_over_framework']:.2f}x ({1e3 * res['plain_flyp_step_s']:.1f} vs "
            f"{1e3 * res['flyp_step_s']:.1f} ms; goal >= 0.9)",
        ),
        (
            "(b) CaRot step / FLYP step",
            f"{res['carot_over_flyp']:.2f}x ({1e3 * res['carot_step_s']:.1f} vs "
            f"{1e3 * res['flyp_step_s']:.1f} ms; goal <= 1.4)",
        ),
        (
            "(c) peak memory over the resident model",
            f"FT {res['ft_peak_mb']:.1f} MB, FLYP {res['flyp_peak_mb']:.1f} MB, "
            f"CaRot {res['carot_peak_mb']:.1f} MB",
        ),
    ]
    where = res.get("gpu") or f"{res['threads']} threads"
    print(
        f"{args.arch} on {args.device} ({where}), batch {args.batch}, {args.precision}, "
        f"median of {args.steps} steps"
    )
    for k, v in rows:
        print(f"  {k:42s} {v}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
