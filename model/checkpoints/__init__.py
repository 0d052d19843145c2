"""Checkpoint readers: each maps a format's names and layouts onto our parameter trees."""
