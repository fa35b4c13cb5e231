"""Tests of the GPU paths (marked ``cuda``; skipped without a CUDA GPU)."""
