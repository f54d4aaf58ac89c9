"""Networks: the multi-scale tokenizer and its quantizer (later: the NeuroAR transformer, baselines)."""
