"""tiny_clip: a small open_clip model pretrained on the synthetic captioned world.

The embedded default backbone. It lets every method run offline on a CPU, with zero-shot accuracy far
above chance on the synthetic tasks, while going through exactly the code path of a real open_clip
model (`open_clip.create_model`, the standard CLIP BPE tokenizer, `encode_image` / `encode_text`).
Trained by `scripts/pretrain_tiny_clip.py`; results and the command are in `weights/MODEL_CARD.md`.

Architecture (`weights/reprolab-tiny-clip.json`, registered with open_clip as `reprolab-tiny-clip`):
open_clip's CLIP-ResNet image tower (`ModifiedResNet`: 3-conv stem, one bottleneck block per stage,
width 16, attention pooling) on 64 px inputs; text tower width 128, 3 layers, context 32; joint
embedding 128. OpenAI mean/std, bicubic resize.
# DEVIATION: the brief suggested a small ViT (64 px, patch 8, width 128, 4 layers). Measured on this
# world, it learned shapes and digits ~3x slower per sample than the ResNet tower (supervised probe,
# 200 steps: 14% vs 45%) and at ~3x the cost per step; 1,500 contrastive steps gave only 23%
# zero-shot on `shapes`. Methods here only touch pixels, features and text, so the tower type is free.

Packed weights (`weights/tiny_clip.pt`, format `reprolab-tiny-clip-packed-v1`): a dict with
`state_dict` (every open_clip tensor except `token_embedding.weight`, in fp16), `token_ids` (int64, the
BPE ids the pretraining captions and the downstream prompts use) and `token_rows` (fp16, their
embedding rows). Every other row of the 49,408-row token embedding is zero: the model never saw those
tokens, and storing them would cost ~12 MB. `load_tiny_clip_state` unpacks into a model;
`resolve_checkpoint` writes (once, cached) a plain fp32 open_clip state dict so that
`open_clip.create_model(TINY_CLIP_ARCH, pretrained=<that file>)` works like any local checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

TINY_CLIP_ARCH = "reprolab-tiny-clip"
PACKED_FORMAT = "reprolab-tiny-clip-packed-v1"
_TOKEN_KEY = "token_embedding.weight"


def _weights_dir() -> Path:
    return Path(str(resources.files("reprolab.models").joinpath("weights")))


def config_path() -> Path:
    """The open_clip model config (JSON) of `TINY_CLIP_ARCH`."""
    return _weights_dir() / f"{TINY_CLIP_ARCH}.json"


def weights_path() -> Path:
    """The committed, packed pretrained weights."""
    return _weights_dir() / "tiny_clip.pt"


TINY_CLIP_CFG: dict[str, Any] = json.loads(config_path().read_text(encoding="utf-8"))


def register() -> None:
    """Make `TINY_CLIP_ARCH` known to open_clip (idempotent)."""
    if TINY_CLIP_ARCH not in open_clip.list_models():
        open_clip.add_model_config(config_path())


register()


def describe_vision() -> str:
    """One line describing the image tower of `TINY_CLIP_CFG`."""
    v = TINY_CLIP_CFG["vision_cfg"]
    if isinstance(v["layers"], (list, tuple)):
        return (
            f"CLIP ResNet (open_clip ModifiedResNet), {v['image_size']} px input, width "
            f"{v['width']}, blocks per stage {list(v['layers'])}, attention pooling"
        )
    return (
        f"ViT, {v['image_size']} px input, patch {v['patch_size']}, width {v['width']}, "
        f"{v['layers']} layers"
    )


def preprocess_info() -> dict[str, Any]:
    """Fields of `reprolab.models.clip.Preprocess` for this model."""
    return {
        "image_size": int(TINY_CLIP_CFG["vision_cfg"]["image_size"]),
        "mean": tuple(open_clip.OPENAI_DATASET_MEAN),
        "std": tuple(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
    }


def get_tokenizer() -> Any:
    """The standard CLIP BPE tokenizer, truncating to this model's context length."""
    register()
    return open_clip.get_tokenizer(TINY_CLIP_ARCH)


def pack_state_dict(
    state_dict: dict[str, Tensor], token_ids: Tensor, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Pack a full open_clip state dict: fp16, and only the `token_ids` rows of the token embedding."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64).unique().sort().values
    emb = state_dict[_TOKEN_KEY]
    rest = {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
        for k, v in state_dict.items()
        if k != _TOKEN_KEY
    }
    return {
        "format": PACKED_FORMAT,
        "arch": TINY_CLIP_ARCH,
        "vocab_size": int(emb.shape[0]),
        "state_dict": rest,
        "token_ids": ids,
        "token_rows": emb.detach()[ids].to(torch.float16).contiguous(),
        "meta": dict(meta or {}),
    }


def is_packed(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == PACKED_FORMAT


def unpack_state_dict(packed: dict[str, Any]) -> dict[str, Tensor]:
    """A plain fp32 open_clip state dict from a packed checkpoint (unused token rows are zero)."""
    if not is_packed(packed):
        raise ValueError(f"Not a packed tiny_clip checkpoint (expected format '{PACKED_FORMAT}').")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in packed["state_dict"].items()}
    rows = packed["token_rows"].float()
    emb = torch.zeros(packed["vocab_size"], rows.shape[1])
    emb[packed["token_ids"]] = rows
    sd[_TOKEN_KEY] = emb
    return sd


def load_tiny_clip_state(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a packed (or plain open_clip) tiny_clip checkpoint into `model`, strictly."""
    obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    if is_packed(obj):
        sd = unpack_state_dict(obj)
    else:
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    model.load_state_dict(sd, strict=True)


def resolve_checkpoint(
    path: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """A plain open_clip checkpoint for `open_clip.create_model(TINY_CLIP_ARCH, pretrained=...)`.

    A packed file is unpacked once into `cache_dir` (default: `$REPROLAB_CACHE` or the system temp
    dir), keyed by its content hash; a plain checkpoint is returned unchanged.

    Args:
        path: packed or plain checkpoint; the committed weights when None.
        cache_dir: where to write the unpacked fp32 state dict.
    """
    path = Path(path) if path is not None else weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"tiny_clip weights {path} do not exist. The committed ones live in "
            f"{weights_path()}; rebuild them with `python scripts/pretrain_tiny_clip.py`."
        )
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not is_packed(obj):
        return path
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    root = Path(cache_dir or os.environ.get("REPROLAB_CACHE") or tempfile.gettempdir())
    out = root / "reprolab_tiny_clip" / f"tiny_clip-{digest}.pt"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        torch.save(unpack_state_dict(obj), tmp)
        tmp.replace(out)  # atomic: concurrent runs never read a half-written file
        log.info("Unpacked tiny_clip weights %s -> %s", path, out)
    return out


def create_tiny_clip(
    pretrained: bool | str | os.PathLike[str] = True, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Build tiny_clip through `open_clip.create_model`, in eval mode.

    Args:
        pretrained: True for the committed weights, False for random init, or a checkpoint path
            (packed or plain open_clip).
        device: where to put the model.

    Returns:
        The open_clip model and its preprocessing info (`preprocess_info()`).
    """
    register()
    model = open_clip.create_model(TINY_CLIP_ARCH, pretrained=None, device="cpu")
    if pretrained is not False and pretrained is not None:
        path = weights_path() if pretrained is True else Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(
                f"tiny_clip weights {path} do not exist. Use pretrained=True for the committed "
                "weights or build them with `python scripts/pretrain_tiny_clip.py`."
            )
        load_tiny_clip_state(model, path)
    return model.to(device).eval(), preprocess_info()


def images_to_tensor(images: list[Any], info: dict[str, Any] | None = None) -> Tensor:
    """PIL images or uint8 (B, H, W, 3) arrays -> normalised float tensor (B, 3, S, S)."""
    import numpy as np
    from PIL import Image

    info = info or preprocess_info()
    size = info["image_size"]
    arrs = []
    for im in images:
        if not isinstance(im, np.ndarray):
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            im = np.asarray(im)
        arrs.append(im)
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(info["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(info["std"]).view(1, 3, 1, 1)
    return (x - mean) / std  # (B, 3, S, S)


@torch.no_grad()
def zeroshot_head(model: nn.Module, classnames: list[str], templates: list[str]) -> Tensor:
    """`reprolab.models.clip.zeroshot_head` of a bare open_clip model (CONTRACTS.md). (C, D)"""
    from reprolab.models.clip import zeroshot_head as head

    tok = get_tokenizer()
    return head(lambda texts: model.encode_text(tok(texts)), classnames, templates)


@torch.no_grad()
def encode_split(model: nn.Module, split: Any, batch_size: int = 250) -> tuple[Tensor, Tensor]:
    """Normalised image features (N, D) and labels (N,) of an `ImageSplit`."""
    feats = []
    for start in range(0, len(split), batch_size):
        items = [split[i]["image"] for i in range(start, min(start + batch_size, len(split)))]
        f = model.encode_image(images_to_tensor(items)).float()
        feats.append(torch.nn.functional.normalize(f, dim=-1))
    return torch.cat(feats), torch.tensor(split.labels)


@torch.no_grad()
def zeroshot_accuracy(model: nn.Module, spec: Any, split: str = "test") -> float:
    """Zero-shot top-1 accuracy (%) of `model` on one split of a dataset spec."""
    feats, labels = encode_split(model, spec.load(None, split))
    head = zeroshot_head(model, spec.classnames, spec.templates)
    pred = (feats @ head.t()).argmax(-1)
    return float((pred == labels).float().mean() * 100)


def linear_probe_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    weight_decay: float = 1e-4,
    steps: int = 200,
) -> float:
    """Top-1 accuracy (%) of an L2-regularised logistic regression on frozen features (LBFGS)."""
    torch.manual_seed(0)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    mu, sd = train_feats.mean(0), train_feats.std(0) + 1e-6
    xtr, xte = (train_feats - mu) / sd, (test_feats - mu) / sd
    lin = nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(xtr), train_labels)
        loss = loss + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float((lin(xte).argmax(-1) == test_labels).float().mean() * 100)
