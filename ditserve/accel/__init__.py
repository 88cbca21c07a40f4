"""Speed transforms applied to a loaded DiT from outside: compile, CUDA graphs, FP8 linears."""
