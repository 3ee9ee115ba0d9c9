"""The format layer: safetensors containers, checkpoints (local folders and Hub repos), durable
writes, errors. It knows bytes and files, nothing of MoE."""
