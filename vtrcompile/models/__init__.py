"""Model loaders, family adapters and the built-in demo presets."""
