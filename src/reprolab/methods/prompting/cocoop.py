"""CoCoOp: conditional prompt context for a frozen CLIP (prompting_posthoc.md A2).

Zhou, Yang, Loy, Liu, "Conditional Prompt Learning for Vision-Language Models", CVPR 2022, arXiv
2203.05557 (official code `KaiyangZhou/CoOp`, `trainers/cocoop.py`).

CoOp's prompt (class token at the end, one unified context V) plus a meta-net
π = Linear(D → D/16) → ReLU → Linear(D/16 → d_tok) on the normalised image feature u: every context
vector of image x is shifted by the same bias, v_m(x) = v_m + π(u), so each image has its own K
class prompts and logits_i = s · u_i·w_c(x_i). V and π train.

The K prompts of all B images of a step go through the text encoder in one call (B·K sequences),
never a loop over images or classes; that is the memory cost of the method, so before training the
batch is checked against the free memory (`check_batch_fits`), and evaluation runs in chunks of
images that fit (`images_per_call`).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprolab.data.info import ImageClassificationInfo
from reprolab.errors import ConfigValueError
from reprolab.methods.finetuning.source import SourceRun
from reprolab.methods.prompting.coop import CoOp

log = logging.getLogger(__name__)

#: Peak memory of a training step over the activations the text encoder keeps for backward
#: (gradient buffers of the backward pass, allocator slack).
TRAIN_SAFETY = 1.5
#: Share of the free memory an evaluation chunk may use.
EVAL_SHARE = 0.5


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: CUDA free + cached-unused, or available host RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _storage_bytes(fn: Any) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn()` runs."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


class CoCoOp(CoOp):
    """CoCoOp: CoOp's unified end-position context conditioned on each image by a meta-net.

    Args:
        n_ctx: M (4 in the `c4` configs; ignored with `ctx_init`).
        ctx_init: initialise V from these words ("a photo of a", the headline `ctxv1` config).
        zero_init_last: zero π's last layer, so that at init CoCoOp's logits are CoOp's (tests).
        eval_images_per_call: images whose B·K prompts one evaluation call encodes (null: as many as
            fit in half the free memory, see `images_per_call`).
        **kwargs: see `CoOp` (`source`, `cache_image_features`, `optimizer`, `scheduler`, ...).
    """

    logs_text_cos = False  # the prompts depend on the image: no single w_c per class
    source_modules = ("prompt_learner", "meta_net")

    def __init__(
        self,
        name: str,
        model: nn.Module | None = None,
        info: ImageClassificationInfo | None = None,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        zero_init_last: bool = False,
        eval_images_per_call: int | None = None,
        source: Any = None,
        **kwargs: Any,
    ) -> None:
        for key in ("csc", "class_token_position", "kg_weight", "kg_template", "kg_templates"):
            if key in kwargs:
                raise ConfigValueError(
                    f"method={name}: CoCoOp has no `{key}` (its prompt is CoOp's unified context "
                    "with the class token at the end, trained with cross-entropy); remove "
                    f"method.{key}."
                )
        # `source` is loaded below, once the meta-net it also holds exists.
        super().__init__(name, model, info, n_ctx=n_ctx, ctx_init=ctx_init, **kwargs)
        dim = _embed_dim(self.backbone)
        hidden = max(1, dim // 16)
        self.meta_net = nn.Sequential(
            OrderedDict(
                linear1=nn.Linear(dim, hidden),
                relu=nn.ReLU(inplace=True),
                linear2=nn.Linear(hidden, self.backbone.text_width),
            )
        )
        if zero_init_last:
            nn.init.zeros_(self.meta_net.linear2.weight)
            nn.init.zeros_(self.meta_net.linear2.bias)
        self.eval_images_per_call = eval_images_per_call
        self._eval_chunk: int | None = None
        self._bytes_per_sequence: float | None = None
        self._fit_checked = False
        if source is not None:  # read now: a missing run fails before anything is built
            self.source = SourceRun.parse(name, source)
            self.load_source(self.source)

    # -- the conditional prompts ----------------------------------------------------------------
    def conditional_logits(self, u: Tensor, classnames: list[str]) -> Tensor:
        """Logits of normalised image features, all B·K prompts in one text-encoder call. (B, K)"""
        bias = self.meta_net(u)  # (B, d_tok)
        embeds, tokens = self.prompt_learner(self.backbone, classnames, shift=bias)  # (B,K,L,d)
        b, k = embeds.shape[:2]
        w = self.backbone.encode_text_embeddings(embeds.flatten(0, 1), tokens.repeat(b, 1))
        w = F.normalize(w.float(), dim=-1).view(b, k, -1)  # (B, K, D)
        return self.backbone.logit_scale * torch.einsum("bd,bkd->bk", u, w)

    def class_logits(self, features: Tensor, classnames: list[str]) -> Tensor:
        u = F.normalize(features.float(), dim=-1)  # (B, D)
        if torch.is_grad_enabled() or u.shape[0] == 0:
            return self.conditional_logits(u, classnames)
        chunk = self.eval_chunk(len(classnames))
        return torch.cat([self.conditional_logits(p, classnames) for p in u.split(chunk)])

    def loss_terms(self, features: Tensor, labels: Tensor) -> dict[str, Tensor]:
        ce = F.cross_entropy(self.class_logits(features, self.classnames), labels)
        return {"train/ce": ce, "train/loss": ce}

    # -- memory ---------------------------------------------------------------------------------
    def bytes_per_sequence(self) -> float:
        """Activation bytes the text encoder keeps for backward per prompt sequence (measured).

        Measured once on the live model (device, dtype, attention kernel) with saved-tensor hooks:
        the distinct storages saved for 2 sequences minus those for 1 (the weights cancel out).
        """
        if self._bytes_per_sequence is None:
            b = self.backbone
            length, width = b.context_length, b.text_width
            dev = self.prompt_learner.ctx.device
            tokens = b.tokenize(["x"]).to(dev)

            def run(n: int) -> int:
                emb = torch.zeros(n, length, width, device=dev, requires_grad=True)
                return _storage_bytes(lambda: b.encode_text_embeddings(emb, tokens.repeat(n, 1)))

            with torch.enable_grad():
                self._bytes_per_sequence = float(max(run(2) - run(1), 1))
            layers = _text_layers(b)
            log.info(
                "%s: the text encoder keeps %.2f MB per prompt sequence for backward "
                "(= context %d x width %d x layers %d x %.1f bytes)",
                self.name,
                self._bytes_per_sequence / 2**20,
                length,
                width,
                layers,
                self._bytes_per_sequence / (length * width * layers),
            )
        return self._bytes_per_sequence

    def images_per_call(self, num_classes: int, train: bool = True) -> int:
        """Most images whose K prompts fit in one text-encoder call (0 when not even one fits)."""
        per_seq = self.bytes_per_sequence()
        if train:
            need, budget = per_seq * TRAIN_SAFETY, available_memory(self.prompt_learner.ctx.device)
        else:  # inference keeps about one layer's activations (in and out) at a time
            need = 2 * per_seq / _text_layers(self.backbone)
            budget = EVAL_SHARE * available_memory(self.prompt_learner.ctx.device)
        return int(budget // (need * num_classes))

    def check_batch_fits(self, batch_size: int) -> None:
        """Refuse, in one line naming the batch size that fits, a batch whose prompts cannot fit."""
        k = len(self.classnames)
        fits = self.images_per_call(k, train=True)
        if batch_size <= fits:
            return
        gib = self.bytes_per_sequence() * TRAIN_SAFETY * batch_size * k / 2**30
        free = available_memory(self.prompt_learner.ctx.device) / 2**30
        dev = self.prompt_learner.ctx.device
        fix = (
            f"set data.batch_size={fits} (the paper trains with batch 1)"
            if fits >= 1
            else "not even one image fits; use a machine with more memory or fewer classes"
        )
        raise ConfigValueError(
            f"method={self.name}: a batch of {batch_size} images x {k} classes = "
            f"{batch_size * k} prompt sequences needs ~{gib:.2f} GiB of text-encoder activations "
            f"but {free:.2f} GiB is free on {dev}; {fix}."
        )

    def eval_chunk(self, num_classes: int) -> int:
        """Images per evaluation call (`eval_images_per_call`, else what fits; at least 1)."""
        if self.eval_images_per_call:
            return int(self.eval_images_per_call)
        if self._eval_chunk is None:
            ks = [num_classes, len(self.classnames)]
            ks += [len(t.classnames) for t in self.test_specs if t.classnames]
            self._eval_chunk = max(1, self.images_per_call(max(ks), train=False))
        return self._eval_chunk

    def on_fit_start(self) -> None:
        super().on_fit_start()
        batch_size = getattr(getattr(self.trainer, "datamodule", None), "batch_size", None)
        if batch_size is not None:
            self.check_batch_fits(int(batch_size))
            self._fit_checked = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self._fit_checked:  # data without a `batch_size`: check the first batch
            self.check_batch_fits(len(batch["label"]))
            self._fit_checked = True

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._eval_chunk = None

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._eval_chunk = None


def _embed_dim(backbone: Any) -> int:
    """CLIP's joint embedding width D (the meta-net's input)."""
    dim = getattr(backbone.model.visual, "output_dim", None)
    if dim is None:
        with torch.no_grad():
            dim = backbone.encode_text(["x"]).shape[-1]
    return int(dim)


def _text_layers(backbone: Any) -> int:
    """Residual blocks of the text transformer."""
    return len(backbone.model.transformer.resblocks)
