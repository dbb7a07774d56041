"""The LMDB spool: message records, delivery jobs, their indexes, group commit.

Lives inside the ``mta`` package because a top-level package named ``queue``
would shadow Python's own ``queue`` module.
"""
