"""Model definitions (torch). Importing this package imports torch; the CLI imports it lazily."""
from calm_edge.models.autoencoder import Autoencoder

__all__ = ["Autoencoder"]
