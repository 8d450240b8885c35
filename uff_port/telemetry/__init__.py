"""telemetry plane."""
