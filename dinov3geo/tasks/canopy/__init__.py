"""Canopy height from frozen DINOv3 features: heads, Meta CHMv2, training, evaluation and region mapping."""
