"""A run's config: where its YAML lives and what Hydra is told (compose.py),
the typed schema (schema.py) and its keys (keys.py), every key's rule
(rules.py), the options of the preset groups (presets.py), Hydra's errors as
one line (errors.py), and the key=value options of the other commands
(options.py)."""


class ConfigError(ValueError):
    """A config value that composes but cannot run; the message names the key."""
