"""Model-family adapters: one file per family, registered by config.model_type in vtc.registry."""
