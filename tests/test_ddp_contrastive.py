"""Under DDP (two CPU processes, gloo) FLYP's contrastive loss and CaRot's distillation term see the
global batch: the mean over ranks equals the single-process value on the same global batch, and so do
the gradients DDP averages (robust_finetuning.md §1.6, pitfalls P17-P18)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reprolab.methods.finetuning.flyp import contrastive_loss, soft_cross_entropy

WORLD, LOCAL, DIM = 2, 4, 6


def _batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x_img, x_txt = (
        torch.randn(WORLD * LOCAL, DIM, generator=g),
        torch.randn(WORLD * LOCAL, DIM, generator=g),
    )
    w = torch.randn(DIM, DIM, generator=g)  # the "encoder" both towers share, as a stand-in
    teacher = torch.randn(DIM, DIM, generator=g)
    return x_img, x_txt, w, teacher


def _losses(x_img, x_txt, w, teacher, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(contrastive loss, distillation term) of this rank's rows, FLYP / CaRot's way."""
    norm = torch.nn.functional.normalize
    img, txt = norm(x_img @ w, dim=-1), norm(x_txt @ w, dim=-1)
    student = contrastive_loss(rank, world)
    per_image, per_text = student.get_logits(img, txt, torch.tensor(10.0))
    mcl = student(img, txt, torch.tensor(10.0))
    with torch.no_grad():
        t_img, t_txt = norm(x_img @ teacher, dim=-1), norm(x_txt @ teacher, dim=-1)
        t_per_image, t_per_text = contrastive_loss(rank, world, with_grad=False).get_logits(
            t_img, t_txt, torch.tensor(5.0)
        )
    sd = soft_cross_entropy(per_image, t_per_image) + soft_cross_entropy(per_text, t_per_text)
    return mcl, sd


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    x_img, x_txt, w, teacher = _batch()
    w = w.clone().requires_grad_(True)
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    mcl, sd = _losses(x_img[rows], x_txt[rows], w, teacher, rank, WORLD)
    (mcl + sd).backward()
    grad = w.grad.clone()
    dist.all_reduce(grad)
    grad /= WORLD  # what DDP does to parameter gradients
    values = torch.stack([mcl.detach(), sd.detach()])
    dist.all_reduce(values)
    if rank == 0:
        torch.save({"values": values / WORLD, "grad": grad}, out)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_losses_and_gradients_equal_the_global_batch(tmp_path: Path) -> None:
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    ddp = torch.load(out)
    x_img, x_txt, w, teacher = _batch()
    w = w.clone().requires_grad_(True)
    mcl, sd = _losses(x_img, x_txt, w, teacher, 0, 1)
    (mcl + sd).backward()
    assert torch.allclose(ddp["values"], torch.stack([mcl, sd]).detach(), atol=1e-6)
    assert torch.allclose(ddp["grad"], w.grad, atol=1e-6)
