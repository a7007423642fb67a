"""Training entry points (``python -m esm_dual.train.pt_finetune``; launch with ``torchrun`` for DDP/FSDP)."""
