"""The chain maths: MLGD / MLGD-F over batched chains, its losses, schedules, priors, samplers and targets."""
