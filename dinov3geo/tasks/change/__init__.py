"""Land-use change and deforestation detection between dates (see the submodules)."""
