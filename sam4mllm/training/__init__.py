"""LoRA fine-tuning of MLLM backbones on SAM4MLLM dialogs, under DeepSpeed or plain PyTorch."""
