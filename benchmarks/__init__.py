"""Benchmarks of access_audit against plain SQLAlchemy and Flask-SQLAlchemy.

Run from the repository root::

    python -m benchmarks                        # full run, SQLite and PostgreSQL
    python -m benchmarks --databases sqlite     # one database
    python -m benchmarks --quick                # tiny sizes, no targets checked

It prints a table, writes the figures to ``benchmarks/results/latest.json``
and exits non-zero when a target is missed. Every figure is a ratio or a rate
measured side by side in the same run: the variants of a workload run in
alternation over several rounds and the medians are reported.
``python -m benchmarks.profiling`` profiles the hot paths with cProfile.
"""
