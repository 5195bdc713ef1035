"""Stage 3, run: a plan turned into a report by Ray tasks.

The audit driver, the cluster connection and node checks, per-unit analysis, the audit
config, progress, and the commands that analyze.
"""
