"""Meerkat on Flower: thin entry points over `meerkat_hf.federated.flower`."""
