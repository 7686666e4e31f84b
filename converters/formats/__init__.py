"""The files nemotune reads and writes, below both training and the converters: Hugging Face configs and
safetensors shards, megatron-core dist checkpoints, ``.nemo`` archives, adapter directories (nemotune's,
HF PEFT, NeMo LoRA), and the name-mapping tables between them. Nothing here builds a model."""
