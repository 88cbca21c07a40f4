"""Side-by-side GPU benchmarks against diffusers, with random weights at real architecture sizes."""
