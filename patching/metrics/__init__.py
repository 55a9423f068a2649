"""Image-quality and projection metrics, 2.5D LPIPS."""
