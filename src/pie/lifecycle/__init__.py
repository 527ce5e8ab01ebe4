"""Lifecycle operations on jobs (spec 15.4): cancel and retry."""
