"""Stage 1, source: from a model reference to a plan of matrices, and their bytes decoded.

Model references (local folders, the hub cache), validated safetensors headers, dtype and
MXFP4 decoders, the checkpoint reader, the plan, and synthetic checkpoints. Imports
nothing from the other stages.
"""
