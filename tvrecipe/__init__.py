"""tvrecipe: declarative merge recipes for task vectors."""

__version__ = "0.2.4"
