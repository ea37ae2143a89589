"""tvrecipe.exec layer."""
