"""The one training loop (Accelerate + DeepSpeed) shared by DP-VLPA pretraining and fine-tuning."""
