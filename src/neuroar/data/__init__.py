"""Data layer: NIfTI I/O, manifests and BIDS, the template atlas, preprocessing, longitudinal pairs, cached
tokens and latents, the synthetic cohort."""
