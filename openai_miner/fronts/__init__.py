"""Fronts: each turns one wire protocol into questions for the core and writes its answers back."""
