"""Every metric of reprolab, each tested against an independent computation (tests/test_metrics.py).

- `classification`: top-1 accuracy, NLL, Brier score (functional and torchmetrics `Metric`s);
- `calibration`: expected calibration error with equal-width bins (15 or the 10-bin protocol),
  global or batch-averaged (the CaRot code's protocol);
- `group`: per-group accuracy -> worst-group and average-group accuracy;
- `projection`: ImageNet-A/R/ObjectNet logit projection (max over each class's ImageNet columns);
- `ood`: AUROC, FPR at 95% TPR, AUPR-in / AUPR-out (higher score = more in-distribution);
- `retrieval`: recall@K for image->text and text->image retrieval;
- `likelihood`: perplexity and bits per dimension from summed negative log-likelihoods;
- `features`: smallest singular value of the standardised feature covariance (CaRot's σ_min).
"""
