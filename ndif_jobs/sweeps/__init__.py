"""Sweeps: hundreds of jobs from one file, one name, one table.

`spec.py` reads a sweep file (TOML or YAML) and expands it into rows; `submit.py` validates
every row and queues the new ones in one transaction; `figures.py` draws a whole sweep;
`commands.py` holds the CLI commands. The table of results is `ndif_jobs.collect`.
"""
