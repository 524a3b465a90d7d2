"""Post-hoc OOD detection over zero-shot CLIP through a query-only oracle: output-based scores
(`scores`: MSP, MaxLogit, Energy, Entropy, MCM) and MixDiff (`mixdiff`, Yang et al., ECAI 2024)."""

from reprolab.methods.ood.mixdiff import MixDiff, MixDiffScorer
from reprolab.methods.ood.scores import PostHocOOD

__all__ = ["MixDiff", "MixDiffScorer", "PostHocOOD"]
