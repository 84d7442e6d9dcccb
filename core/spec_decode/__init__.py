"""Speculative decoding: cheap guesses of the next tokens, checked by the target model in one forward pass.

A proposer guesses up to k tokens per running sequence before a step is scheduled; the step computes the
sequence's last token and the k guesses together (k + 1 query tokens), and `rejection.verify` keeps the
longest prefix of guesses that the target model would have produced, plus one token of its own. Greedy
outputs are those without speculation token for token; sampled ones follow the target distribution
exactly (rejection sampling).
"""
