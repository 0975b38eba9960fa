"""Training: stages (frozen | lora | full per module), the accelerate loop, checkpoints and resume."""
