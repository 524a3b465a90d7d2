"""Group-robustness training methods (spec robustness_ood_prompting.md §1.7, §2).

A linear head on a featurizer (`cfg.model`), trained on batches `{image, label, group}`; evaluation
is the classification routine's (worst- and average-group accuracy per test set).

- `erm`: mean cross-entropy (`ERM`);
- `groupdro`: online GroupDRO, q-weighted group losses (`GroupDRO`; `update_group_weights`);
- `sam`, `asam`: sharpness-aware steps with the ERM loss in both passes (`SAMMethod`, `ASAMMethod`;
  the two-pass wrapper is `reprolab.optim.sam.SAM`);
- `asgdro`: ASAM's perturbation from the uniform loss, GroupDRO's loss at w + ε (`ASGDRO`);
- `scer`: GroupDRO + the spurious / core alignment regulariser on the featurizer output (`SCER`;
  the closed-form quantities are `scer_math`);
- `jtt`: ERM, then retraining with the first model's training errors upweighted (two rounds);
- `dfr`: post-hoc last-layer retraining on group-balanced validation subsets of a finished ERM
  run's features;
- `resample`, `reweight`, `mixup`, `lisa`, `irm`, `coral`: SubpopBench's single-stage baselines.

Group methods declare `num_groups` among what they need from the data: on data without group labels
they fail when built, in one line.
"""
