"""Converters from other tools' configs into recipes (they write recipes, so they name ops)."""
