"""NPC: Noisy Prediction Calibration via a generative model (Bae, Shin, Na, Jang, Song & Moon, "From
Noisy Prediction to True Label: Noisy Prediction Calibration via Generative Model", ICML 2022, arXiv
2205.00690; spec robustness_ood_prompting.md §4; official code `BaeHeeSun/NPC` @ 928f4d0).

NPC is a post-processor: a classifier f trained on noisy labels ỹ by any method (a FINISHED run of
this project, `source`) stays frozen; NPC learns p(y | ŷ, x), ŷ = f's prediction, and outputs

    p(y | x) = Σ_l p(ŷ = l | x) · H(x)[l, y],    H(x)[l, :] = (α(x, l) − 1) / Σ (α(x, l) − 1),

with α(x, l) the Dirichlet parameters its encoder infers for the input x and the prediction l.

Fit (one Lightning fit on the train split; the labels ỹ are never read, only f's predictions):

1. KNN prior (`generate_prior.py`): one pass over the training minibatches; in each minibatch and for
   each predicted class c, the single sample whose softmax probability on its predicted class is the
   highest is kept, with its embedding (`prior_features`: f's penultimate `embed`, upstream, or a
   frozen model's features, the black-box variant). `KNeighborsClassifier(10, weights='distance')` on
   these (embedding, c) pairs then predicts, for every training sample, a class ȳ (`knn_mode:
   onehot`) or a probability vector (`proba`).
2. Prior Dirichlet (`train_npc.py: generate_alpha_from_original_proba`): α_prior = ρ·onehot(ȳ) + 1 +
   1/K, or ρ·top-k(p_knn) + 1 + 1/K.
3. CVAE (`library/network.py: CVAE`): encoder α(x, ŷ) = softplus(W_e [φ(x); onehot(ŷ)]) + 1 + 1/K;
   z ~ Dir(α) by upstream's approximate reparameterisation z_k = (u·α_k·Γ(α_k))^{1/α_k}, u ~ U(0, 1),
   not renormalised (`reparam: upstream`; `rsample` = `torch.distributions.Dirichlet.rsample`);
   decoder logits W_d [φ(x); z]; loss = BCE-with-logits(recon, onehot(ŷ)) summed + β·KL, the KL as
   coded (`kl_form: upstream`: Σ_k lnΓ(α_prior,k) − lnΓ(α_k) + (α_k − α_prior,k)·ψ(α_k), a partial
   Dirichlet KL) or the exact KL(Dir(α) ‖ Dir(α_prior)) (`exact`). Adam, lr 1e-3, 10 epochs.
4. φ (`fe_init`): `classifier` (upstream): a trainable copy of f's network up to its embedding, then
   a fresh linear layer to `fe_dim` outputs (K by default: upstream's CNN feature extractors are the
   classifier's network with every layer but the last loaded, so φ is a freshly initialised
   logit-size output; for upstream's ResNet50Pre, whose head reads the ImageNet logits, φ is that
   1000-d output, loaded whole); `imagenet`: the same on the run's own `model` (a separately
   pretrained extractor, the black-box variant).

Inference (`evaluate.py`): H(x) from the K encoder passes, batched as one (B·K) tensor.

The classifier run is read at build time (`load_classifier`): a missing or unfinished run, one on
other data (the data name, and every data key but the loader ones, `LOADER_KEYS`) or a checkpoint
that does not match its config fails in one line naming `python train.py experiment=<e> seed=<s>`.

Logged: `test/acc` etc. of the corrected prediction (the classification routine, on log p(y|x)),
`test/acc_before` (f's own accuracy on the same test set), `test/npc_gain` (the difference), the same
per test set as `test/<set>/...`; `train/loss`, `train/recon`, `train/kl` (per sample); `npc/*`:
the prior's diagnostics on the train split (how often ŷ and the KNN class equal the clean label, when
the data carries `clean_label`, and ŷ the noisy one).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from reprolab.errors import ConfigValueError
from reprolab.methods.base import ClassificationMethod
from reprolab.methods.finetuning.source import SourceRun, SourceRunError
from reprolab.methods.group.jtt import ordered_batches, train_split
from reprolab.metrics.projection import project_logits
from reprolab.utils.naming import unknown_name
from reprolab.utils.run_record import METRICS_FILE

log = logging.getLogger(__name__)

KNN_MODES = ("onehot", "proba")
PRIOR_FEATURES = ("classifier", "frozen_backbone")
FE_INITS = ("classifier", "imagenet")
REPARAMS = ("upstream", "rsample")
KL_FORMS = ("upstream", "exact")
CLEAN_UNKNOWN = -1  # `reprolab.data.noisy.CLEAN_UNKNOWN`: a training sample whose y is not known


# -- the KNN prior --------------------------------------------------------------------------------
def most_confident_per_class(probs: Tensor, yhat: Tensor) -> Tensor:
    """Indices, within one minibatch, of the single most confident sample of each predicted class.

    `generate_prior.py`: per predicted class c present in the batch, the sample whose softmax
    probability on its predicted class is the highest (on a tie, the first such sample). Classes in
    increasing order. (C',)

    Args:
        probs: softmax output of the classifier (B, K).
        yhat: its predicted classes (B,).
    """
    conf = probs.gather(1, yhat.view(-1, 1)).squeeze(1)  # (B,)
    out = []
    for c in torch.unique(yhat).tolist():  # sorted
        members = torch.nonzero(yhat == c).squeeze(1)
        out.append(members[torch.argmax(conf[members])])
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.long)


def fit_knn(embeddings: np.ndarray, classes: np.ndarray, k: int = 10) -> Any:
    """`KNeighborsClassifier(n_neighbors=k, weights='distance')` fitted on the kept points.

    # DEVIATION: k is capped at the number of kept points (scikit-learn refuses more neighbours than
    # points; upstream's data always has more than 10).
    """
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=min(int(k), len(classes)), weights="distance")
    return knn.fit(embeddings, classes)


def knn_proba(knn: Any, embeddings: np.ndarray, num_classes: int) -> np.ndarray:
    """`predict_proba` spread over all K classes (classes without a kept point get 0). (N, K)"""
    out = np.zeros((len(embeddings), num_classes))
    out[:, knn.classes_] = knn.predict_proba(embeddings)
    return out


def prior_alpha(
    prior: Tensor, num_classes: int, rho: float, mode: str = "onehot", topk: int | None = 1
) -> Tensor:
    """α_prior of the prior Dirichlet (`train_npc.py: generate_alpha_from_original_proba`). (B, K)

    Args:
        prior: the KNN class ȳ (B,) long (`onehot`) or the KNN probabilities (B, K) (`proba`).
        num_classes: K.
        rho: `prior_norm`, the prior's concentration on the KNN class(es).
        mode: `onehot` (ρ·onehot(ȳ) + 1 + 1/K) or `proba` (ρ·top-k(p) + 1 + 1/K: the k largest
            probabilities kept, the others 0).
        topk: proba mode's k (`--selected_class`, upstream default 1); None = all K. Upstream
            compares the string argument with K, which never matches, so it always takes the top k;
            with k = K that is the whole vector.
    """
    base = 1.0 + 1.0 / num_classes
    if mode == "onehot":
        return F.one_hot(prior.long(), num_classes).to(torch.float32) * rho + base
    p = prior.to(torch.float32)
    k = num_classes if topk is None else int(topk)
    if k < num_classes:
        values, indices = torch.topk(p, k=k, dim=1)
        p = torch.zeros_like(p).scatter(1, indices, values)
    return rho * p + base


# -- the CVAE -------------------------------------------------------------------------------------
def reparameterize_upstream(alpha: Tensor, u: Tensor | None = None) -> Tensor:
    """Upstream's approximate Dirichlet sample: z_k = (u_k·α_k·Γ(α_k))^{1/α_k}, u ~ U(0, 1). (B, K)

    `CVAE.reparameterize`: the small-shape inverse-CDF approximation of a Gamma(α_k, 1) draw, NOT
    renormalised onto the simplex (kept for parity, spec §4.2).
    """
    u = torch.rand_like(alpha) if u is None else u
    return ((torch.log(u * alpha) + torch.lgamma(alpha)) / alpha).exp()


def kl_upstream(alpha: Tensor, alpha_prior: Tensor) -> Tensor:
    """The KL term as coded (`train_npc.py: loss_function`), per sample. (B,)

    Σ_k lnΓ(α_prior,k) − lnΓ(α_k) + (α_k − α_prior,k)·ψ(α_k): KL(Dir(α) ‖ Dir(α_prior)) without the
    lnΓ(Σα) − lnΓ(Σα_prior) and −ψ(Σα)·Σ(α_k − α_prior,k) terms. 0 when α = α_prior.
    """
    return torch.sum(
        torch.lgamma(alpha_prior)
        - torch.lgamma(alpha)
        + (alpha - alpha_prior) * torch.digamma(alpha),
        dim=1,
    )


def kl_exact(alpha: Tensor, alpha_prior: Tensor) -> Tensor:
    """KL(Dir(α) ‖ Dir(α_prior)) in closed form, per sample. (B,)"""
    d = torch.distributions
    return d.kl_divergence(d.Dirichlet(alpha), d.Dirichlet(alpha_prior))


def transition_rows(alpha: Tensor) -> Tensor:
    """H rows: (α − 1) / Σ(α − 1) over the last axis (α > 1 + 1/K, so every entry is positive)."""
    a = alpha - 1.0
    return a / a.sum(dim=-1, keepdim=True)


def calibrate(p_hat: Tensor, h: Tensor) -> Tensor:
    """p(y | x) = Σ_l p(ŷ = l | x) · H(x)[l, y] (`evaluate.py`). (B, K)

    Args:
        p_hat: the classifier's softmax p(ŷ | x) (B, K).
        h: H(x) (B, K, K), row l = p(y | ŷ = l, x).
    """
    return torch.einsum("bl,bly->by", p_hat.to(h.dtype), h)


class Embedding(nn.Module):
    """`module.<fn>(x)` as a module: a classifier's `embed`, a backbone's `encode_image`, or
    `backbone_logits` (a classifier's timm backbone through its own ImageNet classifier: upstream's
    ResNet50Pre feature extractor, whose φ is that 1000-d output).

    A plain wrapper, so that the wrapped method's frozen-part bookkeeping (`frozen_state_prefixes`,
    its `train` override) does not reach the module that owns it: the copy is trained whole.
    """

    def __init__(self, module: nn.Module, fn: str) -> None:
        super().__init__()
        self.inner = module
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        if self.fn == "backbone_logits":
            bb = self.inner.backbone
            return bb.model.get_classifier()(bb.encode_image(x)).float()
        return getattr(self.inner, self.fn)(x).float()


class CVAE(nn.Module):
    """NPC's generative model (`library/network.py: CVAE`).

    φ(x) = `head(base(x))` (`fe_dim` wide); encoder α(x, ŷ) = softplus_β(W_e [φ(x); ŷ]) + 1 + 1/K;
    decoder logits W_d [φ(x); z].

    Args:
        base: the feature network (x -> (B, E)).
        embed_dim: E.
        num_classes: K.
        fe_dim: φ's width (upstream: K for the CNNs); None = K.
        softplus_beta: β of the softplus (upstream `--softplus_beta` 1).
        fresh_head: φ = a fresh Linear(E, fe_dim) on `base` (upstream's CNNs: every layer but the
            last loaded from the classifier); False: φ = `base`'s output itself (upstream's
            ResNet50Pre: its 1000-d ImageNet output, loaded), `fe_dim` = E.
    """

    def __init__(
        self,
        base: nn.Module,
        embed_dim: int,
        num_classes: int,
        fe_dim: int | None = None,
        softplus_beta: float = 1.0,
        fresh_head: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.base = base
        if fresh_head:
            self.fe_dim = int(fe_dim or num_classes)
            self.fe_head: nn.Module = nn.Linear(int(embed_dim), self.fe_dim)
        else:
            self.fe_dim, self.fe_head = int(embed_dim), nn.Identity()
        self.encoder = nn.Linear(self.fe_dim + self.num_classes, self.num_classes)
        self.decoder = nn.Linear(self.fe_dim + self.num_classes, self.num_classes)
        self.softplus = nn.Softplus(beta=float(softplus_beta))

    def features(self, x: Tensor) -> Tensor:
        """φ(x). (B, fe_dim)"""
        return self.fe_head(self.base(x)).float()

    def alpha_of(self, feats: Tensor, yhat_onehot: Tensor) -> Tensor:
        """α(x, ŷ) from φ(x) and onehot(ŷ), in float32 (lgamma / digamma follow). (B, K)"""
        z = self.encoder(torch.cat([feats, yhat_onehot.to(feats.dtype)], dim=1)).float()
        return self.softplus(z) + 1.0 + 1.0 / self.num_classes

    def forward(
        self, x: Tensor, yhat_onehot: Tensor, reparam: str = "upstream"
    ) -> tuple[Tensor, Tensor]:
        """(reconstruction logits of ŷ, α) of a training batch. ((B, K), (B, K))

        Upstream runs the feature extractor once in the encoder and once more in the decoder (two
        dropout masks, two BatchNorm updates in train mode); kept.
        """
        alpha = self.alpha_of(self.features(x), yhat_onehot)
        z = (
            reparameterize_upstream(alpha)
            if reparam == "upstream"
            else (torch.distributions.Dirichlet(alpha).rsample())
        )
        recon = self.decoder(torch.cat([self.features(x), z.to(alpha.dtype)], dim=1))
        return recon.float(), alpha

    def transition(self, x: Tensor) -> Tensor:
        """H(x): row l = (α(x, l) − 1) / Σ(α(x, l) − 1), the K encoder passes as one (B·K) batch.

        (B, K, K)
        """
        feats = self.features(x)  # (B, F)
        b, k = feats.shape[0], self.num_classes
        eye = torch.eye(k, device=feats.device, dtype=feats.dtype)
        alpha = self.alpha_of(feats.repeat_interleave(k, dim=0), eye.repeat(b, 1))  # (B·K, K)
        return transition_rows(alpha).view(b, k, k)


def npc_loss(
    recon: Tensor,
    yhat_onehot: Tensor,
    alpha: Tensor,
    alpha_prior: Tensor,
    beta: float = 1.0,
    kl_form: str = "upstream",
) -> tuple[Tensor, Tensor, Tensor]:
    """(recon + β·KL, recon, KL), each summed over the batch (`train_npc.py: loss_function`)."""
    recon_loss = F.binary_cross_entropy_with_logits(
        recon, yhat_onehot.to(recon.dtype), reduction="sum"
    )
    kl = (kl_upstream if kl_form == "upstream" else kl_exact)(alpha, alpha_prior).sum()
    return recon_loss + beta * kl, recon_loss, kl


# -- the source classifier ------------------------------------------------------------------------
#: Data keys that change how the data are served, not which samples and labels they are: a
#: post-processor may differ from its classifier there (upstream's NPC trains on train + val, batch 32
#: on Clothing1M / Food-101N where the classifier had 64, without augmentation, ...).
LOADER_KEYS = frozenset(
    {
        "batch_size",
        "eval_batch_size",
        "num_workers",
        "shuffle_seed",
        "drop_last",
        "cache_images",
        "root",
        "val",
        "val_fraction",
        "train_augment",
        "sampler",
    }  # fmt: skip
)


def data_differences(expected: dict[str, Any], cfg: Any) -> list[str]:
    """`key: theirs != ours` for the data keys (not `LOADER_KEYS`) where the run's resolved `data`
    config (`cfg`, the run's whole config) differs from `expected`; keys it cannot resolve are
    skipped."""
    from omegaconf import OmegaConf

    theirs: dict[str, Any] = {}
    for key in cfg.get("data") or {}:
        try:
            value = OmegaConf.select(cfg, f"data.{key}", throw_on_resolution_failure=True)
        except Exception:  # noqa: BLE001 - an environment-dependent value (paths): not compared
            continue
        theirs[str(key)] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    absent = object()
    return [
        f"data.{k}: {theirs.get(k, 'unset')} != {expected.get(k, 'unset')}"
        for k in sorted(set(expected) | set(theirs))
        if k not in LOADER_KEYS and theirs.get(k, absent) != expected.get(k, absent)
    ]


def load_classifier(
    source: SourceRun, method: str, info: Any, expected_data: dict[str, Any] | None = None
) -> ClassificationMethod:
    """The finished classifier run `source`, rebuilt from its config and checkpoint.

    Checks, each failing in one line that names the command making the run: the run finished
    (`metrics.json`), kept a checkpoint and its `config.yaml`, trained on the same data (the data
    name, and with `expected_data`, this run's resolved `data` config, every key but the
    `LOADER_KEYS`), and its checkpoint matches its config. Its model is built under the run's own
    seed (a frozen, randomly initialised featurizer is then the same one; pretrained weights do not
    depend on it); its method gets this run's task info.
    """
    import hydra
    from omegaconf import OmegaConf

    state = source.load(method, None)  # metrics.json and the checkpoint, or one line
    run_dir = Path(source.run_dir)
    record = json.loads((run_dir / METRICS_FILE).read_text())
    if record.get("data") not in (None, info.name):
        raise SourceRunError(
            f"method={method}: the classifier run {source.run_dir} trained on data="
            f"{record.get('data')}, not data={info.name}; point method.source at a run on this "
            f"data or make one: {source.command()} data={info.name}"
        )
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise SourceRunError(
            f"method={method}: the classifier run {source.run_dir} has no config.yaml to rebuild "
            f"the classifier from; rerun it: {source.command()} on_config_change=replace"
        )
    import reprolab  # noqa: F401  (registers the resolvers the saved config may use)

    cfg = OmegaConf.load(cfg_file)
    diffs = data_differences(expected_data, cfg) if expected_data else []
    if diffs:
        raise SourceRunError(
            f"method={method}: the classifier run {source.run_dir} trained on other data than this "
            f"run ({'; '.join(diffs[:3])}{' ...' if len(diffs) > 3 else ''}); rerun it on this data: "
            f"{source.command()} on_config_change=replace"
        )
    with torch.random.fork_rng():
        torch.manual_seed(int(cfg.get("seed", 0)))
        model = hydra.utils.instantiate(cfg.model) if cfg.get("model") else None
    clf = hydra.utils.instantiate(cfg.method, _convert_="all")(model=model, info=info)
    missing = [fn for fn in ("logits", "embed") if not callable(getattr(clf, fn, None))]
    if missing or not isinstance(clf, ClassificationMethod):
        raise SourceRunError(
            f"method={method} post-processes a classifier with `logits` and `embed`, and the run "
            f"{source.run_dir} is method={cfg.method.get('name')} ({type(clf).__name__}); point "
            "method.source at a run of a noisy-label classifier (ce_noisy, coteaching, ...)."
        )
    clf.setup("test")  # methods that build their head lazily (FineTune) build it here
    ckpt = {"state_dict": dict(state)}
    clf.on_load_checkpoint(ckpt)  # frozen parts (kept out of checkpoints) from the live module
    own = clf.state_dict()
    bad = sorted(
        k for k in own if k not in ckpt["state_dict"] or ckpt["state_dict"][k].shape != own[k].shape
    )
    if bad:
        raise SourceRunError(
            f"method={method}: the checkpoint of {source.run_dir} does not match its own config "
            f"({bad[0]} and {len(bad) - 1} more missing or of another shape); rerun it: "
            f"{source.command()} on_config_change=replace"
        )
    clf.load_state_dict(ckpt["state_dict"], strict=False)
    log.info(
        "%s: classifier %s (%s) from %s",
        method,
        cfg.method.get("name"),
        type(clf).__name__,
        run_dir,
    )
    return clf


class NPC(ClassificationMethod):
    """NPC over a finished classifier run: the classifier frozen, the CVAE trained, predictions
    corrected at test time.

    Args:
        source: the classifier run, `{run_dir, experiment}` (`experiment` names the command that
            makes it in the error when it is missing or unfinished).
        knn_mode: `onehot` (the KNN class) or `proba` (the KNN probabilities) as the prior.
        knn_k: neighbours of the KNN prior (upstream 10, distance-weighted).
        knn_topk: proba mode: the k largest KNN probabilities kept (upstream `--selected_class`,
            default 1); null = all K.
        prior_norm: ρ, the prior's concentration (upstream README 5).
        prior_features: `classifier` (the classifier's `embed`, upstream) or `frozen_backbone`
            (this run's `model`'s `encode_image`, frozen: the black-box variant).
        fe_init: `classifier` (φ starts as a copy of the classifier's network up to its embedding,
            upstream) or `imagenet` (a copy of this run's `model`, a separate pretrained extractor).
        fe_dim: φ's width. Null: upstream's φ: a fresh layer of width K on the embedding (its CNNs),
            or, when the classifier's head reads its timm backbone's ImageNet logits (`head_input:
            backbone_logits`, upstream's ResNet50Pre), those 1000 logits with the classifier's
            weights. A number: a fresh layer of that width on the embedding.
        fe_trainable: train φ's copied network too (upstream), or only its fresh last layer.
        beta: weight of the KL term (upstream 1).
        softplus_beta: β of the encoder's softplus (upstream 1).
        reparam: `upstream` (the approximate Gamma inverse-CDF, not renormalised) or `rsample`
            (`torch.distributions.Dirichlet.rsample`; a DEVIATION).
        kl_form: `upstream` (the partial KL as coded) or `exact` (the Dirichlet KL).
        **kwargs: see `ClassificationMethod` / `Method` (`optimizer`: Adam 1e-3 upstream).
    """

    def __init__(
        self,
        name: str,
        model: nn.Module | None = None,
        info: Any = None,
        source: Any = None,
        knn_mode: str = "onehot",
        knn_k: int = 10,
        knn_topk: int | None = 1,
        prior_norm: float = 5.0,
        prior_features: str = "classifier",
        fe_init: str = "classifier",
        fe_dim: int | None = None,
        fe_trainable: bool = True,
        beta: float = 1.0,
        softplus_beta: float = 1.0,
        reparam: str = "upstream",
        kl_form: str = "upstream",
        **kwargs: Any,
    ) -> None:
        for kind, value, options in (
            ("knn_mode", knn_mode, KNN_MODES),
            ("prior_features", prior_features, PRIOR_FEATURES),
            ("fe_init", fe_init, FE_INITS),
            ("reparam", reparam, REPARAMS),
            ("kl_form", kl_form, KL_FORMS),
        ):
            if value not in options:
                raise ConfigValueError(f"method={name}: " + unknown_name(kind, value, options))
        if int(knn_k) < 1 or float(prior_norm) < 0 or (knn_topk is not None and int(knn_topk) < 1):
            raise ConfigValueError(
                f"method={name}: knn_k and knn_topk must be >= 1 and prior_norm >= 0, got "
                f"knn_k={knn_k}, knn_topk={knn_topk}, prior_norm={prior_norm}."
            )
        super().__init__(name, model, info, **kwargs)
        self.knn_mode, self.knn_k = knn_mode, int(knn_k)
        self.knn_topk = None if knn_topk is None else int(knn_topk)
        self.prior_norm, self.beta = float(prior_norm), float(beta)
        self.prior_features, self.fe_init = prior_features, fe_init
        self.reparam, self.kl_form = reparam, kl_form
        self.num_classes = len(self.classnames)
        expected = _expected_data(source)
        self.source = SourceRun.parse(name, source)
        # Read now: a missing, unfinished or foreign run fails before any work.
        self.classifier = load_classifier(self.source, name, self.info, expected)
        self.freeze("classifier")
        if prior_features == "frozen_backbone" or fe_init == "imagenet":
            self._check_backbone()
        inner = copy.deepcopy(self.classifier if fe_init == "classifier" else self.backbone)
        if hasattr(inner, "_frozen"):
            inner._frozen = []  # the copy trains whole (dropout and BatchNorm in train mode)
        # Upstream's ResNet50Pre: the classifier's head reads the ImageNet logits, and φ is them.
        imagenet_logits = (
            fe_init == "classifier"
            and fe_dim is None
            and getattr(self.classifier, "head_input", "features") == "backbone_logits"
        )
        fn = "backbone_logits" if imagenet_logits else "embed"
        base = Embedding(inner, fn if fe_init == "classifier" else "encode_image")
        base.requires_grad_(bool(fe_trainable))
        base.train()
        self.fe_trainable = bool(fe_trainable)
        self.net = CVAE(
            base,
            self._width(base),
            self.num_classes,
            fe_dim,
            softplus_beta=softplus_beta,
            fresh_head=not imagenet_logits,
        )
        # The prior of every training sample, by its `index` (set at fit start, kept in checkpoints).
        self._yhat: Tensor | None = None  # (N,) long, -1 where no sample had that index
        self._prior: Tensor | None = None  # (N,) long (onehot) or (N, K) float (proba)
        self.prior_stats: dict[str, float] = {}
        k = self.num_classes
        self.before_metrics = nn.ModuleList(
            MulticlassAccuracy(
                len(t.classnames) if t.classnames else k if g is None else len(g), average="micro"
            )
            for t, g in zip(self.test_specs, self.test_index_groups, strict=True)
        )

    # -- build-time checks ----------------------------------------------------------------------
    def _check_backbone(self) -> None:
        backbone = getattr(self, "backbone", None)
        if backbone is None or not callable(getattr(backbone, "encode_image", None)):
            raise ConfigValueError(
                f"method={self.name}: prior_features=frozen_backbone and fe_init=imagenet read this "
                "run's model (`encode_image`), and it has none; set model=<a pretrained backbone> "
                "or method.prior_features=classifier method.fe_init=classifier."
            )
        mine = getattr(self.backbone, "preprocess", None)
        theirs = self.classifier.data_requirements().get("preprocess")
        if mine != theirs:
            raise ConfigValueError(
                f"method={self.name}: model={getattr(self.backbone, 'name', '?')} takes other inputs "
                f"({mine}) than the classifier of {self.source.run_dir} ({theirs}); both read the same "
                "batches, so pick a model with the classifier's preprocessing."
            )

    @torch.no_grad()
    def _width(self, base: nn.Module) -> int:
        """The width of `base`'s output: a declared one (`embed_dim` of a classifier, its linear
        `head`'s input, `feature_dim` of a backbone), else a forward pass on a zero input of the
        shape the data serve."""
        inner = base.inner
        if base.fn == "backbone_logits":
            return int(inner.backbone.model.num_classes)
        if base.fn == "embed":
            dim = getattr(inner, "embed_dim", None) or None
            head = getattr(inner, "head", None)
            if dim is None and isinstance(head, nn.Linear):
                dim = head.in_features
        else:
            dim = getattr(inner, "feature_dim", None)
        if dim is not None:
            return int(dim)
        pre = self.classifier.data_requirements().get("preprocess")
        shape = (1, int(pre.dim)) if hasattr(pre, "dim") else (1, 3, *_image_size(pre))
        was = base.training
        base.eval()
        out = base(torch.zeros(shape, device=next(base.parameters(), torch.empty(0)).device))
        base.train(was)
        return int(out.shape[-1])

    def data_requirements(self) -> dict[str, Any]:
        # The classifier reads the inputs it was trained on.
        return self.classifier.data_requirements()

    def train(self, mode: bool = True) -> NPC:
        super().train(mode)
        if hasattr(self, "net") and not self.fe_trainable:
            self.net.base.eval()  # a frozen copy keeps its eval behaviour
        return self

    # -- the prior ------------------------------------------------------------------------------
    def classifier_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The frozen classifier's logits and the embedding the KNN prior reads. ((B, K), (B, E))"""
        with torch.no_grad():
            logits = self.classifier.eval_logits(images).float()
            if self.prior_features == "classifier":
                emb = self.classifier.embed(images)
            else:
                emb = self.backbone.encode_image(images)
        return logits, emb.float()

    @torch.no_grad()
    def compute_prior(
        self, minibatches: Iterable[dict[str, Any]], ordered: Iterable[dict[str, Any]]
    ) -> dict[str, float]:
        """The KNN prior and ŷ of every training sample; the diagnostics as `npc/*`.

        Args:
            minibatches: the training minibatches (the train loader): in each, the most confident
                sample per predicted class is kept (`generate_prior.py`, first loop).
            ordered: every training sample once (`index` order): ŷ and the KNN prediction of each
                (`generate_prior.py`'s second loop; upstream's ŷ comes from a pass like it). The
                noisy data modules serve it with the eval transform (`train_eval_dataloader`).

        # DEVIATION: the kept points are chosen by the argmax of the same forward pass, where upstream
        # reads ŷ stored by an earlier pass over the training set; the two agree unless the train
        # transform is random (Clothing1M / Food-101N's crops and flips, where upstream's ŷ and KNN
        # predictions also come from augmented images, and here from the eval transform's). The
        # embeddings of the whole training set are not kept (upstream holds an N x E array): the
        # second pass predicts per batch.
        """
        kept_emb, kept_cls = [], []
        for batch in minibatches:
            logits, emb = self.classifier_outputs(batch["image"].to(self.device))
            probs = logits.softmax(-1)
            keep = most_confident_per_class(probs, probs.argmax(-1))
            kept_emb.append(emb[keep].cpu())
            kept_cls.append(probs.argmax(-1)[keep].cpu())
        if not kept_cls:
            raise ConfigValueError(f"method={self.name}: the training split served no batches.")
        knn = fit_knn(torch.cat(kept_emb).double().numpy(), torch.cat(kept_cls).numpy(), self.knn_k)
        idx_all, yhat_all, prior_all, noisy_all, clean_all = [], [], [], [], []
        pos = 0
        for batch in ordered:
            logits, emb = self.classifier_outputs(batch["image"].to(self.device))
            n = len(logits)
            idx = batch.get("index")
            idx_all.append(
                torch.arange(pos, pos + n) if idx is None else torch.as_tensor(idx).long().cpu()
            )
            pos += n
            yhat_all.append(logits.argmax(-1).cpu())
            emb_np = emb.double().cpu().numpy()
            if self.knn_mode == "onehot":
                prior_all.append(torch.as_tensor(knn.predict(emb_np)).long())
            else:
                prior_all.append(torch.as_tensor(knn_proba(knn, emb_np, self.num_classes)).float())
            noisy_all.append(torch.as_tensor(batch["label"]).cpu() if "label" in batch else None)
            clean_all.append(
                torch.as_tensor(batch["clean_label"]).cpu() if "clean_label" in batch else None
            )
        idx, yhat, prior = torch.cat(idx_all), torch.cat(yhat_all), torch.cat(prior_all)
        n = int(idx.max()) + 1
        self._yhat = torch.full((n,), -1, dtype=torch.long)
        self._yhat[idx] = yhat
        self._prior = torch.zeros((n, *prior.shape[1:]), dtype=prior.dtype)
        self._prior[idx] = prior
        knn_cls = prior if self.knn_mode == "onehot" else prior.argmax(-1)
        stats = {
            "npc/knn_points": float(sum(len(c) for c in kept_cls)),
            "npc/train_samples": float(len(idx)),
        }
        if all(t is not None for t in noisy_all):
            noisy = torch.cat(noisy_all)
            stats["npc/yhat_noisy_acc"] = 100.0 * float((yhat == noisy).double().mean())
            stats["npc/prior_noisy_acc"] = 100.0 * float((knn_cls == noisy).double().mean())
        if all(t is not None for t in clean_all):
            clean = torch.cat(clean_all)
            known = clean != CLEAN_UNKNOWN  # real noisy data: y known for a few samples only
            if bool(known.any()):
                for key, pred in (("yhat", yhat), ("prior", knn_cls)):
                    right = (pred[known] == clean[known]).double().mean()
                    stats[f"npc/{key}_clean_acc"] = 100.0 * float(right)
                stats["npc/clean_known"] = float(known.sum())
        self.prior_stats = stats
        log.info(
            "%s: KNN prior (%s, k=%d) from %d kept points, for %d training samples; %s",
            self.name,
            self.knn_mode,
            self.knn_k,
            int(stats["npc/knn_points"]),
            len(idx),
            ", ".join(f"{k[4:]} {v:.2f}" for k, v in stats.items() if k.endswith("acc")),
        )
        return stats

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self._yhat is None:  # not restored from a checkpoint
            dm = self.trainer.datamodule
            if callable(getattr(dm, "train_eval_dataloader", None)):  # noisy data: eval transform
                ordered = dm.train_eval_dataloader()
            else:
                batch_size = int(getattr(dm, "eval_batch_size", 0) or dm.batch_size)
                workers = int(getattr(dm, "num_workers", 0))
                ordered = ordered_batches(train_split(dm), batch_size, workers)
            self.compute_prior(dm.train_dataloader(), ordered)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._yhat is not None:
            checkpoint["npc_prior"] = {
                "yhat": self._yhat,
                "prior": self._prior,
                "stats": dict(self.prior_stats),
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("npc_prior")
        if saved is not None:
            self._yhat, self._prior = saved["yhat"], saved["prior"]
            self.prior_stats = dict(saved.get("stats", {}))

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        idx = torch.as_tensor(batch["index"]).long().cpu()
        yhat = self._yhat[idx]
        if bool((yhat < 0).any()) or int(idx.max()) >= len(self._yhat):
            raise RuntimeError(
                f"{self.name}: a training index has no prior (not seen at fit start)."
            )
        yhat = yhat.to(self.device)
        alpha_p = prior_alpha(
            self._prior[idx].to(self.device),
            self.num_classes,
            self.prior_norm,
            self.knn_mode,
            self.knn_topk,
        )
        onehot = F.one_hot(yhat, self.num_classes).float()
        recon, alpha = self.net(batch["image"], onehot, self.reparam)
        loss, rec, kl = npc_loss(recon, onehot, alpha, alpha_p, self.beta, self.kl_form)
        b = float(len(idx))
        self.log_dict(
            {"train/loss": loss / b, "train/recon": rec / b, "train/kl": kl / b}, prog_bar=False
        )
        return loss  # summed over the batch, as upstream

    # -- inference ------------------------------------------------------------------------------
    def corrected(self, images: Tensor, clf_logits: Tensor) -> Tensor:
        """log p(y | x) from the classifier's logits and H(x). (B, K)"""
        p = calibrate(clf_logits.float().softmax(-1), self.net.transition(images))
        return p.clamp_min(1e-12).log()

    def logits(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            clf = self.classifier.eval_logits(images)
        return self.corrected(images, clf)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        spec = self.test_specs[dataloader_idx]
        if spec.role == "ood":
            return super().test_step(batch, batch_idx, dataloader_idx)
        groups = self.test_index_groups[dataloader_idx]
        with torch.no_grad():
            before = self.classifier.eval_logits(batch["image"]).float()
            after = self.corrected(batch["image"], before)
        self._update(
            self.test_metrics[dataloader_idx],
            batch,
            groups,
            collect_scores=self._has_ood and dataloader_idx == self._id_ref,
            raw=after,
        )
        self.before_metrics[dataloader_idx].update(project_logits(before, groups), batch["label"])

    def on_test_epoch_end(self) -> None:
        after: dict[str, float] = {}
        for spec, coll in zip(self.test_specs, self.test_metrics, strict=True):
            if spec.role != "ood":
                after[spec.name] = 100.0 * float(coll["acc"].compute())
        super().on_test_epoch_end()
        out: dict[str, float] = {}
        for i, spec in enumerate(self.test_specs):
            if spec.name not in after:
                continue
            before = 100.0 * float(self.before_metrics[i].compute())
            self.before_metrics[i].reset()
            vals = {"acc_before": before, "npc_gain": after[spec.name] - before}
            out.update({f"test/{spec.name}/{k}": v for k, v in vals.items()})
            if i == 0:
                out.update({f"test/{k}": v for k, v in vals.items()})
        self.log_dict(out, add_dataloader_idx=False)

    def extra_metrics(self) -> dict[str, float]:
        return dict(self.prior_stats)

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        keys = ("acc_before", "npc_gain")
        return (
            *super().metric_keys(),
            *(f"test/{k}" for k in keys),
            *(f"test/*/{k}" for k in keys),
            "train/recon",
            "train/kl",
            "npc/*",
        )


def _expected_data(source: Any) -> dict[str, Any] | None:
    """This run's `data` config from `source.data: {keys, values}` (what configs/method/npc.yaml
    passes: `${oc.dict.keys:data}`, `${oc.dict.values:data}`; two lists, because a dict with the
    data module's `_target_` would be instantiated along with the method)."""
    data = source.get("data") if isinstance(source, dict) else None
    if not data or data.get("keys") is None:
        return None
    return dict(zip(data["keys"], data["values"], strict=True))


def _image_size(preprocess: Any) -> tuple[int, int]:
    size = getattr(preprocess, "image_size", None) or getattr(preprocess, "size", None) or 224
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)[:2]
