"""Data layer: NIfTI I/O, manifests and BIDS, preprocessing, longitudinal pairs, the synthetic cohort."""
