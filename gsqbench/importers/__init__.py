"""Importers of published tokenizer releases: one module per upstream format, each reading tensors only
(`torch.load(weights_only=True)` or safetensors), loading strictly, and recording the provenance in the card.

- `gsq_official`: the official GSQ releases (HelmholtzAI-FZJ/flex_gen), `gsqbench import-official`.
"""
