"""Planning a run before spending on it: estimates of memory and time, and sweeps over settings."""
