"""The sweep engine: specs -> trials -> Ray Tune -> Parquet + MLflow -> reports.

Depends on ``kernel``, ``attacks`` and ``defenses``; none of them depends on it.
"""
