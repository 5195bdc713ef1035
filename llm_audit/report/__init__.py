"""Stage 4, report: the row schema, the Parquet writer and readers, and what reads them:
`report show`, `check`, `diff` and the HTML page. Never imports `run`.
"""
