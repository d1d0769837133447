"""The training stage: the Accelerate loop, its losses, checkpoints, metrics and evaluation, and
`run.train`, which wires the stages together for one recipe."""
