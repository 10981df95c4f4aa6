"""Model-registry layer: the descriptor pyfunc model, promotion with aliases, image search with a registered model."""
