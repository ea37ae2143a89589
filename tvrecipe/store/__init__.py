"""tvrecipe.store layer."""
