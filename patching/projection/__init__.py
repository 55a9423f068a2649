"""The DRR projector and CT physics."""
