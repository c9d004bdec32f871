"""Biological benchmarks on aligned embeddings: recall (exact streamed null), perturbation
consistency/magnitude, CORUM clusters, copairs mAP, batch generalisation, oracle recall."""
