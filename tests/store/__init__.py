"""Tests for tvrecipe.store."""
