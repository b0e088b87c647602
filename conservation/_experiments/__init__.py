"""Experiments: TOML configs, the runner, sweeps, the results store, plots and the command
line."""
