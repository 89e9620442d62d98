"""Offline pieces for ``atm demo``: a generated story corpus and a tiny causal language model."""
