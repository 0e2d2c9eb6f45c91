"""DP-SGD: Poisson sampling, per-example clipping, noise, accountants, ledger, budget, audit."""
