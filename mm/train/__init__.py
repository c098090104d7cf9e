"""Training recipes: the text model, the multimodal model (recipe_tiny), LLaVA fine-tuning."""
