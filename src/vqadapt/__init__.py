"""vqadapt: train Vietnamese generative VQA models and measure how the encoders are best adapted."""

__version__ = "0.1.0"
