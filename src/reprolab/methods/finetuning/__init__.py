"""Robust fine-tuning of CLIP: the CaRot paper (Oh et al., NeurIPS 2024, arXiv 2311.01723) and the
baselines of its tables (robust_finetuning.md).

- `ft`: FT, cross-entropy through the image tower, head from the zero-shot head (`FineTune`);
- `lp`: linear probes, AdamW or L-BFGS with C chosen on a held-out split (`LinearProbeFT`);
- `lp_ft`: LP then FT in one command, the first stage's head handed to the second (`LPFT`);
- `flyp`: contrastive fine-tuning of both towers against class-template captions (`FLYP`);
- `carot`: FLYP + orthogonality constraint + EMA self-distillation (`CaRot`);
- `wise_ft`: weight-space interpolation of zero-shot and fine-tuned weights, every alpha in one run
  (`WiseFT`).
"""
