"""The bundled tiny models: procedural training clips and the training script."""
