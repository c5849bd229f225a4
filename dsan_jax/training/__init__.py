"""Training: the train state and steps, losses, optimiser, sharding, checkpoints, the run folder,
the loop over steps, and the protocol (every variant on every fold)."""
