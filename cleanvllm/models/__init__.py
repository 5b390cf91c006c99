"""Model definitions (generated from notebooks/06_qwen3.ipynb)."""
