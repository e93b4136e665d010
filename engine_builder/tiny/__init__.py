"""The bundled tiny models: the training script and the evaluation of the trained models."""
