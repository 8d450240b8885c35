"""planner plane."""
