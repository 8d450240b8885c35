"""registry plane."""
