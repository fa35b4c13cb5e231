"""Faults and concurrency: kill -9, Ctrl-C and full disks in the middle of real runs (issue 15)."""
