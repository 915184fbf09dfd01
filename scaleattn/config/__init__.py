"""The recipe's defaults (`defaults.get_config`, which the files under configs/ override), their validation, and
configs read back from JSON (workdirs' config.json, exported models).

May import: models (registries), data (dataset names), training's loss and optimizer settings. Never the loop.
"""
