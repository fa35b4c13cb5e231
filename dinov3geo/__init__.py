"""dinov3geo."""
