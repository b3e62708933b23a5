"""Leaf definitions every layer shares (no torch, no _C): the merge-method registry."""
