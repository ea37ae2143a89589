"""tvrecipe.plan layer."""
