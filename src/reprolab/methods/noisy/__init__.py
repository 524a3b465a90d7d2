"""Learning with noisy labels: NPC (`npc.py`) and the classifiers it post-processes
(robustness_ood_prompting.md §4): `ce` (`ce_noisy`, `ce_early`), `coteaching`, `label_smoothing`,
`sce`, `forward`, on the shared base in `base.py` (`logits`, `embed`, early stopping)."""
