"""Our DiTs in plain PyTorch. No imports from parallel/, accel/, runtime/ or server/."""
