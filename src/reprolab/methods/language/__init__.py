"""Language models of token streams (a causal transformer, a unigram baseline), scored by held-out
per-token likelihood: loss (nats per token), perplexity and bits per token."""
