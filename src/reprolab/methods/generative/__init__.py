"""Generative models of the data (VAEs on tabular rows, ...), scored by held-out likelihood bounds."""
