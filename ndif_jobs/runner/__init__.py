"""The worker as a service: started in the background, listed, stopped, and followed.

* `detach.py`: `worker --detach`: the worker in its own session, with a pid file and a log file
  under the data folder; a second one for the same queue and backend refused.
* `registry.py`: each worker's row in the `workers` table, kept by a beat thread; `workers` and
  `workers stop` read and write it (signals on this host, a flag read at the next beat elsewhere).
* `unit.py`: a systemd user unit for a worker started at boot (`worker --print-unit`).
* `logs.py`: the detached worker's log, printed or followed (`logs --follow`).
* `commands.py`: the `workers`, `workers stop` and `logs` commands.
"""
