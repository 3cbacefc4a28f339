"""The benchmark: fastrnn against torch.nn (``python -m fastrnn.bench``).

``measure`` builds and times the cases, ``report`` turns the records into
the speed-up table, the summary line, JSON, CSV and a PNG plot. The
pytest-benchmark suite in the repository's ``bench/`` times the same cases.
"""
