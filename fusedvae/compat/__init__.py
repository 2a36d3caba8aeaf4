"""Drop-ins for other libraries' Gaussian-VAE pieces, one submodule per library.

- :mod:`fusedvae.compat.diffusers`: ``DiagonalGaussianDistribution`` and ``patch()`` for
  diffusers' ``AutoencoderKL`` (and every other diffusers autoencoder that uses that class).

Nothing here is imported by ``import fusedvae``, and this package imports no third-party library:
each submodule imports its library when it is itself imported.
"""
