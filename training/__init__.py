"""Training loops for the autoencoder, the CALM model and the token-by-token baseline (torch)."""
