"""Stage 2, spectral: one matrix (or a stack of same-shape ones) to its report columns.

`analyze_matrix` and its batched and streamed forms, the array backends, the power-law
and Marchenko-Pastur fits, entry statistics, the seeded and streamed shuffles, and the
column definitions. Pure maths: imports nothing from the other stages.
"""
