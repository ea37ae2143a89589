"""tvrecipe.spec layer."""
