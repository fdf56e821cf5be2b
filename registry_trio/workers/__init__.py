"""Serving from several processes: a supervisor, its workers, and the one that leads them.

``registry-trio serve`` with ``http.workers`` above 1 runs :func:`.supervisor.supervise`,
which binds the listening socket once and starts that many worker processes
(:mod:`.worker`) that all accept on it. Each worker is the whole single-process server of
:mod:`registry_trio.server`; one of them at a time, the leader (:mod:`.leadership`), also
delivers events and runs the periodic maintenance.
"""
