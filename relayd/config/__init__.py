"""The configuration: relay.yaml parsed once into frozen, validated values, presets, and the encrypted credential and tenant stores."""
