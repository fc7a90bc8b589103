"""Converters from published PyTorch / safetensors checkpoints to jaxdissect model directories."""
