"""Models: the model contract, ensembles, the shipped architectures, foreign modules and
functions."""
