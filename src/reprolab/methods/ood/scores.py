"""Post-hoc OOD scores of zero-shot CLIP behind a query-only oracle: MSP, MaxLogit, Energy,
Entropy, MCM.

The baselines of MixDiff (Yang et al., "Perturb-and-Compare Approach for Detecting
Out-of-Distribution Samples in Constrained Access Environments", ECAI 2024, arXiv 2408.10107;
robustness_ood_prompting.md §3): the same output-based scores, computed from what a constrained
model returns, with MixDiff's `utilize_mixup=false` (`hy18284/mixdiff: mixup/scripts/baselines/
baselines.sh`):

| score | h(o), larger = more OOD (upstream's direction) | reads |
|---|---|---|
| `msp` (Hendrycks & Gimpel, ICLR 2017) | -max softmax(o) | logits, probs |
| `maxlogit` (Hendrycks et al., ICML 2022) | -max o | logits |
| `energy` (Liu et al., NeurIPS 2020) | -logsumexp(o) / s, s = the logit scale (T = s on scaled logits) | logits |
| `entropy` | H(softmax(o)) | logits, probs |
| `mcm` (Ming et al., NeurIPS 2022) | -max softmax(o / s / T) = -max softmax(cos / T) | logits |
| `onehot` (MixDiff's label-only setting) | 0 (MixDiff adds -<onehot_t, mean onehot_o> / C) | label |

The model is zero-shot CLIP over the ID classes, prompt "This is a photo of a {}" (upstream's
`ClipBackbone.on_eval_start`; `templates: data` uses the data's templates instead), logits =
s · cos. The method never holds the model: a `BlackBox` answers `logits`, `probs`, `label`
(one-hot) or `embedding` (then its `head` gives the logits), spec §3.1.

Score direction: STYLE wants one score per sample with higher = more in-distribution, the MixDiff
code (and `OOD_SCORE_FNS` here) computes OOD-ness, larger = more OOD. `ood_scores` negates it,
once, at the method boundary.

Base class: `ClassificationMethod`, not `FrozenCLIPMethod`. The latter holds the CLIP backbone and
computes image features itself (`image_features`, `class_logits` over any class names); an OOD
scorer in MixDiff's constrained-access setting must not (only the oracle's outputs), and it neither
classifies new classes nor reads cached features. `ClassificationMethod(model=None)` plus a
`BlackBox`, as the zeroth-order black-box methods do, keeps the model out of the method's reach.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from reprolab.data.info import ImageClassificationInfo, TaskInfoError
from reprolab.data.transforms import Preprocess
from reprolab.errors import ConfigValueError
from reprolab.methods.base import ClassificationMethod
from reprolab.models.blackbox import OUTPUTS, BlackBox, Phase
from reprolab.utils.naming import unknown_name

log = logging.getLogger(__name__)

# Upstream's prompt (`mixup/ood_score_calculators/backbones/clip_backbone.py`), no full stop.
UPSTREAM_TEMPLATE = "This is a photo of a {}"
# Upstream normalises with CIFAR statistics, not CLIP's (`ClipBackbone.post_transform_fn`).
CIFAR_MEAN = (0.4913, 0.4821, 0.4465)
CIFAR_STD = (0.2470, 0.2434, 0.2615)

# What each score reads: `kind` is the oracle's answer after the embedding setting's head
# ("logits" for logits and embedding outputs, "probs", "label").
SCORE_KINDS: dict[str, tuple[str, ...]] = {
    "msp": ("logits", "probs"),
    "maxlogit": ("logits",),
    "energy": ("logits",),
    "entropy": ("logits", "probs"),
    "mcm": ("logits",),
    "onehot": ("label",),
}
POST_HOC_SCORES: tuple[str, ...] = ("msp", "maxlogit", "energy", "entropy", "mcm")


def output_kind(output: str) -> str:
    """What a score reads from an oracle answering `output` (`embedding` -> head logits)."""
    return {"logits": "logits", "embedding": "logits", "probs": "probs", "label": "label"}[output]


def _probs(out: Tensor, kind: str) -> Tensor:
    return out.softmax(-1) if kind == "logits" else out


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy (nats) of probability rows, 0 log 0 = 0. (...,)"""
    return torch.special.entr(probs).sum(-1)


def oodness(
    score: str, out: Tensor, kind: str, logit_scale: float = 1.0, temperature: float = 1.0
) -> Tensor:
    """h(o): the OOD-ness of outputs `out` (..., C), larger = more OOD (MixDiff's direction). (...,)

    Args:
        score: one of `SCORE_KINDS`.
        out: logits, probabilities (possibly averages of them) or one-hot rows, per `kind`.
        kind: `logits`, `probs` or `label`.
        logit_scale: s, CLIP's logit scale: energy's temperature and MCM's cos = o / s.
        temperature: MCM's T in softmax(cos / T).
    """
    out = out.float()
    if score == "msp":
        return -_probs(out, kind).max(-1).values
    if score == "maxlogit":
        return -out.max(-1).values
    if score == "energy":
        return -torch.logsumexp(out, -1) / logit_scale  # -(negative energy) at T = s
    if score == "entropy":
        if kind == "logits":
            return -(out.softmax(-1) * out.log_softmax(-1)).sum(-1)
        return entropy(out)
    if score == "mcm":
        return -(out / logit_scale / temperature).softmax(-1).max(-1).values
    if score == "onehot":
        return torch.zeros(out.shape[:-1], dtype=out.dtype, device=out.device)
    raise ValueError(unknown_name("OOD score", score, tuple(SCORE_KINDS)))


def check_score(method: str, score: str, output: str, choices: tuple[str, ...]) -> None:
    """One-line errors for an unknown score or one that cannot read the oracle's `output`."""
    if score not in choices:
        raise ConfigValueError(f"method={method}: {unknown_name('score', score, choices)}.")
    if output not in OUTPUTS:
        raise ConfigValueError(
            f"method={method}: {unknown_name('oracle output', output, OUTPUTS)}."
        )
    kind = output_kind(output)
    if kind not in SCORE_KINDS[score]:
        readers = sorted(s for s, kinds in SCORE_KINDS.items() if kind in kinds and s in choices)
        outputs = sorted(o for o in OUTPUTS if output_kind(o) in SCORE_KINDS[score])
        raise ConfigValueError(
            f"method={method}: score {score} reads {'/'.join(outputs)} outputs, not "
            f"output={output}; use output={outputs[0]} or a score that reads {output} "
            f"({', '.join(readers) or 'none'})."
        )


class PostHocOOD(ClassificationMethod):
    """One output-based OOD score per test sample, through a query-only oracle (nothing trains).

    The ID test set is also classified (accuracy of the zero-shot head as the oracle answers it;
    with `probs` the classification logits are log-probabilities, with `label` the one-hot rows,
    so accuracy is exact and ECE / NLL describe those).

    Args:
        name: method config name.
        model: the target CLIP backbone; wrapped in a `BlackBox` and not kept.
        info: image classification task info with at least one `ood` test set.
        score: `msp`, `maxlogit`, `energy`, `entropy` or `mcm` (module table).
        output: what the oracle answers: `logits` | `probs` | `label` | `embedding` (§3.3).
        temperature: MCM's T (softmax(cos / T)); MCM's paper and MixDiff's code use 1.
        templates: `upstream` ("This is a photo of a {}") or `data` (the data's templates).
        normalize: `upstream` (CIFAR mean / std, as MixDiff's code) or `model` (the backbone's).
        max_batch: images per oracle forward (memory only).
        **kwargs: see `ClassificationMethod`.
    """

    requires = ("classnames",)
    score_choices: ClassVar[tuple[str, ...]] = POST_HOC_SCORES

    def __init__(
        self,
        name: str,
        model: nn.Module | Callable[[Tensor], Tensor] | None = None,
        info: ImageClassificationInfo | None = None,
        score: str = "msp",
        output: str = "logits",
        temperature: float = 1.0,
        templates: str = "upstream",
        normalize: str = "upstream",
        max_batch: int = 512,
        **kwargs: Any,
    ) -> None:
        check_score(name, score, output, self.score_choices)
        if templates not in ("upstream", "data"):
            raise ConfigValueError(
                f'method={name}: templates must be upstream ("{UPSTREAM_TEMPLATE}") or data, '
                f"got {templates!r}."
            )
        if normalize not in ("upstream", "model"):
            raise ConfigValueError(
                f"method={name}: normalize must be upstream (CIFAR mean/std, MixDiff's code) or "
                f"model (the backbone's), got {normalize!r}."
            )
        if not temperature > 0:
            raise ConfigValueError(f"method={name}: temperature must be > 0, got {temperature}.")
        kwargs.pop("ood_score", None)  # the score is `score`; the base's post-hoc table is unused
        super().__init__(name, None, info, **kwargs)
        info = self.info
        if not any(t.role == "ood" for t in info.test_sets):
            sets = ", ".join(f"{t.name} ({t.role})" for t in info.test_sets)
            raise TaskInfoError(
                f"method={name} scores OOD test sets, and data={info.name} has none ({sets}); use "
                "data=shapes_ood or an open-set data config (an `ood` test set)."
            )
        if model is None:
            raise TaskInfoError(f"method={name} needs a target model (cfg.model) for its oracle.")
        if templates == "data":
            info.require(name, "templates")
        self.score = score
        self.output = output
        self.kind = output_kind(output)
        self.temperature = float(temperature)
        self.prompt_templates = list(info.templates) if templates == "data" else [UPSTREAM_TEMPLATE]
        self.preprocess = _preprocess(model, normalize)
        params = getattr(model, "parameters", None)
        self._target_params = sum(p.numel() for p in params()) if callable(params) else 0
        self.oracle = BlackBox(
            model, self.classnames, self.prompt_templates, max_batch=max_batch, output=output
        )
        self._last: tuple[Tensor, Tensor, Tensor] | None = None  # (images, z, outputs)

    # -- the oracle's answers ---------------------------------------------------------------
    def _eval_phase(self) -> Phase:
        trainer = self._trainer
        if trainer is not None and (trainer.validating or trainer.sanity_checking):
            return "val"
        return "test"

    def query(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(z, outputs) of images: z is what MixDiff mixes (the images, or the oracle's
        embeddings), outputs what the scores read (logits, probs, one-hot). ((B, ...), (B, C))"""
        phase = self._eval_phase()
        answer = self.oracle(images, phase=phase)
        if self.output == "embedding":
            return answer, self.oracle.head(answer, phase=phase)
        return images, answer

    def answer(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """`query(images)`, reusing the answer to the same tensor just classified (one query)."""
        if self._last is not None and self._last[0] is images:
            return self._last[1], self._last[2]
        z, out = self.query(images)
        self._last = (images, z, out)
        return z, out

    def logits(self, images: Tensor) -> Tensor:  # (B, C)
        self._last = None
        _, out = self.answer(images)
        if self.kind == "probs":
            return out.clamp_min(torch.finfo(out.dtype).tiny).log()  # softmax(log p) = p
        return out

    def ood_scores(self, logits: Tensor, images: Tensor) -> Tensor:  # (B,)
        _, out = self.answer(images)
        # h is OOD-ness (MixDiff's direction); STYLE's scores are higher = in-distribution.
        return -self.oodness(out)

    def oodness(self, out: Tensor) -> Tensor:
        """h of the oracle's outputs, larger = more OOD. (...,)"""
        return oodness(self.score, out, self.kind, self.oracle.logit_scale, self.temperature)

    # -- the run ----------------------------------------------------------------------------
    def input_preprocess(self) -> Preprocess:
        return self.preprocess

    def extra_parameter_count(self) -> int:
        return self._target_params  # the target model, reachable only through the oracle

    def on_test_start(self) -> None:
        super().on_test_start()
        self.oracle.reset_eval("test")

    def extra_metrics(self) -> dict[str, float]:
        counts = self.oracle.eval_counts["test"]
        out = {"test/queries": float(counts["queries"]), "test/images": float(counts["images"])}
        if self.output == "embedding":
            out["test/head_evals"] = float(self.oracle.head_evals["test"])
        return out

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        return (
            *super().metric_keys(),
            "test/*/fpr95_oodpos",
            "test/queries",
            "test/images",
            "test/head_evals",
        )


def _preprocess(model: Any, normalize: str) -> Preprocess:
    """The backbone's preprocessing, with MixDiff's CIFAR statistics for `normalize=upstream`."""
    pre = getattr(model, "preprocess", None)
    if pre is None:
        raise TaskInfoError(
            f"the target model {type(model).__name__} publishes no `preprocess`; OOD scorers need "
            "a CLIP backbone (cfg.model, e.g. model=tiny_clip)."
        )
    if normalize == "model":
        return pre
    # DEVIATION (as upstream): MixDiff's ClipBackbone normalises with CIFAR-10 statistics instead
    # of CLIP's own (spec §3.3); `normalize: model` uses the backbone's.
    return Preprocess(pre.image_size, CIFAR_MEAN, CIFAR_STD, pre.interpolation)
