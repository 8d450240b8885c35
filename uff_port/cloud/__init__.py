"""cloud plane."""
