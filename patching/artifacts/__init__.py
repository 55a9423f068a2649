"""Model artifacts: the checkpoint/export format, diffusers-style networks, the reconstructor interface and its writer."""
