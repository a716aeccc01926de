"""Resolve a repository revision into an immutable Tree (git entries + DVC outputs)."""
