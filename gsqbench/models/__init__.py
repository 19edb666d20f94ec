"""Neural network models of gsqbench: the official-compatible GSQ-GAN autoencoder and the Tokenizer.

Import submodules directly (`gsqbench.models.autoencoder`, `gsqbench.models.tokenizer`,
`gsqbench.models.discriminator`); this package file stays empty so importing one never pulls in the others.
"""
