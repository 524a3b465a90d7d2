"""Benchmark BlackVIP's cost against the raw oracle and white-box VP, in one run.

Reports, on one backbone and batch size:
  (a) raw oracle forward throughput (images/s),
  (b) BlackVIP training throughput in queried images/s, and its ratio to (a),
  (c) one step with all 2q perturbations in one batched oracle call vs one call per perturbation,
  (d) peak memory of a BlackVIP step vs a white-box VP step (forward + backward through the target).

    python scripts/bench_blackvip.py                                  # tiny_clip, CPU
    python scripts/bench_blackvip.py --arch ViT-B-16 --device cuda    # random-init ViT-B/16 on a GPU

Peak memory of a training step (after a warm-up step) over the memory held before it (model, data), each in a
fresh subprocess: CUDA's max_memory_allocated on a GPU; on the CPU the rise of the peak resident set
(VmHWM, reset through /proc/self/clear_refs), with glibc's mmap threshold pinned so freed blocks
return to the OS. "One by one" BlackVIP decodes and queries one perturbation at a time (the fallback
when all 2q perturbations do not fit in one call).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPSA_KW = {"a": 0.01, "c": 0.01, "alpha": 0.4, "gamma": 0.1, "momentum": 0.9}  # spec §3 defaults


def build(arch: str, device: str, batch: int, encoder: str):
    from reprolab.data.info import ImageClassificationInfo
    from reprolab.methods.prompting.blackvip import BlackVIP
    from reprolab.methods.prompting.vp import VP
    from reprolab.models.clip import CLIPBackbone

    classnames = [f"class {i}" for i in range(10)]
    templates = ["a photo of a {}."]
    backbone = CLIPBackbone("bench", arch, pretrained=None).to(device)
    size = backbone.preprocess.image_size
    coord = {"encoder": encoder, "pretrained": False}
    if encoder == "vit_mae_base":
        coord["src_dim"] = 1568
    info = ImageClassificationInfo(name="bench", classnames=classnames, templates=templates)
    common = dict(name="bench", info=info)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, 10, (batch,), generator=g).to(device)
    return backbone, BlackVIP, VP, coord, common, images, labels


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]  # median


def throughput(args) -> dict:
    backbone, BlackVIP, _, coord, common, images, labels = build(
        args.arch, args.device, args.batch, args.encoder
    )
    method = BlackVIP(
        model=backbone, coordinator=coord, eps=1.0, seed=1, spsa=SPSA_KW, **common
    ).to(args.device)
    method.train()
    oracle = method.oracle
    n_q = method.optimizer.queries_per_step
    stack = images.repeat(n_q, 1, 1, 1)

    t_oracle = timed(lambda: oracle(stack, queries=n_q), args.device, args.repeats)

    def step(batched: bool):
        def run():
            method.batched = batched
            method.prepare_step(images)
            with torch.no_grad():
                if batched:
                    method.optimizer.step(lambda th: method._losses(images, labels, th))
                else:
                    method.optimizer.step(
                        lambda th: method._losses(images, labels, th.unsqueeze(0))[0], batched=False
                    )

        return run

    t_batched = timed(step(True), args.device, args.repeats)
    t_single = timed(step(False), args.device, args.repeats)
    imgs = n_q * args.batch
    return {
        "oracle_images_per_s": imgs / t_oracle,
        "blackvip_images_per_s": imgs / t_batched,
        "blackvip_over_oracle": t_oracle / t_batched,
        "step_batched_s": t_batched,
        "step_one_by_one_s": t_single,
        "one_by_one_over_batched": t_single / t_batched,
        "queries_per_step": n_q,
        "trainable_params": method.coordinator.num_learnable,
    }


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_child(args) -> dict:
    backbone, BlackVIP, VP, coord, common, images, labels = build(
        args.arch, args.device, args.batch, args.encoder
    )
    if args.which.startswith("blackvip"):
        # "blackvip_sequential": one perturbation at a time (decode, prompt, query), the memory
        # fallback; "blackvip": all 2q perturbations decoded and queried in one batched call.
        m = BlackVIP(
            model=backbone,
            coordinator=coord,
            eps=1.0,
            seed=1,
            spsa=SPSA_KW,
            batched=args.which == "blackvip",
            **common,
        )
    else:
        m = VP(model=backbone, **common)
        m.setup("fit")
    m = m.to(args.device).train()

    def one_step():
        if args.which.startswith("blackvip"):
            m.prepare_step(images)
            with torch.no_grad():
                if m.batched:
                    m.optimizer.step(lambda th: m._losses(images, labels, th))
                else:
                    m.optimizer.step(
                        lambda th: m._losses(images, labels, th.unsqueeze(0))[0], batched=False
                    )
        else:
            loss = torch.nn.functional.cross_entropy(m.logits(images), labels)
            loss.backward()

    one_step()  # one-time allocations (kernels, workspaces, autograd engine) stay out of the number
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
    p.add_argument(
        "--arch", default="reprolab-tiny-clip", help="open_clip architecture (random init)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 32 on CPU, 128 on GPU")
    p.add_argument(
        "--encoder",
        default=None,
        help="Coordinator encoder (default: tiny on CPU, vit_mae_base random-init on GPU)",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--memory-child", dest="which", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    args.batch = args.batch or (128 if gpu else 32)
    args.encoder = args.encoder or ("vit_mae_base" if gpu else "tiny")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.which:
        print(json.dumps(memory_child(args)))
        return

    res = {
        "arch": args.arch,
        "device": args.device,
        "batch": args.batch,
        "encoder": args.encoder,
        "threads": torch.get_num_threads(),
    }
    if gpu:
        res["gpu"] = torch.cuda.get_device_name()
    res.update(throughput(args))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed blocks return to the OS
    for which in ("blackvip", "blackvip_sequential", "vp"):
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            which,
            "--arch",
            args.arch,
            "--device",
            args.device,
            "--batch",
            str(args.batch),
            "--encoder",
            args.encoder,
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
        res[f"{which}_peak_mb"] = json.loads(out.stdout.strip().splitlines()[-1])[
            "peak_over_base_mb"
        ]
    res["vp_over_blackvip_memory"] = res["vp_peak_mb"] / max(res["blackvip_peak_mb"], 1e-9)
    res["vp_over_blackvip_sequential_memory"] = res["vp_peak_mb"] / max(
        res["blackvip_sequential_peak_mb"], 1e-9
    )

    rows = [
        ("(a) oracle forward", f"{res['oracle_images_per_s']:.0f} images/s"),
        (
            "(b) BlackVIP training",
            f"{res['blackvip_images_per_s']:.0f} queried images/s "
            f"= {res['blackvip_over_oracle']:.2f} x oracle",
        ),
        ("(c) one step, batched", f"{res['step_batched_s'] * 1e3:.1f} ms"),
        (
            "    one step, one by one",
            f"{res['step_one_by_one_s'] * 1e3:.1f} ms "
            f"= {res['one_by_one_over_batched']:.2f} x batched",
        ),
        ("(d) peak memory, white-box VP step", f"{res['vp_peak_mb']:.1f} MB"),
        (
            "    BlackVIP step, batched",
            f"{res['blackvip_peak_mb']:.1f} MB (VP / this = {res['vp_over_blackvip_memory']:.2f})",
        ),
        (
            "    BlackVIP step, one by one",
            f"{res['blackvip_sequential_peak_mb']:.1f} MB "
            f"(VP / this = {res['vp_over_blackvip_sequential_memory']:.2f})",
        ),
    ]
    print(
        f"BlackVIP bench: {args.arch} (random init) on {res.get('gpu', args.device)}, batch "
        f"{args.batch}, encoder {args.encoder}, {res['queries_per_step']} queries/step, "
        f"{res['trainable_params']} trainable params, torch threads {res['threads']}"
    )
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
