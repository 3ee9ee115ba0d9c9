"""The MoE-model layer: the architecture table and what it says about a checkpoint (roles of
tensors, expert counts, parameters, quantization configs), the config check and the logits oracle."""
