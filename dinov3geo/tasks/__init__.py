"""Tasks on frozen backbone features: dense features, canopy height, change detection."""
