"""CrossPool: multi-LLM serving for cold MoE models."""
