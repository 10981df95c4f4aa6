"""Model-registry layer: the descriptor pyfunc model, promotion with aliases, pulling models."""
