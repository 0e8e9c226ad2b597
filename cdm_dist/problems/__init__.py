"""The door models come through: the registry of named problems, the built-ins, their data and training."""
