"""The model stage: builtin tiny models, tokenizer/config/weights from `recipe.model`, and what a
quantized base needs."""
