"""Edges between heads: every head-to-head (and embedding, MLP, logits) edge scored from one pass, and exact
edge patching as the ground truth (:mod:`.graph` the nodes, :mod:`.residual` the modules, :mod:`.attribution`
the scores, :mod:`.patching` the exact runs)."""
