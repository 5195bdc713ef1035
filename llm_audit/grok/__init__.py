"""Small-model mode: train the canonical grokking setups far past grokking and audit their
checkpoints with the same pipeline as a large model (`llm-audit grok`)."""
