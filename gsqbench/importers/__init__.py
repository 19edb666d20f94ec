"""Importers of published tokenizer releases: one module per upstream format, each reading tensors only
(`torch.load(weights_only=True)` or safetensors, never running pickled code), loading strictly, and recording the
provenance the protocol card needs (file sha256, upstream repository and commit, dropped keys with reasons).

- `gsq_official`: the official GSQ releases (HelmholtzAI-FZJ/flex_gen), `gsqbench import-official`.
- `releases`: LlamaGen, Open-MAGVIT2, MaskGIT VQGAN and taming VQGAN (`gsqbench import`), through the per-format
  modules `llamagen`, `magvit2`, `maskgit`, `taming`, the shared `common`, and `lightning`, the one safe reader of
  Lightning/torch release files.
"""
