"""The synthetic fact world: a model whose knowledge is known exactly."""
