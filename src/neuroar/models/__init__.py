"""Networks: the multi-scale tokenizer, the NeuroAR transformer, the baselines' networks and the brain-age
regressor."""
